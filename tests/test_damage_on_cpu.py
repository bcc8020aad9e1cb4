"""A damaged run, command by command (issue 44): each kind of damage to a scored synthetic run, and what
every command that reads it does. A refused command exits 2 with one line on stderr that names the
damaged file (no traceback) and leaves the run byte for byte as it was; ``verify`` names it; ``verify
--repair`` moves it aside (nothing deleted) and the run verifies again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from opdcache.cli import main


def tree(root: Path) -> dict[str, bytes]:
    """The run's files and bytes; the lock's own files (.lock, .lock.gate: local-only, no content a
    reader sees) aside."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock")
    }


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damage") / "run"
    assert (
        main(
            ["synth", str(root), "--rounds", "2", "--prompts", "2", "--mean-len", "20", "--max-tokens", "64"]
        )
        == 0
    )
    assert main(["init", str(root)]) == 0
    assert main(["score", str(root), "--quiet"]) == 0
    assert main(["budget", str(root), "--round", "0"]) == 0
    return root


PART = "cache/round=0/part-00000.parquet"


def truncate(run: Path) -> str:
    p = run / PART
    p.write_bytes(p.read_bytes()[:-100])
    return PART


def flip(run: Path) -> str:
    p = run / PART
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF  # inside a data page: bytes and rows still match the record
    p.write_bytes(bytes(b))
    return PART


def foreign(run: Path) -> str:
    shutil.copy(run / PART, run / "cache/round=0/extra.parquet")  # no integrity record of its own
    return "cache/round=0/extra.parquet"


def lost(run: Path) -> str:
    (run / "cache/round=0/part-00001.parquet").unlink()  # its record stays
    return "cache/round=0/part-00001.parquet"


def bad_budget(run: Path) -> str:
    (run / "budget.json").write_text("{not json")
    return "budget.json"


def score_lost(run: Path) -> str:
    (run / "scores/prune/round=0/part-00000.parquet").unlink()  # its record stays
    return "scores/prune/round=0/part-00000.parquet"


DAMAGE = {
    "truncated": truncate,
    "flipped": flip,
    "foreign": foreign,
    "lost": lost,
    "budget.json": bad_budget,
    "score part lost": score_lost,
}
COMMANDS = {
    "score": ["score", "{run}", "--quiet"],
    "score new variant": ["score", "{run}", "--variant", "g5", "--gamma", "0.5", "--quiet"],
    "budget": ["budget", "{run}", "--round", "0"],
    "report": ["report", "{run}", "--out", "{out}/rep"],
    "replay": ["replay", "{run}", "--variant", "rp", "--no-train", "--quiet"],
    "query": ["query", "{run}", "SELECT * FROM rollouts"],
    "pack": ["pack", "{run}", "{out}/r.tar.zst", "--quiet"],
    "budget show": ["budget", "{run}"],
}
# (damage, command) -> refused (True) or runs (False: what it reads is whole)
REFUSED = dict.fromkeys(((d, c) for d in DAMAGE for c in COMMANDS), True)
REFUSED |= {(d, "budget show"): d == "budget.json" for d in DAMAGE}  # shows the state: reads no part
REFUSED |= {
    ("score part lost", "replay"): False,  # a replay scores the cache itself: the run's scores are not read
    ("flipped", "budget"): False,  # reads the scores' E, which are whole; the cache part's pages are not read
    ("flipped", "report"): False,  # the report's queries read no column of the damaged page
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_command_on_a_damaged_run(clean, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(clean, run)
    named = DAMAGE[damage](run)
    (tmp_path / "out").mkdir()
    for name, argv in COMMANDS.items():
        before = tree(run)
        capsys.readouterr()
        rc = main([a.format(run=run, out=tmp_path / "out") for a in argv])
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith("opdcache: warning")]
        if REFUSED[damage, name]:
            assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (name, err)
            assert str(run / named) in lines[0], (name, lines[0])
            assert tree(run) == before, name  # nothing written before the inputs were known good
        else:
            assert rc == 0, (name, err)
    capsys.readouterr()
    assert main(["verify", str(run), "--quiet"]) == 2
    out = capsys.readouterr()
    assert str(run / named) in out.out + out.err
    # --repair: moved aside, never deleted; the run verifies again
    files = len([p for p in run.rglob("*") if p.is_file()])
    assert main(["verify", str(run), "--repair", "--quiet"]) == 0
    assert len([p for p in run.rglob("*") if p.is_file()]) == files
    moved = {p.name for p in (run / ".damaged").rglob("*")}
    assert Path(named).name in moved or f"_{Path(named).name}.json" in moved  # a lost part: its record
    assert main(["verify", str(run), "--quiet"]) == 0
