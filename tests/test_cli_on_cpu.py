"""The opdcache command line, run as users run it (subprocesses)."""

import json
import subprocess
import sys


def opd(*args, check=True):
    p = subprocess.run(
        [sys.executable, "-m", "opdcache.cli", *map(str, args)], capture_output=True, text=True
    )
    if check and p.returncode:
        raise AssertionError(f"rc={p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_stages_through_the_run_directory(tmp_path):
    run = tmp_path / "run"
    opd("init", run, "--set", "budget.initial=512", "--set", "budget.min=256", "--set", "budget.step=64")
    opd("synth", run, "--rounds", "2", "--prompts", "4", "--mean-len", "300", "--max-tokens", "512")
    out = opd("score", run, "--quiet").stdout  # variant and parameters from RUN/config.yaml
    assert "variant prune" in out and '"gamma": 0.7' in out
    opd("score", run, "--variant", "g9", "--gamma", "0.9", "--rounds", "0-1", "--quiet")
    out = opd("budget", run, "--round", "0").stdout
    assert "next round 1" in out
    rows = json.loads(
        opd(
            "query", run, "select variant, count(*) n from scores group by all order by 1", "--format", "json"
        ).stdout
    )
    assert rows == [{"variant": "g9", "n": 32}, {"variant": "prune", "n": 32}]
    csv = opd("query", run, "--file", "analysis/effective_len_per_round.sql", "--format", "csv").stdout
    assert csv.splitlines()[0].startswith("variant,round,responses")
    assert (run / "opdcache.duckdb").exists() and (run / "config.yaml").exists()


def test_errors_are_one_line_without_traceback(tmp_path):
    p = opd("score", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = opd("init", tmp_path / "r", "--set", "score.gamma=x", check=False)
    assert p.returncode == 2 and "score.gamma: expected float" in p.stderr
    opd("synth", tmp_path / "r", "--rounds", "1", "--prompts", "2")
    p = opd("query", tmp_path / "r", "select nope from rollouts", check=False)
    assert p.returncode == 2 and "query failed" in p.stderr and "Traceback" not in p.stderr
    p = opd("score", tmp_path / "r", "--rounds", "x", check=False)
    assert p.returncode == 2 and "expected e.g. 3, 0-2" in p.stderr


def _prompts(path, lines):
    path.write_bytes(b"".join(lines))
    return path


def test_a_prompt_file_that_is_not_utf8_is_one_error_naming_file_and_line(tmp_path):
    bad = _prompts(
        tmp_path / "p.jsonl",
        [
            b'{"prompt_id": "a", "question": "1+1", "answer": "2"}\n',
            b'{"prompt_id": "b", "question": "caf\xe9", "answer": "1"}\n',
        ],
    )
    p = opd("init", tmp_path / "run", "--set", f"data.prompts={bad}", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"{bad}: line 2: not UTF-8 (byte 0xe9" in p.stderr


def test_a_refused_init_leaves_nothing_behind(tmp_path):
    dup = _prompts(
        tmp_path / "dup.jsonl",
        [
            b'{"prompt_id": "a", "question": "1+1", "answer": "2"}\n',
            b'{"prompt_id": "a", "question": "2+2", "answer": "4"}\n',
        ],
    )
    for args in (["--set", f"data.prompts={dup}"], ["--set", "score.gamma=x"]):
        p = opd("init", tmp_path / "run", *args, check=False)
        assert p.returncode == 2 and not (tmp_path / "run").exists(), p.stderr
        made = tmp_path / "mine"  # a directory the user made: kept, still empty
        made.mkdir(exist_ok=True)
        assert opd("init", made, *args, check=False).returncode == 2
        assert made.is_dir() and list(made.iterdir()) == []
    ok = tmp_path / "ok"
    opd("init", ok)  # a run that exists is never undone by a later refusal
    assert opd("init", ok, "--set", f"data.prompts={dup}", check=False).returncode == 2
    assert (ok / "config.yaml").exists()


def test_query_is_read_only_unless_asked(tmp_path):
    run = tmp_path / "run"
    opd("init", run)
    opd("synth", run, "--rounds", "1", "--prompts", "2", "--mean-len", "20", "--max-tokens", "64")
    out = tmp_path / "out.csv"
    for sql in (f"copy (select 1 as x) to '{out}'", f"attach '{tmp_path / 'x.db'}' as x"):
        p = opd("query", run, sql, check=False)
        assert p.returncode == 2 and "read-only" in p.stderr and "--write" in p.stderr, sql
    assert not out.exists() and not (tmp_path / "x.db").exists()
    assert opd("query", run, "select count(*) as n from rollouts", "--format", "csv").stdout.split() == [
        "n",
        "8",  # 2 prompts x 4 samples
    ]
    opd("query", run, f"copy (select 1 as x) to '{out}'", "--write")
    assert out.read_text().split() == ["x", "1"]
