"""The round loop: rollout -> teacher -> score -> train -> budget, each stage skipped when done.

    opdcache run CONFIG RUN [--rounds R]
    opdcache round RUN --round r
    opdcache replay RUN --variant NAME [scoring params]

A killed run resumes at the stage it was in: every stage's outputs are written atomically and a
stage whose outputs exist is skipped. Each stage's wall time is appended to RUN/stage_times.jsonl
(view ``stage_times``), wall time being the paper's headline metric.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opdcache.arms import plan
from opdcache.budget import BudgetController
from opdcache.config import RunConfig, read_run_config, write_run_config
from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir
from opdcache.score.variant import VariantSpec


class StageTimes:
    """Append-only JSON lines of stage wall times; a torn last line (crash) is ignored by readers."""

    def __init__(self, root: str | Path, label: str = "main"):
        self.path = RunDir(root).root / "stage_times.jsonl"
        self.label = label

    @contextmanager
    def stage(self, r: int, name: str) -> Iterator[dict[str, Any]]:
        info: dict[str, Any] = {"skipped": False}
        t0 = time.perf_counter()
        yield info
        seconds = time.perf_counter() - t0
        row = {
            "run": self.label,
            "round": r,
            "stage": name,
            "seconds": seconds,
            # seconds less fixed start-up costs (vLLM engine start), where a stage reports them
            "work_seconds": seconds - info.get("startup_seconds", 0.0),
            "skipped": info["skipped"],
            "host": socket.gethostname(),
            "finished_at": time.time(),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _scored(run: RunDir, variant: str, r: int) -> bool:
    d = run.variant(variant) / f"round={r}"
    have = {p.name for p in run.shards(d)} if d.is_dir() else set()
    return bool(have) and have == {p.name for p in run.shards(run.cache_round(r))}


def eval_round(root: str | Path, r: int, cfg: RunConfig, label: str = "main") -> dict[str, Any] | None:
    """Avg@n of the checkpoint round r samples from -> RUN/eval/round=r.json (skipped when present)."""
    from opdcache.evaluation import evaluate, read_eval
    from opdcache.rollout.stage import student_checkpoint

    run = RunDir(root).require()
    ec = cfg.eval
    if not ec.data:
        return None
    out = run.eval_result(r)
    with StageTimes(run.root, label).stage(r, "eval") as info:
        info["skipped"] = out.exists()
        if not info["skipped"]:
            evaluate(
                student_checkpoint(run, cfg, r),
                ec.data,
                ec.n,
                ec.temperature,
                ec.max_tokens or cfg.budget.max,
                ec.checker,
                cfg.data.template,
                cfg.data.chat_template,
                cfg.rollout.seed,
                cfg.rollout.kv_cache_gib,
                cfg.rollout.enforce_eager,
                out,
            )
    return dataclasses.asdict(read_eval(out))


def run_rounds(root: str | Path, rounds: int, cfg: RunConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Rounds from the controller's next round up to ``rounds``, evaluating every ``eval.every``."""
    start = BudgetController(root, plan(cfg).budget).state.next_round
    out = []
    for r in range(start, rounds):
        if r % cfg.eval.every == 0:
            eval_round(root, r, cfg)
        out.append(run_round(root, r, cfg, progress))
    eval_round(root, rounds, cfg)
    return out


def run_round(
    root: str | Path,
    r: int,
    cfg: RunConfig,
    progress: bool = True,
    generate: bool = True,
    label: str = "main",
    train: bool = True,
) -> dict[str, Any]:
    """One round of Algorithm 1. With ``generate=False`` (replay) the cache must already hold round r."""
    from opdcache.query import refresh_duckdb_file
    from opdcache.rollout.stage import rollout_round
    from opdcache.score.stage import read_effective_lengths, score_run
    from opdcache.teacher.stage import teacher_round
    from opdcache.train.stage import train_round

    run = RunDir(root).require()
    p = plan(cfg)
    ctl = BudgetController(run.root, p.budget)
    times = StageTimes(run.root, label)
    out: dict[str, Any] = {"round": r, "max_tokens": ctl.max_tokens_for(r)}
    if generate:
        with times.stage(r, "rollout") as info:
            ro = rollout_round(run.root, r, cfg, progress)
            info["skipped"] = ro["tokens"] == 0
            info["startup_seconds"] = ro.get("engine_start_seconds", 0.0)
        with times.stage(r, "teacher") as info:
            info["skipped"] = teacher_round(run.root, r, cfg, progress)["parts"] == 0
    elif not run.shards(run.cache_round(r)):
        raise OpdcacheError(f"{run.cache_round(r)}: no cached rollouts to replay")
    for name, spec in p.variants:
        with times.stage(r, f"score:{name}") as info:
            info["skipped"] = _scored(run, name, r)
            if not info["skipped"]:
                score_run(run.root, name, spec, rounds=[r], progress=progress)
    if train:
        with times.stage(r, "train") as info:
            t = train_round(run.root, r, cfg, p.train_variant, progress)
            info["skipped"] = t["skipped"]
            out["train"] = t
    with times.stage(r, "budget"):
        d = ctl.update(r, read_effective_lengths(run.root, p.budget_variant, r))
    out["decision"] = dataclasses.asdict(d)
    refresh_duckdb_file(run.root)
    return out


def start_run(config_path: str | Path, root: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Create RUN from CONFIG, or check that an existing RUN was made from the same config."""
    from opdcache.config import load_config

    cfg = load_config(config_path, overrides)
    run = RunDir(root)
    existing = read_run_config(run.root) if run.config.exists() else None
    if existing is not None and existing != cfg:
        raise OpdcacheError(
            f"{run.config} differs from {config_path}; resume with the same config, or start a new run directory"
        )
    run.root.mkdir(parents=True, exist_ok=True)
    if existing is None:
        write_run_config(run.root, cfg)
    BudgetController(run.root, plan(cfg).budget).save()
    return cfg


def replay(
    root: str | Path,
    variant: str,
    spec: VariantSpec,
    rounds: list[int] | None = None,
    progress: bool = True,
    train: bool = True,
) -> Path:
    """Re-score the cached rounds as ``variant`` and retrain from the round-0 student, calling no model
    but the student being trained (``train=False``: scores and budget decisions only). Output:
    RUN/replays/<variant>/ (its own scores, checkpoints, budget and stage times; the cache is the
    parent's, linked)."""
    run = RunDir(root).require()
    cfg = read_run_config(run.root)
    if cfg is None:
        raise OpdcacheError(f"{run.root}: no config.yaml to replay")
    cached = run.rounds()
    todo = cached if rounds is None else rounds
    if missing := sorted(set(todo) - set(cached)):
        raise OpdcacheError(f"replay: rounds {missing} are not cached in {run.cache}")
    sub = RunDir(run.root / "replays" / variant)
    sub.root.mkdir(parents=True, exist_ok=True)
    if not sub.cache.exists():
        os.symlink(os.path.relpath(run.cache, sub.root), sub.cache)
    rcfg = dataclasses.replace(
        cfg,
        score=dataclasses.replace(cfg.score, variant=variant, **dataclasses.asdict(spec)),
        arm=dataclasses.replace(cfg.arm, name="prune"),
    )
    if not sub.config.exists():
        write_run_config(sub.root, rcfg)
    # the replay trains on the original rollouts, so its budget merely records what Alg. 1 would decide
    for r in todo:
        run_round(sub.root, r, rcfg, progress, generate=False, label=f"replay:{variant}", train=train)
    return sub.root
