"""``opdcache verify RUN``: check every part of a run against what was recorded when it was written.

Per Parquet part (cache, rollouts, scores): the integrity record exists, bytes, rows and sha256
match, every page decodes with its checksum, the schema version, columns, types and list lengths
are right, log-probs are finite; score parts have the rows of their cache part; all cache parts
share k; the budget state parses; every student checkpoint holds its weights or the record of their
removal (``train.keep_checkpoints``). Also reports leftovers of interrupted writes and score rounds
with fewer parts than the cache (notes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from opdcache.budget import BudgetController
from opdcache.cache.schema import CACHE_COLUMNS, ROLLOUT_COLUMNS, score_columns
from opdcache.cache.shards import (
    check_finite,
    check_manifest,
    flat,
    manifest_path,
    read_cache_shard,
    read_score_shard,
    read_variant_params,
)
from opdcache.errors import OpdcacheError
from opdcache.rundir import RunDir, round_dir


@dataclass
class Finding:
    path: str
    problem: str
    severity: str = "error"  # or "note"


def verify_run(run: RunDir, progress: bool = True) -> tuple[int, list[Finding]]:
    """Returns (parts checked, findings)."""
    run.require()
    findings: list[Finding] = []
    parts = run.parts()
    ks: dict[int, str] = {}
    for kind, r, path in tqdm(parts, desc="verify", unit="part", disable=not progress):
        try:
            check_manifest(path, full=True)
            if kind == "score":
                _verify_score(run, path, r)
            else:
                spec = CACHE_COLUMNS if kind == "cache" else ROLLOUT_COLUMNS
                table, meta = read_cache_shard(path, rollout=kind == "rollout")
                check_finite(table, spec, str(path))
                if kind == "cache":
                    ks.setdefault(meta.k, str(path))
        except OpdcacheError as e:
            findings.append(Finding(str(path), str(e)))
    if len(ks) > 1:
        findings.append(
            Finding(
                str(run.cache), "parts disagree on k: " + ", ".join(f"k={k} in {p}" for k, p in ks.items())
            )
        )
    for base in (run.cache, run.rollouts, run.scores):
        if base.is_dir():
            for m in base.rglob("_*.parquet.json"):
                part = m.with_name(m.name[1:-5])
                if part.exists():
                    continue
                if base == run.scores or (
                    base == run.cache and not (run.rollouts / part.parent.name / part.name).exists()
                ):
                    # the teacher stage removes the rollout part only after the cache part is in place;
                    # a score round is read whole or not at all, so its record alone is a lost part too
                    findings.append(
                        Finding(str(part), f"missing, though its integrity record {m.name} remains")
                    )
                else:
                    findings.append(
                        Finding(
                            str(m),
                            "integrity record without its part (write interrupted before the rename)",
                            "note",
                        )
                    )
            for t in base.rglob(".*.tmp"):
                findings.append(
                    Finding(str(t), "temporary file of an interrupted write (invisible to readers)", "note")
                )
    if run.scores.is_dir():  # a sharded score stopped early leaves a round with some parts only
        for vdir in sorted(d for d in run.scores.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for r in run.rounds(vdir):
                have = len(run.shards(vdir / round_dir(r)))
                want = sum(manifest_path(p).exists() for p in run.shards(run.cache_round(r)))  # not foreign
                if have < want:
                    findings.append(
                        Finding(
                            str(vdir / round_dir(r)),
                            f"{have} of {want} cache parts scored (a sharded score not finished; rerun "
                            f"`opdcache score {run.root} --variant {vdir.name} --rounds {r}`)",
                            "note",
                        )
                    )
    findings += _verify_checkpoints(run)
    if run.budget.exists():
        try:
            BudgetController(run.root)
        except OpdcacheError as e:
            findings.append(Finding(str(run.budget), str(e)))
    return len(parts), findings


def _verify_checkpoints(run: RunDir) -> list[Finding]:
    """Each trained checkpoint holds its weights, or the record of their removal (train.keep_checkpoints)."""
    from opdcache.models.checkpoint import REMOVED, removal

    out = []
    for r in run.rounds(run.checkpoints):
        d = run.checkpoint(r)
        rec = removal(d)
        if rec is not None:
            if "round" not in rec:
                out.append(Finding(str(d / REMOVED), "removal record does not parse"))
            continue
        if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
            out.append(Finding(str(d), f"checkpoint without weights and no removal record ({REMOVED})"))
    return out


def remade_by(run: RunDir, path: Path) -> str:
    """Which command re-makes ``path`` once it is moved aside."""
    rel = path.relative_to(run.root).parts
    rnd = next((p.split("=", 1)[1] for p in rel if p.startswith("round=")), "R")
    if rel[0] == "cache":
        return (
            f"`opdcache rollout {run.root} --round {rnd}` then `opdcache teacher {run.root} --round {rnd}` "
            "(per-request seeds: the same samples)"
        )
    if rel[0] == "rollouts":
        return f"`opdcache rollout {run.root} --round {rnd}`"
    if rel[0] == "scores" and len(rel) > 1:
        return f"`opdcache score {run.root} --variant {rel[1]} --rounds {rnd}`"
    if rel[0] == "checkpoints" and rnd.isdigit():
        return f"`opdcache train {run.root} --round {int(rnd) - 1}` (with its round's scores)"
    if path == run.budget:
        return f"`opdcache budget {run.root} --round r` for each round again (the decisions follow from the scores)"
    return "nothing: opdcache did not make it"


def repair_run(run: RunDir, findings: list[Finding]) -> list[str]:
    """Move every file of an error finding (a part with its record, a lost part's record, the budget
    state, a foreign file) and every leftover record of an interrupted write to
    RUN/.damaged/<time>/<same path>; never deletes. One line per file: where it went, what re-makes it."""
    import os
    import time

    dest = run.damaged / time.strftime("%Y%m%dT%H%M%S")
    lines = []
    for f in findings:
        path = Path(f.path)
        if f.severity == "note" and not path.name.endswith(".parquet.json"):
            continue  # temporaries of interrupted writes and unscored rounds: nothing to move
        foreign = path.suffix == ".parquet" and path.exists() and not manifest_path(path).exists()
        lost = not path.exists()
        if f.severity == "note" or lost:  # an interrupted write's or a lost part's record
            path = path if path.name.endswith(".json") else manifest_path(path)
            moving = [path]
        else:
            moving = [path, manifest_path(path)] if path.suffix == ".parquet" else [path]
        if path.parent.parent == run.cache and not foreign:  # its scores go too: they are re-made from it
            for v in run.variants():
                s = run.variant(v) / path.parent.name / path.name
                moving += [s, manifest_path(s)]
        moved = []
        for p in moving:
            if p.exists() and run.root in p.parents:
                target = dest / p.relative_to(run.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, target)
                moved.append(target)
        if moved:
            what = Path(f.path)
            if foreign:
                lines.append(
                    f"moved {what} to {moved[0].parent}; not written by opdcache: nothing re-makes it"
                )
            elif lost:
                lines.append(
                    f"moved the record {moved[0].name} of the lost part {what} to {moved[0].parent}; "
                    f"re-made by {remade_by(run, what)}"
                )
            else:
                lines.append(f"moved {what} to {moved[0].parent}; re-made by {remade_by(run, what)}")
    return lines


def _verify_score(run: RunDir, path: Path, r: int) -> None:
    params = read_variant_params(path)
    table, _ = read_score_shard(
        path, score_columns(params.get("metric", "overlap"), bool(params.get("outcome")))
    )
    cache_part = run.cache_round(r) / path.name
    if not cache_part.exists():
        raise OpdcacheError(f"{path}: its cache part {cache_part} is missing")
    cache, _ = read_cache_shard(cache_part, ["prompt_id", "sample", "response_ids"], validate=False)
    if cache.column("prompt_id").to_pylist() != table.column("prompt_id").to_pylist():
        raise OpdcacheError(f"{path}: rows differ from {cache_part}; re-score the variant")
    t_cache = flat(cache.column("response_ids"))[1]
    t_score = flat(table.column("weight"))[1]
    if (t_cache != t_score).any():
        raise OpdcacheError(f"{path}: per-position lengths differ from {cache_part}; re-score the variant")
