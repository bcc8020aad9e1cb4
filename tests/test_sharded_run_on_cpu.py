"""`opdcache run` under torchrun: the stages of every round sharded over the ranks, training across
them, rank 0 alone creating the run, evaluating and deciding the budget; killed and relaunched."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

from opdcache.cli import main
from opdcache.errors import OpdcacheError
from opdcache.loop import check_run_config, start_run
from opdcache.rundir import RunDir
from opdcache.score.stage import read_effective_lengths
from tests.restated import alg1_step

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# the tiny run of test_loop_on_cpu.py's `looped` (it trains), evaluated every round on its own prompts
CONFIG = "train:\n  lr: 1.0e-3\n  micro_batch_size: 4\nbudget:\n  step: 16\n  margin: 8\n"


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A launch, its output appended to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("a") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def _kill(p: subprocess.Popen) -> None:
    """SIGKILL a launch and everything it started: torchrun starts each rank in a session of its own,
    so killing torchrun's process group would leave the ranks (and the run lock) alive."""
    import psutil  # a dependency of vLLM

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    p.wait()


def _finish(p: subprocess.Popen, log: Path, timeout: float) -> int:
    """Wait for ``p``; past ``timeout`` (a rank hung in a collective) kill it all and fail."""
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(p)
        pytest.fail(f"timed out after {timeout} s:\n{log.read_text()[-4000:]}")


