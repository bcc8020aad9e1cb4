"""Two full rounds with the real vLLM and DeepSpeed on tiny self-built models; kill -9 and resume."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from opdcache.arms import plan
from opdcache.budget import BudgetController, decide
from opdcache.config import load_config
from opdcache.loop import replay, run_round, start_run
from opdcache.query import connect
from opdcache.rollout import engine
from opdcache.score.stage import read_effective_lengths
from opdcache.score.variant import VariantSpec
from opdcache.train.stage import RENDEZVOUS
from tests.conftest import tiny_run_overrides

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")


def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*.parquet")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def looped(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop") / "run"
    cfg_path = root.parent / "cfg.yaml"
    cfg_path.write_text("train:\n  lr: 1.0e-3\n  micro_batch_size: 4\nbudget:\n  step: 16\n  margin: 8\n")
    overrides = tiny_run_overrides(models)
    cfg = start_run(cfg_path, root, overrides)
    outs = [run_round(root, r, cfg, progress=False) for r in (0, 1)]
    return root, cfg, outs, cfg_path, overrides


def test_two_rounds_end_to_end(looped, models):
    root, cfg, outs, *_ = looped
    for o in outs:
        assert (
            not o["train"]["skipped"]
            and np.isfinite(o["train"]["loss_first"])
            and np.isfinite(o["train"]["loss_last"])
        )
    before = load_file(models / "student" / "model.safetensors")
    after = load_file(root / "checkpoints" / "round=2" / "model.safetensors")
    assert max(np.abs(before[k] - after[k]).max() for k in before) > 0  # the checkpoint changed
    assert (root / "deepspeed" / "round=2" / "latest").exists()
    # in-process training must not leave its rendezvous port to processes started later
    assert not [k for k in RENDEZVOUS if k in os.environ]
    # the controller's decisions are Alg. 1 on the recorded effective lengths
    p = plan(cfg)
    m, low = p.budget.initial, 0
    for r, o in enumerate(outs):
        d = decide(p.budget, r, m, low, read_effective_lengths(root, p.budget_variant, r))
        assert o["decision"]["next_max_tokens"] == d.next_max_tokens and o["decision"]["max_tokens"] == m
        m, low = d.next_max_tokens, d.low_hits
    con = connect(root)
    stages = con.execute("select round, stage from stage_times order by all").fetchall()
    assert {s for _, s in stages} == {"rollout", "teacher", "score:prune", "train", "budget"}
    assert (
        con.execute("select max(max_tokens) from rollouts where round = 1").fetchone()[0]
        == outs[0]["decision"]["next_max_tokens"]
    )


def test_rerun_skips_every_finished_stage(looped, monkeypatch):
    root, cfg, outs, cfg_path, overrides = looped
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("rollout engine restarted"))
    again = run_round(root, 1, start_run(cfg_path, root, overrides), progress=False)
    assert again["train"]["skipped"] and again["decision"] == outs[1]["decision"]
    assert BudgetController(root).state.next_round == 2
    with pytest.raises(Exception, match="differs from"):
        start_run(cfg_path, root, overrides + ["score.gamma=0.5"])


def test_kill_during_training_then_resume(looped):
    root, cfg, outs, *_ = looped
    cache_hash = _tree_hash(root / "cache")
    import shutil

    shutil.rmtree(root / "checkpoints" / "round=2")  # as if round 1's training never finished
    shutil.rmtree(root / "deepspeed" / "round=2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "opdcache.cli", "train", str(root), "--round", "1", "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    time.sleep(4.0)  # inside model loading / deepspeed.initialize / the steps
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "checkpoints" / "round=2").exists()
    assert not [p for p in (root / "checkpoints").iterdir() if p.name.startswith(".")]
    out = run_round(root, 1, cfg, progress=False)
    assert not out["train"]["skipped"] and (root / "checkpoints" / "round=2" / "model.safetensors").exists()
    assert out["decision"] == outs[1]["decision"]  # not advanced twice
    assert len(BudgetController(root).state.history) == 2
    assert _tree_hash(root / "cache") == cache_hash  # nothing cached was lost or rewritten
    assert not (root / ".staging" / "checkpoint-2").exists()  # the killed stage's staging was cleaned


def test_replay_uses_only_the_cache(looped, monkeypatch):
    root, *_ = looped
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("replay must not generate"))
    import opdcache.teacher.stage as teacher_stage

    monkeypatch.setattr(
        teacher_stage, "load_teacher", lambda *a, **k: pytest.fail("replay must not call the teacher")
    )
    sub = replay(root, "g09", VariantSpec(gamma=0.9), progress=False)
    assert (sub / "checkpoints" / "round=2" / "model.safetensors").exists()
    rows = connect(root).execute("select distinct run from stage_times order by 1").fetchall()
    assert rows == [("main",), ("replay:g09",)]


def test_arms_plan(models):
    cfg = load_config(None, tiny_run_overrides(models))
    assert plan(cfg).train_variant == "prune"
    opd = plan(load_config(None, tiny_run_overrides(models) + ["arm.name=opd"]))
    assert (
        opd.budget.initial == opd.budget.min == opd.budget.max == 256 and opd.variants[0][1].metric == "none"
    )
    tr = plan(load_config(None, tiny_run_overrides(models) + ["arm.name=truncate", "arm.truncate_tokens=64"]))
    assert tr.budget.max == 64
    rnd = plan(load_config(None, tiny_run_overrides(models) + ["arm.name=random", "arm.random_match=mass"]))
    assert [n for n, _ in rnd.variants] == ["prune", "random"] and rnd.train_variant == "random"
    assert rnd.budget_variant == "prune" and rnd.variants[1][1].match == "mass"


def test_training_under_the_launcher_with_two_processes(looped, tmp_path):
    import shutil

    root, *_ = looped
    copy = tmp_path / "run"
    shutil.copytree(root, copy, symlinks=True, ignore=shutil.ignore_patterns("replays"))
    shutil.rmtree(copy / "checkpoints" / "round=2")
    shutil.rmtree(copy / "deepspeed" / "round=2")
    torchrun = Path(sys.executable).with_name("torchrun")
    p = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "opdcache.cli",
            "train",
            str(copy),
            "--round",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("train round 1:") == 2  # both ranks trained
    assert (copy / "checkpoints" / "round=2" / "model.safetensors").exists()
    assert (copy / "deepspeed" / "round=2" / "latest").exists()


@pytest.mark.parametrize("arm", ["opd", "truncate", "random"])
def test_fixed_and_random_arms_reach_the_engine_with_their_budget(models, tmp_path, monkeypatch, arm):
    """Every stage must use the arm's effective budget config (a fixed budget for opd/truncate)."""
    from opdcache.rollout.stage import rollout_round

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(f"arm:\n  name: {arm}\n  truncate_tokens: 40\n")
    cfg = start_run(cfg_path, tmp_path / "run", tiny_run_overrides(models))
    seen = {}

    class Reached(Exception):
        pass

    def fake_llm(*args, **kwargs):
        seen["max_model_len"] = args[2]
        raise Reached

    monkeypatch.setattr(engine, "make_llm", fake_llm)
    with pytest.raises(Reached):
        rollout_round(tmp_path / "run", 0, cfg, progress=False)
    expected = {"opd": 256, "truncate": 40, "random": 48}[arm]
    assert BudgetController(tmp_path / "run").max_tokens_for(0) == expected
