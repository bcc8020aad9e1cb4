"""Metrics where users look: TensorBoard event files (RUN/tensorboard/) and the same records as lines
of RUN/metrics.jsonl (DuckDB view ``metrics``).

    opdcache metrics RUN        rebuild both (``opdcache run`` and ``opdcache replay`` do after every round)

Everything is read back from the run directory: per optimizer step from
checkpoints/round=<r+1>/opdcache_train.json, per round from stage_times.jsonl (view stage_walls), the
scores of the variant that drives the budget, budget.json and eval/round=<r>.json. Each call rewrites
both files whole (staged, then swapped in), so a resumed or repeated round never logs a step twice.
A replay (RUN/replays/<name>/) writes its own, under its own directory and run label.

Names follow verl's where one exists (``actor/pg_loss``, ``actor/pg_clipfrac``, ``actor/grad_norm``,
``actor/lr``, ``critic/rewards/mean``, ``response_length/mean``, ``timing_s/<stage>``). Per-step scalars
are logged at the global optimizer step (counted over rounds), per-round scalars at the round index.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from opdcache.config import RunConfig, read_run_config
from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir, atomic_write_bytes, replace_dir, temp_path_for

# opdcache_train.json step field -> tag (verl's names where one exists; other fields: actor/<field>)
STEP_TAGS = {
    "loss": "actor/pg_loss",
    "clip_frac": "actor/pg_clipfrac",
    "grad_norm": "actor/grad_norm",
    "reward": "critic/rewards/mean",
    "tokens": "actor/tokens",
    "entropy": "actor/entropy",  # the student's full-vocabulary entropy (verl's actor/entropy)
    "student_topk_mass": "distill/student_topk_mass",
    "rest_mass": "distill/rest_mass",  # P_R, the student's mass outside U = student ∪ teacher top-k
    "teacher_rest_mass": "distill/teacher_rest_mass",  # Q_R
    "rest_log_ratio": "distill/rest_log_ratio",  # l_R = log P_R / Q_R
    "sampled_in_rest": "distill/sampled_in_rest",  # share of sampled tokens in R
    "residual_clamp_frac": "distill/residual_clamp_frac",  # sum-and-sample: |d_y - l_R| clamped
    "teacher_rest_floor_frac": "distill/teacher_rest_floor_frac",  # Q_R at its floor (fp32 noise)
    "sampler_weight": "distill/sampler_weight",  # mean p(y) / p_T(y) (rollouts at T != 1)
}
# budget.json decision field -> tag
BUDGET_TAGS = {
    "max_tokens": "budget/max_tokens",
    "next_max_tokens": "budget/next_max_tokens",
    "hit_ratio": "budget/hit_ratio",
    "effective_len_mean": "reliability/effective_len/mean",
}
EVAL_SKIP = {"round", "n", "prompts", "band", "overlap_by_band", "kl_by_band"}


@dataclass(frozen=True)
class Scalar:
    run: str  # "main" or "replay:<name>"
    kind: str  # "step" (x = global optimizer step) or "round" (x = round)
    step: int
    round: int
    tag: str
    value: float


def collect(run: RunDir, cfg: RunConfig | None = None) -> list[Scalar]:
    """Every scalar of ``run``, read from its files: per optimizer step, then per round (``cfg``: the
    run's config where the caller holds it; else read from RUN/config.yaml)."""
    from opdcache.arms import plan
    from opdcache.query import connect

    label, out, step = run.label, [], 0
    cfg = cfg or read_run_config(run)
    for r in sorted(_trained_rounds(run)):
        info = json.loads((run.checkpoint(r + 1) / "opdcache_train.json").read_text())
        for m in info.get("metrics", []):
            for name, v in m.items():
                if name != "step" and isinstance(v, int | float):
                    out.append(Scalar(label, "step", step, r, STEP_TAGS.get(name, f"actor/{name}"), float(v)))
            if cfg is not None:  # constant: train.lr
                out.append(Scalar(label, "step", step, r, "actor/lr", float(cfg.train.lr)))
            step += 1
        for name in ("old_logprob_max_abs_diff", "old_logprob_mean_abs_diff"):
            if isinstance(info.get(name), int | float):
                out.append(Scalar(label, "round", r, r, f"actor/{name}", float(info[name])))
    con = connect(run)

    def rows(sql: str) -> list[tuple]:
        return con.execute(sql).fetchall()

    def per_round(sql: str, tags: list[str]) -> None:
        for r, *values in rows(sql):
            for tag, v in zip(tags, values, strict=True):
                if v is not None and math.isfinite(float(v)):
                    out.append(Scalar(label, "round", int(r), int(r), tag, float(v)))

    cols = ", ".join(BUDGET_TAGS)
    per_round(f"SELECT round, {cols} FROM budget ORDER BY round", list(BUDGET_TAGS.values()))
    variant = plan(cfg).budget_variant if cfg is not None else ""
    per_round(
        "SELECT round, sum(list_sum(overlap)) / sum(len(overlap)), "
        "sum(list_sum(bad::INTEGER[])) / sum(len(bad)), avg(outcome) "
        f"FROM scores WHERE variant = '{variant}' GROUP BY round ORDER BY round",
        ["reliability/overlap/mean", "reliability/bad_rate", "outcome/mean"],
    )
    per_round(
        "SELECT round, avg(response_len), max(response_len), "
        "avg((finish_reason = 'unreliable')::INTEGER) FROM rollouts GROUP BY round ORDER BY round",
        ["response_length/mean", "response_length/max", "response_length/stopped_unreliable"],
    )
    walls = rows(
        "SELECT round, stage, seconds, work_seconds, generated_tokens, teacher_positions FROM stage_walls "
        f"WHERE run = '{label}' ORDER BY round, stage"
    )
    for r, stage, seconds, work, generated, scored in walls:
        name = stage.replace(":", "/")
        for tag, v in (
            (f"timing_s/{name}", seconds),
            (f"timing_work_s/{name}", work),
            *([("rollout/generated_tokens", generated)] if stage == "rollout" else []),
            *([(f"teacher/positions/{stage}", scored)] if stage in ("rollout", "teacher") else []),
        ):
            if v is not None:
                out.append(Scalar(label, "round", int(r), int(r), tag, float(v)))
    eval_cols = [d[0] for d in con.execute("SELECT * FROM evals LIMIT 0").description]
    numeric = [c for c in eval_cols if c not in EVAL_SKIP]
    per_round(f"SELECT round, {', '.join(numeric)} FROM evals ORDER BY round", [f"eval/{c}" for c in numeric])
    return out


def _trained_rounds(run: RunDir) -> list[int]:
    return [
        r - 1
        for r in run.rounds(run.checkpoints)
        if r >= 1 and (run.checkpoint(r) / "opdcache_train.json").exists()
    ]


def write_metrics(run: RunDir, tensorboard: bool | None = None, cfg: RunConfig | None = None) -> list[Scalar]:
    """Rebuild RUN/metrics.jsonl and (``tensorboard``, default the run's ``log.tensorboard``)
    RUN/tensorboard/ from the run directory; returns the scalars. ``cfg``: the run's config where the
    caller holds it (read once from RUN/config.yaml otherwise)."""
    run.require()
    cfg = cfg or read_run_config(run)
    if tensorboard is None:
        tensorboard = cfg is None or cfg.log.tensorboard
    scalars = collect(run, cfg)
    atomic_write_bytes(
        run.metrics, "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in scalars).encode()
    )
    if tensorboard:
        staged = temp_path_for(run.tensorboard)
        _write_events(staged, scalars)
        replace_dir(staged, run.tensorboard)
    return scalars


def _write_events(logdir: Path, scalars: list[Scalar]) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise OpdcacheError(
            f"TensorBoard files need the tensorboard package ({e}); pip install tensorboard"
        ) from e
    import shutil

    shutil.rmtree(logdir, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for s in scalars:
            writer.add_scalar(s.tag, s.value, s.step)
    finally:
        writer.close()
