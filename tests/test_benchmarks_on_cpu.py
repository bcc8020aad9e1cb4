"""Every script in benchmarks/ runs at its tiny size (``--tiny``) and prints its figures."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# what each script must print (a figure line), so a script that silently stops early fails
EXPECTED = {
    "score_throughput.py": [
        "M positions/s",
        "ratio math / torch",
        "stage time / decode time",
        "bytes/position",
    ],
    "train_throughput.py": [
        "tokens/s",
        "ratio DeepSpeed / plain",
        "max |loss difference|",
        "old-log-prob recompute",
    ],
    "rollout_throughput.py": ["tokens/s", "positions/s", "ratio flat / dicts", "cache bytes/position"],
    "toy_overlap.py": ["mean response length"],
    "pack_throughput.py": ["pack MB/s", "unpack MB/s", "unpack check MB/s", "archive / run size"],
    "inflight_rollout.py": ["ratio in flight / plain", "teacher/kept", "decoded/kept"],
    "repeat_flips.py": ["reversed vs batch: responses identical", "alone vs batch", "fresh engine vs batch"],
    "vs_trl.py": [
        "TRL: wall s",
        "opdcache OPD: wall s",
        "ratio opdcache OPD / TRL wall",
        "ratio opdcache OPD / TRL generation",
        "teacher bytes kept: opdcache",
        "re-run s: opdcache",
    ],
}
SLOW = {
    "rollout_throughput.py",
    "toy_overlap.py",
    "inflight_rollout.py",
    "repeat_flips.py",
    "vs_trl.py",  # the real demo's smoke size twice over, and TRL
}  # a vLLM start; building the smoke toy models


def test_every_benchmark_is_covered():
    assert sorted(p.name for p in BENCH.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in sorted(EXPECTED)]
)
def test_benchmark_runs_tiny(script, tmp_path, request):
    args = [sys.executable, str(BENCH / script), "--tiny"]
    if script == "toy_overlap.py":
        args += ["--models", str(request.getfixturevalue("smoke_toy_models"))]
    p = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for text in EXPECTED[script]:
        lines = [line for line in p.stdout.splitlines() if text in line]
        assert lines, (text, p.stdout[-2000:])
        # each figure line carries a finite number
        for line in lines:
            assert re.search(r"\d", line) and not re.search(r"\b(nan|inf)\b", line.lower()), line
