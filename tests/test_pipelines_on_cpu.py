"""The Slurm recipes in pipelines/slurm run end to end with sbatch / srun / torchrun / scontrol stubbed
and opdcache in dry-run mode: every opdcache command they issue must parse."""

import os
import subprocess
import sys
from pathlib import Path

SLURM = Path(__file__).resolve().parents[1] / "pipelines" / "slurm"

STUBS = {
    # sbatch: run the job script now, as array task 0 of N (when --array 0-(N-1)); print a job id
    "sbatch": r"""#!/usr/bin/env bash
count=1; script=""
for a in "$@"; do case "$a" in --array=*) r="${a#--array=}"; count=$(( ${r#*-} + 1 ));; --*) ;; *) script="$a";; esac; done
SLURM_ARRAY_TASK_ID=0 SLURM_ARRAY_TASK_COUNT=$count SLURM_JOB_ID=7 SLURM_NNODES=2 \
  SLURM_JOB_NODELIST=node[1-2] bash "$script" >> "$LOG" 2>&1 || exit 1
echo 7""",
    "srun": '#!/usr/bin/env bash\nexec "$@"',
    # many nodes: a reader that stops early (head -n 1) would kill it with SIGPIPE under pipefail
    "scontrol": "#!/usr/bin/env bash\nfor i in $(seq 1 20000); do echo node$i; done",
    # torchrun: drop the launcher's options, run the module as one process
    "torchrun": '#!/usr/bin/env bash\nwhile [ "$1" != "-m" ]; do shift; done\nexec "$PYTHON" "$@"',
}


def test_round_recipe_issues_commands_that_parse(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in STUBS.items():
        (bin_ / name).write_text(text + "\n")
        (bin_ / name).chmod(0o755)
    log = tmp_path / "log"
    env = {
        **os.environ,
        "PATH": f"{bin_}:{os.environ['PATH']}",
        "LOG": str(log),
        "PYTHON": sys.executable,
        "OPDCACHE": f"{sys.executable} -m opdcache.cli",
        "OPDCACHE_DRY_RUN": "1",
    }
    p = subprocess.run(
        ["bash", str(SLURM / "round.sh"), str(tmp_path / "run"), "3", "4"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr + (log.read_text() if log.exists() else "")
    lines = [x for x in log.read_text().splitlines() if x.startswith("opdcache: dry run:")]
    stages = [x.split()[3] for x in lines]
    assert stages == ["rollout", "teacher", "score", "train", "budget"], log.read_text()
    assert "--shard 0/4" in lines[0] and "--shard 0/4" in lines[1] and "--round 3" in lines[3]
    assert "error" not in log.read_text()


def test_a_recipe_with_a_bad_command_fails_the_dry_run(tmp_path):
    """The dry run is a real check: an unknown option makes the command (and the test) fail."""
    env = {**os.environ, "OPDCACHE_DRY_RUN": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "opdcache.cli", "rollout", "RUN", "--round", "0", "--shards", "0/2"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr
