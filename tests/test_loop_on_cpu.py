"""Two full rounds with the real vLLM and DeepSpeed on tiny self-built models; kill -9 and resume."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from opdcache.arms import plan
from opdcache.budget import BudgetController
from opdcache.config import load_config
from opdcache.loop import replay, run_round, start_run
from opdcache.query import connect
from opdcache.rollout import engine
from opdcache.rundir import RunDir
from opdcache.score.stage import read_effective_lengths
from opdcache.train.stage import RENDEZVOUS
from opdcache.variant import VariantSpec
from tests.restated import alg1_step

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")


def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*.parquet")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def looped(tiny_overrides, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("loop") / "run")
    cfg_path = run.root.parent / "cfg.yaml"
    cfg_path.write_text("train:\n  lr: 1.0e-3\n  micro_batch_size: 4\nbudget:\n  step: 16\n  margin: 8\n")
    overrides = list(tiny_overrides)
    cfg = start_run(cfg_path, run, overrides)
    outs = [run_round(run, r, cfg, progress=False) for r in (0, 1)]
    return run, cfg, outs, cfg_path, overrides


def test_two_rounds_end_to_end(looped, models):
    run, cfg, outs, *_ = looped
    for o in outs:
        assert not o.train.skipped and np.isfinite(o.train.loss_first) and np.isfinite(o.train.loss_last)
    before = load_file(models / "student" / "model.safetensors")
    after = load_file(run.checkpoint(2) / "model.safetensors")
    assert max(np.abs(before[k] - after[k]).max() for k in before) > 0  # the checkpoint changed
    assert (run.deepspeed_state(2) / "latest").exists()
    assert run.rounds(run.deepspeed) == [2]  # train.keep_states = 1: round 1's optimizer state is gone
    # in-process training must not leave its rendezvous port to processes started later
    assert not [k for k in RENDEZVOUS if k in os.environ]
    # the controller's decisions are Alg. 1 (restated above, config values spelled out) on the recorded E
    b = {"min": 32, "max": 256, "step": 16, "margin": 8, "rho": 0.1, "patience": 3}
    m, low = 48, 0
    for r, o in enumerate(outs):
        e = read_effective_lengths(run, "prune", r)
        assert o.decision.max_tokens == o.max_tokens == m
        m, low = alg1_step(m, low, e, b)
        assert o.decision.next_max_tokens == m and o.decision.low_hits == low
    con = connect(run)
    stages = con.execute("select round, stage from stage_times order by all").fetchall()
    assert {s for _, s in stages} == {"rollout", "teacher", "score:prune", "train", "budget"}
    assert (
        con.execute("select max(max_tokens) from rollouts where round = 1").fetchone()[0]
        == outs[0].decision.next_max_tokens
    )


def test_rerun_skips_every_finished_stage(looped, monkeypatch):
    run, cfg, outs, cfg_path, overrides = looped
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("rollout engine restarted"))
    again = run_round(run, 1, start_run(cfg_path, run, overrides), progress=False)
    assert again.train.skipped and again.decision == outs[1].decision
    assert BudgetController(run).state.next_round == 2
    with pytest.raises(Exception, match="differs from"):
        start_run(cfg_path, run, overrides + ["score.gamma=0.5"])


def test_kill_during_training_then_resume(looped):
    run, cfg, outs, *_ = looped
    root = run.root
    cache_hash = _tree_hash(run.cache)
    import shutil

    shutil.rmtree(run.checkpoint(2))  # as if round 1's training never finished
    shutil.rmtree(run.deepspeed_state(2))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for delay in (4.0, 2.0, 1.0, 0.5):  # inside model loading / deepspeed.initialize / the steps
        proc = subprocess.Popen(
            [sys.executable, "-m", "opdcache.cli", "train", str(root), "--round", "1", "--quiet"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not run.checkpoint(2).exists():
            break
        shutil.rmtree(run.checkpoint(2))  # finished before the kill: try an earlier moment
        shutil.rmtree(run.deepspeed_state(2))
    assert not run.checkpoint(2).exists()
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]
    out = run_round(run, 1, cfg, progress=False)
    assert not out.train.skipped and (run.checkpoint(2) / "model.safetensors").exists()
    assert out.decision == outs[1].decision  # not advanced twice
    assert len(BudgetController(run).state.history) == 2
    assert _tree_hash(run.cache) == cache_hash  # nothing cached was lost or rewritten
    assert not (run.staging / "checkpoint-2").exists()  # the killed stage's staging was cleaned


def test_replay_uses_only_the_cache(looped, monkeypatch):
    run, *_ = looped
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("replay must not generate"))
    import opdcache.teacher.stage as teacher_stage

    monkeypatch.setattr(
        teacher_stage, "load_teacher", lambda *a, **k: pytest.fail("replay must not call the teacher")
    )
    sub = replay(run, "g09", VariantSpec(gamma=0.9), progress=False)
    assert sub == run.replay("g09") and (sub.checkpoint(2) / "model.safetensors").exists()
    rows = connect(run).execute("select distinct run from stage_times order by 1").fetchall()
    assert rows == [("main",), ("replay:g09",)]


def test_replay_with_another_objective_from_the_same_cache(looped):
    """issue 30: the same cached rounds retrain with the paper's objective (the run trained the default);
    the step logs carry the diagnostics; the replay cannot silently change settings afterwards."""
    from opdcache.config import read_run_config
    from opdcache.errors import OpdcacheError

    run, cfg, *_ = looped
    sub = replay(run, "topk", cfg.score.spec, rounds=[0], progress=False, objective="student-topk")
    assert read_run_config(sub).train.objective == "student-topk" and cfg.train.objective == "sum-and-sample"
    steps = json.loads((sub.checkpoint(1) / "opdcache_train.json").read_text())["metrics"]
    main_steps = json.loads((run.checkpoint(1) / "opdcache_train.json").read_text())["metrics"]
    for m in steps:
        assert 0 < m["rest_mass"] < 1 and 0 < m["student_topk_mass"] <= 1 and m["entropy"] > 0
        assert 0 <= m["sampled_in_rest"] <= 1 and m["clip_frac"] == 0  # ratio 1 at the first step
    assert steps[0]["loss"] != main_steps[0]["loss"]  # another loss on the same rows
    assert steps[0]["tokens"] == main_steps[0]["tokens"]
    with pytest.raises(OpdcacheError, match=r"train.objective"):
        replay(run, "topk", cfg.score.spec, rounds=[0], progress=False, objective="sampled-token")


def test_arms_plan(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    assert plan(cfg).train_variant == "prune"
    opd = plan(load_config(None, tiny_overrides + ["arm.name=opd"]))
    assert (
        opd.budget.initial == opd.budget.min == opd.budget.max == 256 and opd.variants[0][1].metric == "none"
    )
    tr = plan(load_config(None, tiny_overrides + ["arm.name=truncate", "arm.truncate_tokens=64"]))
    assert tr.budget.max == 64
    rnd = plan(load_config(None, tiny_overrides + ["arm.name=random", "arm.random_match=mass"]))
    assert [n for n, _ in rnd.variants] == ["prune", "random"] and rnd.train_variant == "random"
    assert rnd.budget_variant == "prune" and rnd.variants[1][1].match == "mass"
    iw = plan(load_config(None, tiny_overrides + ["arm.name=iw-opd", "score.iw_gamma=0.3"]))
    assert [(n, s.metric, s.iw_gamma) for n, s in iw.variants] == [("iw", "iw", 0.3)]
    assert iw.train_variant == iw.budget_variant == "iw" and iw.budget.initial == iw.budget.max == 256


def test_training_under_the_launcher_with_two_processes(looped, tmp_path, train_cli):
    import shutil

    run, *_ = looped
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root, symlinks=True, ignore=shutil.ignore_patterns("replays"))
    shutil.rmtree(copy.checkpoint(2))
    shutil.rmtree(copy.deepspeed_state(2))
    before = len(copy.stage_times.read_text().splitlines())
    p = train_cli(copy.root, 1, nproc=2)
    assert p.stdout.count("train round 1:") == 2  # both ranks trained
    new = copy.stage_times.read_text().splitlines()[before:]
    assert [(json.loads(x)["stage"], json.loads(x)["round"]) for x in new] == [("train", 1)]  # rank 0's line
    assert (copy.checkpoint(2) / "model.safetensors").exists()
    assert (copy.deepspeed_state(2) / "latest").exists()


@pytest.mark.parametrize("arm", ["opd", "truncate", "random", "iw-opd"])
def test_fixed_and_random_arms_reach_the_engine_with_their_budget(tiny_overrides, tmp_path, monkeypatch, arm):
    """Every stage must use the arm's effective budget config (a fixed budget for opd/truncate)."""
    from opdcache.cli import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(f"arm:\n  name: {arm}\n  truncate_tokens: 40\n")
    run = RunDir(tmp_path / "run")
    start_run(cfg_path, run, tiny_overrides)
    seen = {}

    class Reached(Exception):
        pass

    def fake_llm(*args, **kwargs):
        seen["max_model_len"] = args[2]
        raise Reached

    monkeypatch.setattr(engine, "make_llm", fake_llm)
    with pytest.raises(Reached):  # through the CLI: the budget M_0 is looked up by the caller
        main(["rollout", str(run.root), "--round", "0", "--quiet"])
    expected = {"opd": 256, "truncate": 40, "random": 48, "iw-opd": 256}[arm]  # M_0
    assert BudgetController(run).max_tokens_for(0) == expected
    # the context is sized for the arm's largest budget: longest tiny prompt + the arm's budget.max
    cfg = load_config(cfg_path, tiny_overrides)
    tok = AutoTokenizer.from_pretrained(cfg.models.student)
    questions = [json.loads(line)["question"] for line in Path(cfg.data.prompts).read_text().splitlines()]
    longest = max(
        len(tok(cfg.data.template.format(question=q), add_special_tokens=False).input_ids) for q in questions
    )
    assert seen["max_model_len"] == longest + {"opd": 256, "truncate": 40, "random": 256, "iw-opd": 256}[arm]


def test_a_run_starts_one_engine_for_all_rollouts_and_evaluations(
    tiny_overrides, models, tmp_path, monkeypatch
):
    from opdcache.loop import run_rounds

    starts = []
    real = engine.make_llm
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: starts.append(a[0]) or real(*a, **k))
    run = RunDir(tmp_path / "run")
    sets = [
        *tiny_overrides,
        f"eval.data={models / 'prompts.jsonl'}",
        "eval.n=1",
        "eval.max_tokens=16",
        "eval.checker=exact",
    ]
    cfg = start_run(None, run, sets)
    out = run_rounds(run, 2, cfg, progress=False)
    assert len(out) == 2 and len(starts) == 1  # rounds 0 and 1 sample from different checkpoints
    assert [run.done("eval", r) for r in (0, 1, 2)] == [True, True, True]
    rows = (
        connect(run)
        .execute(
            "select stage, round, seconds - work_seconds from stage_times where stage in ('rollout', 'eval') order by finished_at"
        )
        .fetchall()
    )
    assert [(s, r) for s, r, _ in rows] == [
        ("eval", 0),
        ("rollout", 0),
        ("eval", 1),
        ("rollout", 1),
        ("eval", 2),
    ]
    # the engine starts once, then reloads weights
    assert rows[0][2] > 1.0 and all(0 < startup < rows[0][2] for _, _, startup in rows[1:])
    loads = (
        connect(run)
        .execute(
            "select round, seconds - work_seconds from stage_times where stage = 'teacher' order by round"
        )
        .fetchall()
    )
    assert loads[0][1] > 0 and loads[1][1] < 0.01 * loads[0][1]  # the teacher is loaded once per run


