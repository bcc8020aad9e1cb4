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
