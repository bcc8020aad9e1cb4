"""Stale locks of torch's JIT-built extensions (DeepSpeed's CPU communication op).

torch.utils.cpp_extension guards each extension's build directory with a bare lock file (created
with O_EXCL, no owner recorded) and waits, polling forever, while it exists. A process killed while
it held the lock (kill -9 during DeepSpeed's start-up, which loads the op) leaves the file behind,
and every later training stage on the machine then hangs without a word. Before DeepSpeed starts,
a lock that cannot belong to a live loader is removed: older than ``build_seconds`` while the built
library exists (a load holds it for a moment), or older than ``max_seconds`` in any case.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def extensions_root() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    # the op's own directory (created here if missing, as DeepSpeed would): its parent holds them all
    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent


def clear_stale_locks(
    root: Path | None = None, build_seconds: float = 30.0, max_seconds: float = 900.0, poll: float = 1.0
) -> list[Path]:
    """Wait for live locks to go, remove stale ones; returns the removed lock files."""
    root = root or extensions_root()
    removed = []
    for lock in sorted(root.glob("*/lock")):
        while lock.exists():
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break
            built = any(lock.parent.glob("*.so"))
            if age > max_seconds or (built and age > build_seconds):
                lock.unlink(missing_ok=True)
                removed.append(lock)
                print(
                    f"opdcache: note: removed the stale lock {lock} ({age:.0f} s old; its process died "
                    "while building or loading the extension)",
                    file=sys.stderr,
                )
                break
            time.sleep(poll)
    return removed


def before_deepspeed() -> None:
    """What every DeepSpeed start in this project does first: on a machine without CUDA, DeepSpeed's
    CPU accelerator, and no dead process's lock left on its communication op."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        clear_stale_locks()


def build_ops() -> float:
    """Build DeepSpeed's CPU communication op now (the demos, before any arm runs): its one-time JIT
    build (~27 s in a fresh environment) would otherwise land inside the first arm's training time and
    bias the comparison. Returns the seconds it took (about 0 once cached)."""
    import torch

    t0 = time.perf_counter()
    before_deepspeed()
    if not torch.cuda.is_available():
        from deepspeed.comm.torch import build_shm_op

        build_shm_op()
    return time.perf_counter() - t0
