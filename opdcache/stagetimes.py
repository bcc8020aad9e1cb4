"""RUN/stage_times.jsonl: the wall time of every stage, however it was started (loop or CLI).

Wall time is the paper's headline metric; ``work_seconds`` is wall time less the stage's engine or
model start-up. Lines are appended and fsynced; a torn last line (crash) is ignored by readers.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from opdcache.rundir import RunDir

T = TypeVar("T")


def timed(run: RunDir, r: int, stage: str, fn: Callable[[], T], primary: bool = True) -> T:
    """Run ``fn`` (a stage returning a result with ``skipped`` and ``startup_seconds``) and record it.

    Of a sharded stage's workers only the first (``primary``) records: its wall time and its tokens."""
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    if not primary:
        return result
    record(
        run,
        r,
        stage,
        seconds,
        getattr(result, "startup_seconds", 0.0),
        getattr(result, "skipped", False),
        getattr(result, "generated_tokens", None),
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
) -> None:
    """Append one stage's line; ``generated_tokens``: what a rollout decoded (absent for other stages)."""
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher, one line per stage (rank 0's)
        return
    row = {
        "run": run.label,
        "round": r,
        "stage": stage,
        "seconds": seconds,
        "work_seconds": seconds - startup_seconds,
        "skipped": skipped,
        **({} if generated_tokens is None else {"generated_tokens": generated_tokens}),
        "host": socket.gethostname(),
        "finished_at": time.time(),
    }
    with run.stage_times.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
