"""RUN/stage_times.jsonl: the wall time of every stage, however it was started (loop or CLI).

Wall time is the paper's headline metric; ``work_seconds`` is wall time less the stage's engine or
model start-up. Lines are appended and fsynced; a torn last line (crash) is ignored by readers.

Every worker of a sharded stage appends its own line, with ``shard`` "i/N": its wall time and the
tokens it generated. The view ``stage_walls`` (query.py) folds them into one row per run, round and
stage: tokens summed over lines, wall the slowest worker's.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from opdcache.rundir import RunDir
from opdcache.shard import WHOLE, Shard

T = TypeVar("T")


def timed(run: RunDir, r: int, stage: str, fn: Callable[[], T], shard: Shard = WHOLE) -> T:
    """Run ``fn`` (a stage returning a result with ``skipped`` and ``startup_seconds``) and record it
    (``shard``: this worker of a sharded stage, its own line)."""
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    record(
        run,
        r,
        stage,
        seconds,
        getattr(result, "startup_seconds", 0.0),
        getattr(result, "skipped", False),
        getattr(result, "generated_tokens", None),
        shard,
        getattr(result, "teacher_positions", None),
    )
    return result


def record(
    run: RunDir,
    r: int,
    stage: str,
    seconds: float,
    startup_seconds: float,
    skipped: bool,
    generated_tokens: int | None = None,
    shard: Shard = WHOLE,
    teacher_positions: int | None = None,
) -> None:
    """Append one stage's line; ``generated_tokens``: what a rollout decoded (absent for other stages);
    ``teacher_positions``: response positions the teacher scored (teacher stage; in-flight rollout).
    Under a launcher an unsharded stage (training) records once, from rank 0; a sharded one per worker."""
    if shard.count == 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    row = {
        "run": run.label,
        "round": r,
        "stage": stage,
        "seconds": seconds,
        "work_seconds": seconds - startup_seconds,
        "skipped": skipped,
        **({} if generated_tokens is None else {"generated_tokens": generated_tokens}),
        **({} if teacher_positions is None else {"teacher_positions": teacher_positions}),
        **({"shard": str(shard)} if shard.count > 1 else {}),
        "host": socket.gethostname(),
        "finished_at": time.time(),
    }
    with run.stage_times.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
