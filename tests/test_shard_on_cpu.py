"""Sharded stages: N workers of rollout / teacher split a round's parts; the run lock admits them
together and refuses anyone else; a killed worker's parts are redone by the next launch."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from opdcache.errors import OpdcacheError
from opdcache.lock import RunLock
from opdcache.loop import start_run
from opdcache.rundir import RunDir
from opdcache.shard import Shard

JOB = "rollout round=0 workers=2"


def test_shard_parsing_and_ownership(monkeypatch):
    assert Shard.parse("1/3") == Shard(1, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(OpdcacheError, match="shard"):
            Shard.parse(bad)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert Shard.of(None) == Shard(2, 4) and Shard.of("0/2") == Shard(0, 2)
    assert [p for p in range(10) if Shard(2, 4).owns(p)] == [2, 6]
    assert (
        Shard(0, 1).job("rollout", 0) is None and Shard(1, 2).job("teacher", 3) == "teacher round=3 workers=2"
    )


def test_workers_of_one_job_share_the_lock_and_nobody_else_gets_in(tmp_path):
    run = RunDir(tmp_path)
    with RunLock(run, job=JOB), RunLock(run, job=JOB):  # two workers of the same job
        for intruder in (
            RunLock(run),
            RunLock(run, job="teacher round=0 workers=2"),
            RunLock(run, shared=True),
        ):
            with pytest.raises(OpdcacheError, match="writing this run"), intruder:
                pass
        assert JOB in run.lock.read_text()
    with RunLock(run):  # all workers gone: the record is cleared and a writer gets in
        with pytest.raises(OpdcacheError, match="writing"), RunLock(run, job=JOB):
            pass
    with RunLock(run, shared=True):  # a reader keeps workers out, and the other way round
        with pytest.raises(OpdcacheError, match="reading"), RunLock(run, job=JOB):
            pass
    assert run.lock.read_text() == ""


def test_a_dead_workers_record_is_taken_over(tmp_path):
    run = RunDir(tmp_path)
    code = (
        "import sys, time; from opdcache.lock import RunLock; "
        f"l = RunLock(sys.argv[1], job={JOB!r}); l.__enter__(); print('held', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(OpdcacheError, match="workers of"), RunLock(run):
        pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    with RunLock(run) as lock:  # the kernel dropped the dead worker's flock; its record is stale
        assert lock.stale and lock.stale["job"] == JOB


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "opdcache.cli", *args, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _rows(d):
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(d.glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def one_worker(tiny_overrides, tmp_path_factory):
    """The reference: the round generated and completed by one worker of each stage."""
    pytest.importorskip("vllm")
    run = RunDir(tmp_path_factory.mktemp("one") / "run")
    overrides = tiny_overrides + ["rollout.prompts_per_round=6", "rollout.part_size=1"]  # 6 parts
    start_run(None, run, overrides)
    for stage in ("rollout", "teacher"):
        p = _cli(stage, str(run.root), "--round", "0")
        assert p.wait(timeout=300) == 0, p.stdout.read()[-3000:]
    return run, overrides


def test_two_workers_write_the_parts_of_one(one_worker, tmp_path):
    ref, overrides = one_worker
    run = RunDir(tmp_path / "run")
    start_run(None, run, overrides)
    for stage in ("rollout", "teacher"):
        workers = [_cli(stage, str(run.root), "--round", "0", "--shard", f"{i}/2") for i in range(2)]
        for w in workers:
            assert w.wait(timeout=300) == 0, w.stdout.read()[-3000:]
    assert not any(run.rollout_round(0).glob("*.parquet"))
    ours, theirs = _rows(run.cache_round(0)), _rows(ref.cache_round(0))
    assert sorted(ours) == sorted(theirs) and len(ours) == 6
    for name in ours:  # the same samples (each part has its own seed) and the same teacher columns
        assert ours[name] == theirs[name], name
    p = _cli("verify", str(run.root))
    assert p.wait(timeout=120) == 0, p.stdout.read()


def test_a_killed_worker_is_redone_by_the_next_launch(one_worker, tmp_path):
    ref, overrides = one_worker
    run = RunDir(tmp_path / "run")
    start_run(None, run, overrides)
    survivor = _cli("rollout", str(run.root), "--round", "0", "--shard", "0/2")
    victim = _cli("rollout", str(run.root), "--round", "0", "--shard", "1/2")
    deadline = time.time() + 120
    while not any(run.rollout_round(0).glob("part-*.parquet")) and time.time() < deadline:
        time.sleep(0.2)  # kill once some part has landed (the victim's or the survivor's)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert survivor.wait(timeout=300) == 0, survivor.stdout.read()[-3000:]
    again = _cli("rollout", str(run.root), "--round", "0")  # any worker count finishes the stage
    assert again.wait(timeout=300) == 0, again.stdout.read()[-3000:]
    assert _rows(run.rollout_round(0)).keys() == _rows(ref.cache_round(0)).keys()
    p = _cli("verify", str(run.root))
    out = p.stdout.read()
    assert p.wait(timeout=120) == 0, out


def test_workers_under_a_launcher_get_their_own_gpus(monkeypatch):
    from opdcache.shard import pin_devices

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pin_devices(2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    pin_devices(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    pin_devices(1)  # already one device: a job array's task, left alone
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(OpdcacheError, match="needs 1 GPU"):
        pin_devices(1)
