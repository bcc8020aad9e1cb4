"""Command-line arguments checked before any work starts: one place, the same checks for every command.

argparse ``type=`` functions (numbers in range, path kinds) raise ``ArgumentTypeError``, which the parser
turns into one line on stderr and exit status 2; ``run_root`` checks the RUN argument of a command.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from opdcache.errors import OpdcacheError


def _int_at_least(text: str, least: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer {expected}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer {expected}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "> 0")


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, ">= 0")


def unit_float(text: str) -> float:
    """A number in [0, 1] (a share, an overlap)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g}: expected a number in [0, 1]")
    return value


def variant_name(text: str) -> str:
    """A variant (or replay) name: a folder name under RUN/scores/ (rundir.check_variant_name)."""
    from opdcache.rundir import check_variant_name

    try:
        return check_variant_name(text)
    except OpdcacheError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def file_in_the_way(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` (or ``path`` itself) that is not a directory, if any."""
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            return p
    return None


def unwritable(path: Path) -> str | None:
    """Why nothing can be created at ``path`` (a directory, or where one would be made), if so: a file
    is made and removed in its first existing folder, the only test that also holds for root, a
    read-only mount or a pseudo-filesystem."""
    base = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    try:
        fd, name = tempfile.mkstemp(dir=base, prefix=".opdcache-write-check-")
    except OSError as e:
        return f"{base} is not writable ({e.strerror})"
    os.close(fd)
    os.unlink(name)
    return None


def out_dir(text: str) -> Path:
    """A directory to write into (made if absent): neither it nor a parent may be a file, and its first
    existing folder must be writable."""
    path = Path(text)
    if (f := file_in_the_way(path)) is not None:
        raise argparse.ArgumentTypeError(f"{text}: {f} is a file; expected a directory to write into")
    if (why := unwritable(path)) is not None:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return path


def out_file(text: str) -> Path:
    """A file to write: no parent may be a file, and it may not be a directory."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; expected a file to write")
    if (f := file_in_the_way(path.parent)) is not None:
        raise argparse.ArgumentTypeError(f"{text}: {f} is a file, not a directory")
    if (why := unwritable(path.parent)) is not None:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return path


def existing_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory; expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def run_root(root: Path, create: bool, write: bool = False) -> None:
    """RUN of a command, before any file is made: for ``create`` (init, run, synth) a new, empty or
    existing run directory with no file in the way; for every other command an existing run
    (``RunDir.is_run``), so that no command writes its files (views, locks, metrics) into a folder that
    is not a run. A command that ``write``s needs a writable RUN (or, to create it, parent)."""
    from opdcache.rundir import RunDir

    if (f := file_in_the_way(root)) is not None:
        what = "is a file" if f == root else f"lies under the file {f}"
        raise OpdcacheError(f"RUN {root}: {what}; expected a run directory")
    if write and (why := unwritable(root)) is not None:
        raise OpdcacheError(f"RUN {root}: {why}; this command writes into the run")
    if create:
        return
    if not RunDir(root).require().is_run():
        raise OpdcacheError(
            f"RUN {root}: not a run directory (no config.yaml or cache/ in it; `opdcache init` makes one)"
        )


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``opdcache COMMAND: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