def _run_cmd(nproc: int, cfg: Path, root: Path, rounds: int, sets: list[str]) -> list[str]:
    launcher = [TORCHRUN, "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    flags = [x for s in sets for x in ("--set", s)]
    return [
        *launcher,
        "-m",
        "opdcache.cli",
        "run",
        str(cfg),
        str(root),
        "--rounds",
        str(rounds),
        *flags,
        "--quiet",
    ]


def _rows(d: Path) -> dict[str, list[list[int]]]:
    return {
        p.name: pq.read_table(p, columns=["response_ids"]).column(0).to_pylist()
        for p in sorted(d.glob("part-*.parquet"))
    }


def test_a_worker_with_another_config_is_refused(tiny_overrides, tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = start_run(None, run, tiny_overrides)
    assert check_run_config(None, run, tiny_overrides) == cfg
    with pytest.raises(OpdcacheError, match="launch every worker with the same config"):
        check_run_config(None, run, [*tiny_overrides, "score.gamma=0.5"])
    with pytest.raises(OpdcacheError, match="missing after worker 0"):
        check_run_config(None, RunDir(tmp_path / "elsewhere"), tiny_overrides)


@pytest.mark.parametrize("command", ["round", "replay"])
def test_one_process_commands_refuse_a_launcher(tiny_overrides, tmp_path, monkeypatch, capsys, command):
    run = RunDir(tmp_path / "run")
    start_run(None, run, tiny_overrides)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--round", "0"] if command == "round" else ["--variant", "g09"]
    assert main([command, str(run.root), *args, "--quiet"]) == 2
    assert "runs in one process, not under a launcher" in capsys.readouterr().err


def test_ranks_meet_and_a_rank_with_another_config_stops_the_run(tiny_overrides, tmp_path):
    """No engine starts (--rounds 0): rank 0 creates the run, the ranks meet at the barrier, rank 1
    checks its config (launched with another gamma when DIFFER is set) against the run's."""
    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys\nfrom opdcache.cli import main\n"
        "other = os.environ.get('DIFFER') and os.environ['RANK'] == '1'\n"
        "sys.exit(main([*sys.argv[1:], *(['--set', 'score.gamma=0.5'] if other else [])]))\n"
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    for differ in (False, True):
        root, log = tmp_path / f"run{differ:d}", tmp_path / f"launch{differ:d}.log"
        args = _run_cmd(1, cfg, root, 0, tiny_overrides)[3:]  # run CFG ROOT --rounds 0 ...
        env = {"DIFFER": "1"} if differ else {}
        p = _start([TORCHRUN, "--nproc_per_node", "2", str(script), *args], log, env)
        assert (_finish(p, log, 240) != 0) == differ, log.read_text()[-4000:]
        assert (root / "config.yaml").exists() and (root / "budget.json").exists()
        assert ("launch every worker with the same config" in log.read_text()) == differ


@pytest.fixture(scope="module")
def sharded(tiny_overrides, models, tmp_path_factory):
    """The same 2-round run (evaluated every round) by one process and by 2 ranks under torchrun, the
    latter killed in round 1 once a part has landed and relaunched."""
    pytest.importorskip("vllm")
    pytest.importorskip("deepspeed")
    d = tmp_path_factory.mktemp("sharded")
    cfg = d / "cfg.yaml"
    cfg.write_text(CONFIG)
    sets = [
        *tiny_overrides,
        f"eval.data={models / 'prompts.jsonl'}",
        "eval.n=1",
        "eval.max_tokens=16",
        "eval.checker=exact",
    ]
    one, two = RunDir(d / "one"), RunDir(d / "two")
    t0 = time.time()
    p = _start(_run_cmd(1, cfg, one.root, 2, sets), d / "one.log")
    assert _finish(p, d / "one.log", 400) == 0, (d / "one.log").read_text()[-4000:]
    t1 = time.time()
    log = d / "two.log"
    p = _start(_run_cmd(2, cfg, two.root, 2, sets), log)
    deadline, intruder = time.time() + 400, None
    while p.poll() is None and time.time() < deadline:
        if any(two.rollout_round(1).glob("part-*.parquet")) or any(two.cache_round(1).glob("part-*.parquet")):
            break
        if intruder is None and two.config.exists():  # rank 0 holds the run lock: another writer
            cmd = [sys.executable, "-m", "opdcache.cli", "budget", str(two.root), "--round", "0"]
            intruder = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        time.sleep(0.2)
    killed = p.poll() is None
    if killed:  # the whole launch, as a node failure would: torchrun, the ranks, their engines
        _kill(p)
    p = _start(_run_cmd(2, cfg, two.root, 2, sets), log)
    assert _finish(p, log, 400) == 0, log.read_text()[-4000:]
    print(f"1 process: {t1 - t0:.0f} s; 2 ranks, killed and relaunched: {time.time() - t1:.0f} s")
    return one, two, killed, log, intruder


@pytest.mark.slow
def test_two_ranks_make_the_rounds_of_one_process(sharded):
    one, two, killed, *_ = sharded
    assert killed, "the first launch finished before round 1 had a part: nothing was resumed"
    # round 1 samples from checkpoint 1, which 2 ranks train to within float rounding of 1 process
    # (other micro-batches, reduction order), so its samples are the same too
    for r in (0, 1):
        ours, theirs = _rows(two.cache_round(r)), _rows(one.cache_round(r))
        assert sorted(ours) == sorted(theirs) and len(ours) == 2  # 6 prompts, parts of 4
        for name in ours:
            assert ours[name] == theirs[name], (r, name)
    for name in _rows(two.cache_round(0)):  # round 0: every column, teacher's included
        assert pq.read_table(two.cache_round(0) / name).equals(pq.read_table(one.cache_round(0) / name))
    for r in (1, 2):
        ours, theirs = (load_file(d.checkpoint(r) / "model.safetensors") for d in (two, one))
        assert max(np.abs(ours[k] - theirs[k]).max() for k in ours) < 1e-6, r
        meta = json.loads((two.checkpoint(r) / "opdcache_train.json").read_text())
        assert meta["world_size"] == 2 and meta["metrics"][0]["tokens"] > 0
    assert [two.done("eval", r) for r in (0, 1, 2)] == [True, True, True]
    assert not any(two.rollout_round(1).glob("*.parquet"))  # the teacher completed every part


@pytest.mark.slow
def test_every_rank_records_its_stages_and_rank_0_the_rest(sharded):
    _, two, *_ = sharded
    lines = [json.loads(x) for x in two.stage_times.read_text().splitlines()]
    for r in (0, 1):
        mine = [x for x in lines if x["round"] == r]
        for stage in ("rollout", "teacher", "score:prune"):
            assert {x["shard"] for x in mine if x["stage"] == stage} == {"0/2", "1/2"}, (r, stage)
        for stage in ("train", "budget", "eval"):
            done = [x for x in mine if x["stage"] == stage and not x["skipped"]]
            assert len(done) == 1 and "shard" not in done[0], (r, stage)


@pytest.mark.slow
def test_rank_0_decides_the_budget_by_algorithm_1(sharded):
    one, two, *_ = sharded
    state = json.loads(two.budget.read_text())
    b = {"min": 32, "max": 256, "step": 16, "margin": 8, "rho": 0.1, "patience": 3}
    m, low = 48, 0
    assert [d["round"] for d in state["history"]] == [0, 1] and state["next_round"] == 2
    for d in state["history"]:
        assert d["max_tokens"] == m
        m, low = alg1_step(m, low, read_effective_lengths(two, "prune", d["round"]), b)
        assert (d["next_max_tokens"], d["low_hits"]) == (m, low)
    assert state["history"] == json.loads(one.budget.read_text())["history"]


@pytest.mark.slow
def test_the_sharded_run_verifies(sharded):
    _, two, _, log, _ = sharded
    p = subprocess.run(
        [sys.executable, "-m", "opdcache.cli", "verify", str(two.root), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "parts OK" in p.stdout
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_rank_0_holds_the_run_lock_against_other_writers(sharded):
    *_, intruder = sharded
    assert intruder is not None and intruder.returncode == 2, intruder
    assert "another opdcache process is writing this run" in intruder.stderr
