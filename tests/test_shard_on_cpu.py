"""Sharded stages: N workers of rollout / teacher / score split a round's parts; the run lock admits
them together and refuses anyone else; a killed worker's parts are redone by the next launch; every
worker records its own stage_times line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from opdcache.cache.synthetic import write_synthetic_run
from opdcache.errors import OpdcacheError
from opdcache.lock import RunLock
from opdcache.loop import start_run
from opdcache.query import connect
from opdcache.rundir import RunDir
from opdcache.score.stage import read_effective_lengths, score_run
from opdcache.shard import Shard
from opdcache.variant import VariantSpec

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
        if stage == "rollout":  # stored tokens, counted before the teacher replaces the rollout parts
            stored = sum(
                len(ids)
                for t in _rows(run.rollout_round(0)).values()
                for ids in (r["response_ids"] for r in t)
            )
    assert not any(run.rollout_round(0).glob("*.parquet"))
    lines = [json.loads(x) for x in run.stage_times.read_text().splitlines()]
    rollout = [x for x in lines if x["stage"] == "rollout"]
    assert sorted(x["shard"] for x in rollout) == ["0/2", "1/2"]  # every worker records its own line
    assert sum(x["generated_tokens"] for x in rollout) == stored > 0  # no in-flight stops: decoded = stored
    walls = (
        connect(run)
        .execute(
            "select stage, seconds, generated_tokens, lines from stage_walls where round = 0 order by stage"
        )
        .fetchall()
    )
    teacher = [x for x in lines if x["stage"] == "teacher"]
    assert walls == [
        ("rollout", max(x["seconds"] for x in rollout), stored, 2),
        ("teacher", max(x["seconds"] for x in teacher), None, 2),
    ]
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


def test_workers_on_one_host_bind_their_own_cores(monkeypatch):
    from opdcache.shard import pin_cpu_cores

    # "auto" (vLLM's default) through monkeypatch, so that what pin_cpu_cores writes is undone after
    # the test (a leaked binding to cores 4-6 would break every later engine on this machine)
    unset = lambda: monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")  # noqa: E731
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 8, 9, 10})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    got = []
    for rank in range(3):  # 7 cores over 3 workers: 3, 2, 2, contiguous, disjoint
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        unset()
        pin_cpu_cores()
        got.append(os.environ["VLLM_CPU_OMP_THREADS_BIND"])
    assert got == ["4,5,6", "7,8", "9,10"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_RANK", "2")
    unset()
    pin_cpu_cores()  # more workers than cores: one core each, shared round-robin
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    pin_cpu_cores()  # the user's binding is kept
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    unset()
    pin_cpu_cores()  # one worker on this host: vLLM's own binding
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_two_workers_recovering_one_interrupted_swap(tmp_path, monkeypatch):
    """Two sharded score workers started after a crash between replace_dir's renames both find the
    set-aside `.NAME.old.PID`; the one that renames second must not fail."""
    from opdcache import rundir

    old = tmp_path / ".prune.old.4242"
    (old / "round=0").mkdir(parents=True)
    (old / "round=0" / "part-00000.parquet").write_bytes(b"scores")
    real = os.replace

    def raced(src, dst):  # the other worker renames first, between this worker's glob and rename
        real(src, dst)
        real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", raced)
    rundir.recover_interrupted_swaps(tmp_path)
    assert (tmp_path / "prune" / "round=0" / "part-00000.parquet").read_bytes() == b"scores"
    assert not old.exists()


SCORE_JOB = "score variant=(config) rounds=all workers=2"  # what `opdcache score RUN --shard i/2` holds


@pytest.fixture(scope="module")
def scored_once(tmp_path_factory):
    """A synthetic cache (2 rounds x 5 parts) and, beside it, its scores by one unsharded call."""
    base = tmp_path_factory.mktemp("score")
    cache = write_synthetic_run(
        base / "cache", rounds=2, parts_per_round=5, prompts_per_part=3, k=8, vocab=3000
    )
    ref = RunDir(base / "ref")
    shutil.copytree(cache.root, ref.root)
    for extra in ((), ("--variant", "rnd", "--metric", "random", "--reference", "prune")):
        p = _cli("score", str(ref.root), *extra)
        assert p.wait(timeout=300) == 0, p.stdout.read()
    return cache, ref


def _score_files(run, variant="prune"):
    d = run.variant(variant)
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def _fresh(scored_once, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(scored_once[0].root, run.root)
    return run


def _score_workers(run, *extra, shards=("0/2", "1/2")):
    workers = [_cli("score", str(run.root), *extra, "--shard", s) for s in shards]
    for w in workers:
        assert w.wait(timeout=300) == 0, w.stdout.read()[-3000:]


def test_two_score_workers_write_the_bytes_of_one(scored_once, tmp_path):
    ref = scored_once[1]
    run = _fresh(scored_once, tmp_path)
    _score_workers(run)
    _score_workers(run, "--variant", "rnd", "--metric", "random", "--reference", "prune")  # matched per round
    for variant in ("prune", "rnd"):
        ours, theirs = _score_files(run, variant), _score_files(ref, variant)
        assert len(theirs) == 2 * 5 * 2  # parts and their integrity records
        assert ours == theirs, variant
    lines = [json.loads(x) for x in run.stage_times.read_text().splitlines()]
    assert sorted((x["stage"], x["round"], x["shard"]) for x in lines) == sorted(
        (f"score:{v}", r, s) for v in ("prune", "rnd") for r in (0, 1) for s in ("0/2", "1/2")
    )
    p = _cli("verify", str(run.root))
    out = p.stdout.read()
    assert p.wait(timeout=120) == 0 and "notes" not in out, out


def test_a_killed_score_worker_is_redone_and_the_partial_round_is_not_read(scored_once, tmp_path):
    ref = scored_once[1]
    run = _fresh(scored_once, tmp_path)
    _score_workers(run, shards=("1/2",))  # worker 0 never ran
    mine = {
        "part-00001.parquet",
        "part-00003.parquet",
        "_part-00001.parquet.json",
        "_part-00003.parquet.json",
    }
    assert sorted(_score_files(run)) == sorted(n for n in _score_files(ref) if n.split("/")[1] in mine)
    # worker 1 "killed" writing part 3 of round 0: the part gone, its record and a temporary left
    d = run.score_round("prune", 0)
    (d / "part-00003.parquet").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / f".part-00003.parquet.{dead.pid}.tmp").write_bytes(b"torn")
    with pytest.raises(OpdcacheError, match="1 of 5 cache parts scored"):
        read_effective_lengths(run, "prune", 0)  # the budget never sees a partial round
    _score_workers(run)  # relaunch both
    assert _score_files(run) == _score_files(ref)  # the temporary is gone, the parts are the reference's
    p = _cli("verify", str(run.root))
    out = p.stdout.read()
    assert p.wait(timeout=120) == 0 and "notes" not in out, out


def test_score_workers_share_the_lock_and_refuse_other_writers(scored_once, tmp_path):
    run = _fresh(scored_once, tmp_path)
    with RunLock(run, job=SCORE_JOB):  # worker 0 of 2, busy
        for intruder in (
            ("score", str(run.root)),
            ("score", str(run.root), "--rounds", "0", "--shard", "1/2"),
        ):
            p = _cli(*intruder)
            out = p.stdout.read()
            assert p.wait(timeout=120) == 2 and "writing this run" in out, out
        _score_workers(run, shards=("1/2",))  # its fellow worker is admitted
    assert {n.split("/")[1] for n in _score_files(run) if n.endswith(".parquet")} == {
        "part-00001.parquet",
        "part-00003.parquet",
    }


def test_a_sharded_score_completes_a_variant_and_never_mixes_parameters(scored_once, tmp_path):
    run = _fresh(scored_once, tmp_path)
    score_run(run, "prune", VariantSpec(), rounds=[0], progress=False, shard=Shard(0, 2))
    with pytest.raises(OpdcacheError, match="would mix settings"):
        score_run(run, "prune", VariantSpec(gamma=0.5), rounds=[0], progress=False, shard=Shard(1, 2))


def test_stage_walls_sum_tokens_and_take_the_slowest_worker(tmp_path):
    run = RunDir(tmp_path)
    lines = [  # a 2-worker rollout whose worker 0 was relaunched, then a 1-worker rerun; a training line
        {"stage": "rollout", "seconds": 3.0, "work_seconds": 2.0, "generated_tokens": 10, "shard": "0/2"},
        {"stage": "rollout", "seconds": 4.0, "work_seconds": 3.0, "generated_tokens": 20, "shard": "0/2"},
        {"stage": "rollout", "seconds": 6.0, "work_seconds": 1.0, "generated_tokens": 40, "shard": "1/2"},
        {"stage": "rollout", "seconds": 2.0, "work_seconds": 2.0, "generated_tokens": 5},
        {"stage": "train", "seconds": 9.0, "work_seconds": 8.0},
        {"stage": "eval", "seconds": 12.0, "work_seconds": 7.0},  # 5 s of it started the engine
    ]
    run.stage_times.write_text("".join(json.dumps({"run": "main", "round": 0, **x}) + "\n" for x in lines))
    rows = (
        connect(run)
        .execute(
            "select stage, seconds, work_seconds, generated_tokens, workers, lines from stage_walls order by stage"
        )
        .fetchall()
    )
    assert rows == [
        ("eval", 12.0, 7.0, None, 1, 1),
        ("rollout", 7.0 + 2.0, 5.0 + 2.0, 75, 2, 4),
        ("train", 9.0, 8.0, None, 1, 1),
    ]
    charged = connect(run).execute(
        "select stage, train_seconds, train_work_seconds from stage_walls order by stage"
    )
    assert charged.fetchall() == [("eval", 5.0, 0.0), ("rollout", 9.0, 7.0), ("train", 9.0, 8.0)]