def test_resident_trainer_matches_reloading_from_disk(looped, monkeypatch):
    """A replay keeps its trainer in memory from round 0 to round 1; the same replay with the trainer
    reloaded from disk every round (model, DeepSpeed optimizer state) must train the same weights."""
    import opdcache.train.stage as train_stage

    run, cfg, *_ = looped
    loads = []
    real = train_stage.load_trainer
    monkeypatch.setattr(train_stage, "load_trainer", lambda *a, **k: loads.append(a[1]) or real(*a, **k))
    kept = replay(run, "kept", cfg.score.spec, progress=False)
    assert loads == [0]  # round 1 trained the engine round 0 left in memory
    monkeypatch.setattr(train_stage.ResidentTrainer, "take", lambda self, r: None)
    reloaded = replay(run, "reloaded", cfg.score.spec, progress=False)
    assert loads == [0, 0, 1]
    ours = load_file(kept.checkpoint(2) / "model.safetensors")
    theirs = load_file(reloaded.checkpoint(2) / "model.safetensors")
    first = load_file(kept.checkpoint(1) / "model.safetensors")
    assert max(float(np.abs(first[k] - theirs[k]).max()) for k in theirs) > 1e-4  # round 1 did train
    assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs) < 1e-6
    meta = json.loads((kept.checkpoint(2) / "opdcache_train.json").read_text())
    assert meta["source"] == str(kept.checkpoint(1)) and meta["metrics"]


