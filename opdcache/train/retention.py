"""Checkpoint retention (``train.keep_checkpoints``): a long run keeps the newest N student checkpoints.

After round r's training writes checkpoints/round=<r+1>, the weights of older checkpoints are removed,
except those a scheduled evaluation still needs (``eval.every`` rounds without RUN/eval/round=<r>.json).
The initial student (round 0, ``models.student``) is never a run's to remove. A removed checkpoint
keeps its directory with ``opdcache_train.json`` (the round's training metrics; ``done("train")`` and
the metrics views still see it) and gains ``opdcache_removed.json``, the record of what went, so
``verify`` passes and a stage that needs the weights says they were removed, not that they are broken.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from opdcache.models.checkpoint import KEPT, REMOVED, removal
from opdcache.rundir import atomic_write_bytes

if TYPE_CHECKING:
    from opdcache.config import RunConfig
    from opdcache.rundir import RunDir


def needed_by_eval(run: RunDir, cfg: RunConfig, r: int) -> bool:
    """Checkpoint ``r`` is due an evaluation that has not been written yet."""
    return bool(cfg.eval.data) and r % cfg.eval.every == 0 and not run.eval_result(r).exists()


def prune_checkpoints(run: RunDir, cfg: RunConfig, newest: int) -> list[int]:
    """Remove the weights of the checkpoints older than the newest ``train.keep_checkpoints``; the
    rounds removed now. Call after checkpoints/round=<newest> is in place (rank 0 only)."""
    keep = cfg.train.keep_checkpoints
    if not keep:
        return []
    removed = []
    for r in run.rounds(run.checkpoints):
        if r > newest - keep or needed_by_eval(run, cfg, r):
            continue
        d = run.checkpoint(r)
        gone = sorted(p for p in d.iterdir() if p.name not in KEPT)
        if not gone:
            continue  # removed before
        if removal(d) is None:  # the record first: a kill mid-removal leaves a record, never a silent hole
            rec = {
                "round": r,
                "after_round": newest - 1,
                "by": f"train.keep_checkpoints={keep}",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": [p.name for p in gone],
                "bytes": sum(_size(p) for p in gone),
            }
            atomic_write_bytes(d / REMOVED, json.dumps(rec, indent=1).encode())
        for p in gone:
            _remove(p)
        removed.append(r)
    return removed


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _remove(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
