"""Kill -9 at seeded random moments of each stage, then rerun: the suite of issue #6.

After every kill: every Parquet part visible to readers is complete (its integrity record and full
read check out), finished parts were not recomputed (same inode and mtime), and the budget
controller never decided a round twice. Then the same command, rerun, completes.
Trials per stage: OPDCACHE_FAULT_TRIALS (default 20; train a quarter, the vLLM rollout a tenth of it).
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opdcache.budget import BudgetController
from opdcache.cache.synthetic import write_synthetic_run
from opdcache.config import load_config, write_run_config
from opdcache.rundir import RunDir
from opdcache.verify import verify_run

TRIALS = int(os.environ.get("OPDCACHE_FAULT_TRIALS", "12"))  # 20 cost ~4 min more of CI
pytestmark = pytest.mark.slow


def _cli(*args):
    return [sys.executable, "-m", "opdcache.cli", *map(str, args)]


def _kill_after(cmd, delay):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.perf_counter()
    while p.poll() is None and time.perf_counter() - t0 < delay:
        time.sleep(0.01)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return p.returncode


def _duration(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def _stamps(d: Path):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.rglob("*.parquet")} if d.exists() else {}


def _assert_consistent(root: Path):
    n, findings = verify_run(RunDir(root), progress=False)
    assert [f for f in findings if f.severity == "error"] == [], findings


def _trials(cmd, root, max_delay, trials, seed, watched):
    rng = random.Random(seed)
    killed = 0
    for _ in range(trials):
        before = _stamps(watched)
        killed += _kill_after(cmd, rng.uniform(0.05, max_delay)) != 0
        _assert_consistent(root)
        after = _stamps(watched)
        assert all(after.get(p) == s for p, s in before.items() if p in after), (
            "a finished part was rewritten"
        )
        assert set(before) <= set(after), "a finished part disappeared"
    return killed


def test_score_stage_survives_kills(tmp_path):
    run = write_synthetic_run(
        tmp_path / "run",
        rounds=2,
        parts_per_round=6,
        prompts_per_part=20,
        mean_len=800,
        max_tokens=2048,
        k=16,
        vocab=50_000,
    )
    rng = random.Random(1)
    full = _duration(_cli("score", run.root, "--variant", "v", "--gamma", "0.7", "--quiet"))
    killed = 0
    for _ in range(TRIALS):  # alternate settings so every trial really rewrites the variant
        cmd = _cli(
            "score", run.root, "--variant", "v", "--gamma", f"{0.5 + 0.4 * rng.random():.3f}", "--quiet"
        )
        killed += _kill_after(cmd, rng.uniform(0.05, full)) != 0
        _assert_consistent(run.root)
        v = run.variant("v")
        if v.exists():  # old or new, never a mix: one gamma across all parts, every cache part scored
            from opdcache.score.stage import read_variant_params

            gammas = {read_variant_params(p)["gamma"] for p in v.rglob("*.parquet")}
            assert len(gammas) == 1
            assert len(list(v.rglob("*.parquet"))) == 12
    assert killed >= max(1, TRIALS // 4)
    assert subprocess.run(_cli("score", run.root, "--variant", "v", "--quiet")).returncode == 0
    assert not [p for p in run.staging.iterdir()] if run.staging.exists() else True


def test_budget_is_never_decided_twice(tmp_path):
    run = write_synthetic_run(
        tmp_path / "run", rounds=3, parts_per_round=1, prompts_per_part=4, k=8, vocab=500
    )
    subprocess.run(_cli("score", run.root, "--quiet"), check=True)
    full = _duration(_cli("budget", run.root))  # shows the state only; about the decision's time
    rng = random.Random(2)
    for r in range(3):
        for _ in range(max(1, TRIALS // 3)):
            _kill_after(_cli("budget", run.root, "--round", r), rng.uniform(0.05, full))
            history = BudgetController(run.root).state.history
            assert [d.round for d in history] == list(range(len(history)))  # no round twice, none skipped
        subprocess.run(_cli("budget", run.root, "--round", r), check=True, capture_output=True)
        assert len(BudgetController(run.root).state.history) == r + 1


@pytest.fixture
def teacher_run(tiny_overrides, rollout_parts_from, tmp_path):
    """A run whose rollouts/ holds student parts (copied from a synthetic cache) for the tiny teacher."""
    src = write_synthetic_run(
        tmp_path / "src",
        rounds=1,
        parts_per_round=8,
        prompts_per_part=3,
        mean_len=60,
        max_tokens=128,
        k=8,
        vocab=80,
    )
    root = tmp_path / "run"
    cfg = load_config(None, tiny_overrides)
    root.mkdir()
    write_run_config(root, cfg)
    rollout_parts_from(src.shards(src.cache_round(0)), RunDir(root).rollout_round(0))
    return root


def test_token_ids_beyond_the_teacher_vocabulary_are_refused(tiny_overrides, rollout_parts_from, tmp_path):
    from opdcache.errors import OpdcacheError
    from opdcache.teacher.stage import teacher_round

    src = write_synthetic_run(
        tmp_path / "src",
        rounds=1,
        parts_per_round=1,
        prompts_per_part=2,
        mean_len=20,
        max_tokens=40,
        k=8,
        vocab=5000,
    )
    root = tmp_path / "run"
    rollout_parts_from(src.shards(src.cache_round(0)), RunDir(root).rollout_round(0))
    with pytest.raises(OpdcacheError, match="holds token id .* the teacher tokenizer has"):
        teacher_round(RunDir(root), 0, load_config(None, tiny_overrides), progress=False)
    assert not (root / "cache").exists()


def test_teacher_stage_survives_kills(teacher_run):
    root = teacher_run
    probe = root.parent / "probe"
    shutil.copytree(root, probe)
    full = _duration(_cli("teacher", probe, "--round", 0, "--quiet"))
    killed = _trials(_cli("teacher", root, "--round", 0, "--quiet"), root, full, TRIALS, 3, root / "cache")
    subprocess.run(_cli("teacher", root, "--round", 0, "--quiet"), check=True, capture_output=True)
    assert len(list((root / "cache" / "round=0").glob("*.parquet"))) == 8
    assert not list((root / "rollouts" / "round=0").glob("*.parquet"))
    _assert_consistent(root)
    assert killed >= 1


def test_train_stage_survives_kills(teacher_run):
    root = teacher_run
    subprocess.run(_cli("teacher", root, "--round", 0, "--quiet"), check=True, capture_output=True)
    subprocess.run(_cli("score", root, "--quiet"), check=True, capture_output=True)
    cache = _stamps(root / "cache")
    rng = random.Random(4)
    probe = root.parent / "probe"
    shutil.copytree(root, probe)
    full = _duration(_cli("train", probe, "--round", 0, "--quiet"))
    trials = max(1, TRIALS // 4)
    for _ in range(trials):
        _kill_after(_cli("train", root, "--round", 0, "--quiet"), rng.uniform(0.05, full))
        ckpt = root / "checkpoints" / "round=1"
        assert not ckpt.exists() or (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
        if ckpt.exists():  # finished despite the kill: start over so the next trial has work to do
            shutil.rmtree(ckpt)
            shutil.rmtree(root / "deepspeed" / "round=1", ignore_errors=True)
    subprocess.run(_cli("train", root, "--round", 0, "--quiet"), check=True, capture_output=True)
    assert (root / "checkpoints" / "round=1" / "model.safetensors").exists()
    assert _stamps(root / "cache") == cache  # training never touches the cache


def test_rollout_stage_survives_kills(tiny_overrides, tmp_path):
    pytest.importorskip("vllm")
    root = tmp_path / "run"
    sets = tiny_overrides + ["rollout.part_size=2"]
    subprocess.run(
        _cli("init", root, *[x for s in sets for x in ("--set", s)]), check=True, capture_output=True
    )
    probe = tmp_path / "probe"
    shutil.copytree(root, probe)
    full = _duration(_cli("rollout", probe, "--round", 0, "--quiet"))
    trials = max(2, TRIALS // 10)
    _trials(_cli("rollout", root, "--round", 0, "--quiet"), root, full, trials, 5, root / "rollouts")
    subprocess.run(_cli("rollout", root, "--round", 0, "--quiet"), check=True, capture_output=True)
    assert len(list((root / "rollouts" / "round=0").glob("*.parquet"))) == 3
    _assert_consistent(root)


@pytest.mark.parametrize("arm", ["prune-grpo", "prune-inflight"])
def test_run_with_its_persistent_engine_survives_kills(tiny_overrides, tmp_path, arm):
    """`opdcache run` keeps one engine and one teacher across rounds; kill -9 anywhere, rerun, same end.
    prune-grpo runs every stage plain Prune-OPD does (the default objective, sum-and-sample) and also
    grades every response in its score stage and trains the gated objective; prune-inflight streams and
    aborts requests and writes cache parts from the rollout. (Plain prune, a subset of prune-grpo's
    stages, was a third case: ~90 s of CI for nothing the two do not cover.)"""
    pytest.importorskip("vllm")
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    extra = ["score.w_drop=0.1"] if arm == "prune-inflight" else []  # stops (and aborts) within 48 tokens
    sets = [
        x for s in [*tiny_overrides, f"arm.name={arm}", "eval.checker=exact", *extra] for x in ("--set", s)
    ]
    probe, root = tmp_path / "probe", tmp_path / "run"
    full = _duration(_cli("run", cfg, probe, "--rounds", 2, "--quiet", *sets))
    cmd = _cli("run", cfg, root, "--rounds", 2, "--quiet", *sets)
    rng = random.Random(6)
    for _ in range(max(2, TRIALS // 10)):
        _kill_after(cmd, rng.uniform(0.2 * full, full))
        if root.exists():
            _assert_consistent(root)
            if (root / "budget.json").exists():
                rounds = [d.round for d in BudgetController(root).state.history]
                assert rounds == list(range(len(rounds)))  # never decided twice, never skipped
    subprocess.run(cmd, check=True, capture_output=True)
    assert [d.round for d in BudgetController(root).state.history] == [0, 1]
    assert (RunDir(root).checkpoint(2) / "model.safetensors").exists()
    _assert_consistent(root)
    if arm == "prune-inflight":  # parts came complete from the rollout; some samples were stopped
        from opdcache.query import run_sql

        assert not list((root / "rollouts").rglob("*.parquet"))
        assert (
            run_sql(root, "SELECT count(*) FROM rollouts WHERE finish_reason = 'unreliable'").fetchall()[0][0]
            > 0
        )
    if arm == "prune-grpo":  # both rounds graded: outcome columns in every score part
        from opdcache.query import run_sql

        assert run_sql(root, "SELECT count(DISTINCT round), count(outcome) > 0 FROM scores").fetchall() == [
            (2, True)
        ]


def _report_run(tmp_path):
    import json

    from opdcache.cli import main
    from opdcache.rundir import RunDir

    run = write_synthetic_run(
        tmp_path / "run",
        rounds=3,
        parts_per_round=2,
        prompts_per_part=6,
        mean_len=300,
        max_tokens=512,
        k=8,
        vocab=5000,
    )
    assert main(["init", str(run.root), "--set", "budget.initial=256", "--set", "budget.min=64"]) == 0
    assert main(["score", str(run.root), "--quiet"]) == 0
    for r in range(3):
        assert main(["budget", str(run.root), "--round", str(r)]) == 0
        p = RunDir(run.root).eval_result(r)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(
            json.dumps(
                {
                    "accuracy": 0.1 * r,
                    "pass_at_n": 0.2,
                    "n": 2,
                    "prompts": 4,
                    "mean_response_tokens": 9.0,
                    "truncated": 0.0,
                    "seconds": 1.0,
                }
            )
        )
    assert (
        main(["replay", str(run.root), "--variant", "g0.8", "--gamma", "0.8", "--no-train", "--quiet"]) == 0
    )
    return run.root


def test_report_survives_kills(tmp_path):
    root = _report_run(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    full = _duration(_cli("report", root, "--out", ref, "--band-scale", 64, "--bucket", 64))
    expected = {p.name: p.read_bytes() for p in ref.iterdir()}
    assert "report.md" in expected and sum(n.endswith(".png") for n in expected) == 5
    cmd = _cli("report", root, "--out", out, "--band-scale", 64, "--bucket", 64)
    rng = random.Random(5)
    killed = 0
    for _ in range(TRIALS):
        shutil.rmtree(out, ignore_errors=True)
        killed += _kill_after(cmd, rng.uniform(0.05, full)) != 0
        visible = [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
        for p in visible:  # every file a reader can see is complete
            assert p.name in expected, p
            if p.suffix == ".png":
                data = p.read_bytes()
                assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), p
            else:
                assert p.read_bytes() == expected[p.name], p
        assert subprocess.run(cmd, capture_output=True).returncode == 0  # the rerun completes
        assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == set(expected)
    assert killed >= max(1, TRIALS // 4)
