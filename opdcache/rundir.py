"""Run-directory layout (the only channel between stages) and atomic file writes.

RunDir is the one place that knows where things live; every stage is handed one.

RUN/
  config.yaml                                 resolved run config (config.py)
  budget.json                                 Alg. 1 controller state and every decision (budget.py)
  rollouts/round=<r>/part-<p>.parquet         student columns, waiting for the teacher
  cache/round=<r>/part-<p>.parquet            rollout + teacher columns (docs/cache-format.md)
  scores/<variant>/round=<r>/part-<p>.parquet score columns of one reliability setting, same rows
  (each part beside its integrity record _part-<p>.parquet.json)
  checkpoints/round=<r>/                      HF student that round r samples from (r >= 1); LoRA: + adapter/;
                                              weights removed by retention: opdcache_removed.json instead
  deepspeed/round=<r>/                        DeepSpeed engine state saved with checkpoints/round=<r>
  eval/round=<r>.json                         Avg@n of the round-r student
  stage_times.jsonl                           wall time of every stage run (view stage_times)
  metrics.jsonl, tensorboard/                 per-step and per-round scalars (metrics.py; view metrics)
  replays/<name>/                             a run directory of its own whose cache/ links to RUN/cache
  opdcache.duckdb                             DuckDB views over all of the above (query.py)
  .staging/                                   work in progress; never read by anything else
  .lock, .lock.gate                           the run lock (lock.py)

``opdcache pack`` selects the named components of :meth:`RunDir.components`; the last three entries
(and each replay's) stay behind (:meth:`RunDir.is_local_only`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from opdcache.errors import OpdcacheError

_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROUND_RE = re.compile(r"^round=(\d+)$")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")

Stage = Literal["rollout", "teacher", "score", "train", "eval"]


def round_dir(r: int | str) -> str:
    """The hive partition directory name of round ``r`` (``"*"``: a glob over rounds)."""
    return f"round={r}"


class RunDir:
    """Paths inside one run directory, and whether a stage is done for a round."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @classmethod
    def of(cls, run: RunDir | str | os.PathLike) -> RunDir:
        return run if isinstance(run, RunDir) else cls(run)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

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
    def damaged(self) -> Path:
        """Where ``verify --repair`` moves damaged and foreign files (never deleted)."""
        return self.root / ".damaged"

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

    @property
    def stage_times(self) -> Path:
        return self.root / "stage_times.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def lock_gate(self) -> Path:
        """Held for a moment while the workers of a sharded stage join or leave the lock (lock.py)."""
        return self.root / ".lock.gate"

    @property
    def evals(self) -> Path:
        return self.root / "eval"

    @property
    def replays(self) -> Path:
        return self.root / "replays"

    def replay(self, name: str) -> RunDir:
        return RunDir(self.replays / check_variant_name(name))

    def replay_runs(self) -> list[RunDir]:
        """The replays present, by name."""
        if not self.replays.is_dir():
            return []
        return [RunDir(d) for d in sorted(self.replays.iterdir()) if d.is_dir()]

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def components(self) -> dict[str, Path]:
        """The parts of a run by the names ``opdcache pack --only`` selects them with."""
        return {
            "cache": self.cache,
            "rollouts": self.rollouts,
            "scores": self.scores,
            "budget": self.budget,
            "config": self.config,
            "checkpoints": self.checkpoints,
            "deepspeed": self.deepspeed,
            "eval": self.evals,
            "stage_times": self.stage_times,
            "metrics": self.metrics,
            "tensorboard": self.tensorboard,
            "replays": self.replays,
        }

    def is_local_only(self, path: Path) -> bool:
        """Whether ``path`` stays behind when the run is packed: work in progress, the lock, and the
        derived DuckDB file with its temporaries (any command recreates it), of the run or a replay."""
        if path.parent != self.root and path.parent.parent != self.replays:
            return False
        names = (self.staging.name, self.lock.name, self.lock_gate.name, self.duckdb.name, self.damaged.name)
        return path.name in names or path.name.startswith(f".{self.duckdb.name}.")

    def select(self, only: list[str] | None = None) -> list[Path]:
        """Top-level entries to pack: the ``only`` components (each must exist), default all but
        :meth:`is_local_only`."""
        if only is None:
            return sorted(p for p in self.root.iterdir() if not self.is_local_only(p))
        known = self.components()
        if unknown := [n for n in only if n not in known]:
            raise OpdcacheError(f"unknown components {unknown}; valid: {', '.join(known)}")
        if missing := [n for n in only if not known[n].exists() and not known[n].is_symlink()]:
            raise OpdcacheError(f"{self.root}: no " + ", ".join(f"{n} ({known[n].name})" for n in missing))
        return sorted({known[n] for n in only})

    @property
    def label(self) -> str:
        """How stage_times names this run: "main", or "replay:<name>" for RUN/replays/<name>."""
        return f"replay:{self.root.name}" if self.root.parent.name == "replays" else "main"

    def cache_round(self, r: int) -> Path:
        return self.cache / round_dir(r)

    def rollout_round(self, r: int) -> Path:
        return self.rollouts / round_dir(r)

    def score_round(self, variant: str, r: int) -> Path:
        return self.variant(variant) / round_dir(r)

    def checkpoint(self, r: int) -> Path:
        """The HF student round ``r`` samples from (written by round r-1's training)."""
        return self.checkpoints / round_dir(r)

    @property
    def deepspeed(self) -> Path:
        return self.root / "deepspeed"

    def deepspeed_state(self, r: int) -> Path:
        """DeepSpeed engine state saved beside checkpoints/round=<r> (optimizer state for round r)."""
        return self.deepspeed / round_dir(r)

    def eval_result(self, r: int | str) -> Path:
        """Avg@n of the round-r checkpoint (the student round r samples from)."""
        return self.evals / f"{round_dir(r)}.json"

    @staticmethod
    def part_name(p: int) -> str:
        return f"part-{p:05d}.parquet"

    @staticmethod
    def part_index(name: str) -> int:
        """part_name's inverse: part-00003.parquet -> 3."""
        m = _PART_RE.match(name)
        if not m:
            raise OpdcacheError(f"{name}: not a part name (expected part-<number>.parquet)")
        return int(m[1])

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

    def parts(self) -> list[tuple[str, int, Path]]:
        """Every Parquet part of the cache, rollouts and scores as (kind, round, path); kind is
        "cache", "rollout" or "score"."""
        out = [("cache", r, p) for r in self.rounds() for p in self.shards(self.cache_round(r))]
        out += [
            ("rollout", r, p) for r in self.rounds(self.rollouts) for p in self.shards(self.rollout_round(r))
        ]
        for v in self.variants():
            out += [
                ("score", r, p)
                for r in self.rounds(self.variant(v))
                for p in self.shards(self.score_round(v, r))
            ]
        return out

    def variants(self) -> list[str]:
        if not self.scores.is_dir():
            return []
        return sorted(p.name for p in self.scores.iterdir() if p.is_dir() and _VARIANT_RE.match(p.name))

    def done(self, stage: Stage, r: int, *, part: str | None = None, variant: str | None = None) -> bool:
        """Whether ``stage`` has finished round ``r`` (or one ``part`` of it); every skip uses this.

        rollout  per part only (the part count comes from the config): the part is in rollouts/ or,
                 completed by the teacher, in cache/
        teacher  the part (default: every rollout part of the round) is in cache/
        score    the part (default: every cache part of the round, at least one) is scored as ``variant``
        train    checkpoints/round=<r+1> exists (renamed into place last)
        eval     eval/round=<r>.json exists
        """
        if stage == "rollout":
            if part is None:
                raise ValueError("done('rollout', r) needs a part: the round's part count is in the config")
            return (self.rollout_round(r) / part).exists() or (self.cache_round(r) / part).exists()
        if stage == "teacher":
            names = [part] if part else [p.name for p in self.shards(self.rollout_round(r))]
            return all((self.cache_round(r) / n).exists() for n in names)
        if stage == "score":
            if variant is None:
                raise ValueError("done('score', r) needs a variant")
            if part is not None:
                return (self.score_round(variant, r) / part).exists()
            have = {p.name for p in self.shards(self.score_round(variant, r))}
            return bool(have) and have == {p.name for p in self.shards(self.cache_round(r))}
        if stage == "train":
            return self.checkpoint(r + 1).exists()
        if stage == "eval":
            return self.eval_result(r).exists()
        raise ValueError(f"unknown stage {stage!r}")

    def require(self) -> RunDir:
        if self.root.exists() and not self.root.is_dir():
            raise OpdcacheError(f"{self.root}: is a file; expected a run directory")
        if not self.root.is_dir():
            raise OpdcacheError(f"{self.root}: run directory does not exist")
        return self

    def is_run(self) -> bool:
        """A run holds config.yaml (``init``, ``run``) or cache/ (``synth``, a rollout)."""
        return self.config.is_file() or self.cache.is_dir()


