"""Run-directory layout (the only channel between stages) and atomic file writes.

RUN/config.yaml                          resolved run config
RUN/cache/round=<r>/<part>.parquet       rollout + teacher columns (docs/cache-format.md)
RUN/scores/<variant>/round=<r>/<part>.parquet   score columns for one reliability setting
RUN/budget.json                          budget-controller state and history (Alg. 1)
RUN/opdcache.duckdb                      DuckDB views over all of the above
RUN/.staging/                            work in progress; never read by anything else
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from opdcache.errors import OpdcacheError

_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROUND_RE = re.compile(r"^round=(\d+)$")


class RunDir:
    """Paths inside one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    @property
    def scores(self) -> Path:
        return self.root / "scores"

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def budget(self) -> Path:
        return self.root / "budget.json"

    @property
    def duckdb(self) -> Path:
        return self.root / "opdcache.duckdb"

    def cache_round(self, r: int) -> Path:
        return self.cache / f"round={r}"

    def rollout_round(self, r: int) -> Path:
        return self.rollouts / f"round={r}"

    def checkpoint(self, r: int) -> Path:
        return self.root / "checkpoints" / f"round={r}"

    def eval_result(self, r: int) -> Path:
        """Avg@n of the round-r checkpoint (the student round r samples from)."""
        return self.root / "eval" / f"round={r}.json"

    def variant(self, name: str) -> Path:
        return self.scores / check_variant_name(name)

    def rounds(self, base: Path | None = None) -> list[int]:
        """Rounds present under ``base`` (default: the cache), ascending."""
        base = self.cache if base is None else base
        if not base.is_dir():
            return []
        found = (_ROUND_RE.match(p.name) for p in base.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def shards(self, base: Path) -> list[Path]:
        """Visible Parquet parts directly under ``base``, sorted by name."""
        return sorted(p for p in base.glob("*.parquet") if not p.name.startswith((".", "_")))

    def variants(self) -> list[str]:
        if not self.scores.is_dir():
            return []
        return sorted(p.name for p in self.scores.iterdir() if p.is_dir() and _VARIANT_RE.match(p.name))

    def require(self) -> RunDir:
        if not self.root.is_dir():
            raise OpdcacheError(f"{self.root}: run directory does not exist")
        return self


def check_variant_name(name: str) -> str:
    if not _VARIANT_RE.match(name):
        raise OpdcacheError(
            f"variant name {name!r}: expected letters, digits, '_', '.', '-' (not starting with '.' or '_')"
        )
    return name


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a hidden temporary file in the same directory + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def temp_path_for(path: Path) -> Path:
    """A hidden sibling name that readers (DuckDB/pyarrow globs of ``*.parquet``) never pick up."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_dir(staged: Path, final: Path) -> None:
    """Swap ``staged`` in as ``final``; an existing ``final`` is removed only after the swap."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old.{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(run: RunDir, prefix: str) -> None:
    """Remove RUN/.staging/<prefix>-...-<pid> entries whose process is gone (a killed stage)."""
    if not run.staging.is_dir():
        return
    for p in run.staging.glob(f"{prefix}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def recover_interrupted_swaps(parent: Path) -> None:
    """Undo what a crash between the two renames of :func:`replace_dir` left behind."""
    if not parent.is_dir():
        return
    for old in parent.glob(".*.old.*"):
        name = old.name[1:].rsplit(".old.", 1)[0]
        if (parent / name).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, parent / name)