def test_retention_keeps_the_newest_weights_and_records_the_rest(looped, tmp_path):
    """train.keep_checkpoints = 1: after round 1's training, round 1's weights go, its metrics and a
    removal record stay; verify passes; a stage that needs them says so."""
    import dataclasses
    import shutil

    from opdcache.errors import OpdcacheError
    from opdcache.models.checkpoint import student_checkpoint
    from opdcache.train.stage import train_round
    from opdcache.verify import verify_run

    run, cfg, *_ = looped
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root, symlinks=True, ignore=shutil.ignore_patterns("replays"))
    shutil.rmtree(copy.checkpoint(2))
    shutil.rmtree(copy.deepspeed_state(2))
    one = copy.checkpoint(1)
    sizes = {p.name: p.stat().st_size for p in one.iterdir() if p.name != "opdcache_train.json"}
    metrics = (one / "opdcache_train.json").read_bytes()
    keep1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, keep_checkpoints=1))
    train_round(copy, 1, keep1, "prune", progress=False)
    assert (copy.checkpoint(2) / "model.safetensors").exists()
    assert sorted(p.name for p in one.iterdir()) == ["opdcache_removed.json", "opdcache_train.json"]
    assert (one / "opdcache_train.json").read_bytes() == metrics
    rec = json.loads((one / "opdcache_removed.json").read_text())
    assert rec["round"] == 1 and rec["by"] == "train.keep_checkpoints=1"
    assert sorted(rec["files"]) == sorted(sizes) and rec["bytes"] == sum(sizes.values())
    assert copy.done("train", 0) and copy.rounds(copy.checkpoints) == [1, 2]
    assert [f for f in verify_run(copy, progress=False)[1] if f.severity == "error"] == []
    with pytest.raises(OpdcacheError, match="weights were removed by train.keep_checkpoints=1"):
        student_checkpoint(copy, keep1, 1)
    (copy.checkpoint(2) / "model.safetensors").unlink()  # lost without a record: verify names it
    assert any("checkpoint without weights" in f.problem for f in verify_run(copy, progress=False)[1])


def test_a_lora_student_trains_its_adapter_through_the_rounds(looped, tmp_path, models):
    """train.lora.rank = 4: round 0 starts an adapter, round 1 (loaded from disk) continues it; each
    checkpoint's merged weights are the initial student plus (alpha / r) B A of its adapter."""
    import dataclasses
    import shutil

    from opdcache.config import LoraConfig
    from opdcache.train.stage import train_round

    run, cfg, *_ = looped
    copy = RunDir(tmp_path / "run")
    shutil.copytree(run.root, copy.root, symlinks=True, ignore=shutil.ignore_patterns("replays"))
    shutil.rmtree(copy.checkpoints)
    shutil.rmtree(copy.deepspeed)
    lcfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, lora=LoraConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj")
        ),
    )
    base = load_file(models / "student" / "model.safetensors")
    adapters = []
    for r in (0, 1):
        res = train_round(copy, r, lcfg, "prune", progress=False)  # no resident: round 1 loads from disk
        assert not res.skipped and np.isfinite(res.loss_last)
        ckpt = copy.checkpoint(r + 1)
        adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
        merged = load_file(ckpt / "model.safetensors")
        for k, w in base.items():
            a_key = f"base_model.model.{k.removesuffix('.weight')}.lora_A.weight"
            if a_key in adapter:
                want = w + 2.0 * adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key]
                assert np.allclose(merged[k], want, atol=1e-6), k
            else:
                assert np.array_equal(merged[k], w), f"{k}: not a target, yet changed"
        info = json.loads((ckpt / "opdcache_train.json").read_text())
        assert info["lora_rank"] == 4
        assert info["memory"]["trainable_params"] == sum(v.size for v in adapter.values())
        adapters.append(adapter)
    assert any(not np.array_equal(adapters[0][k], adapters[1][k]) for k in adapters[0] if "lora_B" in k)
    # a replay of a LoRA run trains a LoRA student of its own
    from opdcache.config import write_run_config

    write_run_config(copy, lcfg)
    sub = replay(copy, "lr", lcfg.score.spec, rounds=[0], progress=False)
    assert (sub.checkpoint(1) / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((sub.checkpoint(1) / "opdcache_train.json").read_text())["lora_rank"] == 4