def check_variant_name(name: str) -> str:
    if not _VARIANT_RE.match(name):
        raise OpdcacheError(
            f"variant name {name!r}: expected letters, digits, '_', '.', '-' (not starting with '.' or '_')"
        )
    return name


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text_if_changed(path: Path, text: str) -> Path:
    """``path`` holding ``text``, written (atomically) only when it holds something else."""
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
    return path


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


def remove_dead_leftovers(parent: Path, prefix: str, suffix: str = "") -> None:
    """Remove ``parent/<prefix><pid><suffix>`` files or directories whose process is gone (killed)."""
    if not parent.is_dir():
        return
    for p in parent.glob(f"{prefix}*{suffix}"):
        pid = p.name[len(prefix) : len(p.name) - len(suffix)]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(
                missing_ok=True
            )


def clean_stale_staging(run: RunDir, prefix: str) -> None:
    """Remove RUN/.staging/<prefix>-<pid> entries whose process is gone (a killed stage)."""
    remove_dead_leftovers(run.staging, f"{prefix}-")


def recover_interrupted_swaps(parent: Path) -> None:
    """Undo what a crash between the two renames of :func:`replace_dir` left behind."""
    if not parent.is_dir():
        return
    for old in parent.glob(".*.old.*"):
        name = old.name[1:].rsplit(".old.", 1)[0]
        if (parent / name).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(old, parent / name)
            except FileNotFoundError:  # another worker (a sharded score) restored it first
                pass
