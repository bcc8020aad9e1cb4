"""``opdcache verify RUN``: check every part of a run against what was recorded when it was written.

Per Parquet part (cache, rollouts, scores): the integrity record exists, bytes, rows and sha256
match, every page decodes with its checksum, the schema version, columns, types and list lengths
are right, log-probs are finite; score parts have the rows of their cache part; all cache parts
share k; the budget state parses. Also reports leftovers of interrupted writes and score rounds
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
                if not m.with_name(m.name[1:-5]).exists():
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
                have, want = len(run.shards(vdir / round_dir(r))), len(run.shards(run.cache_round(r)))
                if have < want:
                    findings.append(
                        Finding(
                            str(vdir / round_dir(r)),
                            f"{have} of {want} cache parts scored (a sharded score not finished; rerun "
                            f"`opdcache score {run.root} --variant {vdir.name} --rounds {r}`)",
                            "note",
                        )
                    )
    if run.budget.exists():
        try:
            BudgetController(run.root)
        except OpdcacheError as e:
            findings.append(Finding(str(run.budget), str(e)))
    return len(parts), findings


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
