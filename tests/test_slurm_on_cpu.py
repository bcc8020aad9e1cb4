"""pipelines/slurm/round.sh on a real Slurm: a one-node cluster on this machine (munge, slurmctld,
slurmd from Debian's packages; .ci/run installs them), two rounds of a tiny run, each stage a job.

The cluster's configuration lives in a temporary directory (SLURM_CONF, munge's own socket and key),
so nothing of the machine's own Slurm, if any, is touched. The node advertises 64 CPUs and 8 GPUs
(GRES backed by empty files; no cgroups) so that the recipes' resource requests are accepted as
written; the training job's node and GPU counts are the recipe's TRAIN_NODES / GPUS_PER_NODE.

Skips where Slurm cannot start here (not root, packages absent), unless OPDCACHE_REQUIRE_SLURM=1
(CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd)"
    missing = [d for d in (*DAEMONS, "sbatch", "squeue", "sinfo") if not _which(d)]
    if missing:
        return f"Slurm / munge not installed ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None
    )


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster: the environment to submit with (SLURM_CONF)."""
    why = _unavailable()
    if why:
        if os.environ.get("OPDCACHE_REQUIRE_SLURM") == "1":
            pytest.fail(f"OPDCACHE_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for sub in ("munge", "ctld", "slurmd", "log", "gpu"):
        (d / sub).mkdir()
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = d / "munge" / "munge.socket"
    for i in range(8):
        (d / "gpu" / f"gpu{i}").touch()
    (d / "gres.conf").write_text(f"NodeName={host} Name=gpu File={d}/gpu/gpu[0-7]\n")
    conf = d / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=opdcache-ci",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={sock}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "GresTypes=gpu",
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "SchedulerType=sched/backfill",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SlurmctldPort=16817",
                "SlurmdPort=16818",
                f"StateSaveLocation={d}/ctld",
                f"SlurmdSpoolDir={d}/slurmd",
                f"SlurmctldPidFile={d}/slurmctld.pid",
                f"SlurmdPidFile={d}/slurmd.pid",
                f"SlurmctldLogFile={d}/log/slurmctld.log",
                f"SlurmdLogFile={d}/log/slurmd.log",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                "MinJobAge=3600",
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs=64 Boards=1 SocketsPerBoard=1 CoresPerSocket=64 "
                "ThreadsPerCore=1 RealMemory=16000 Gres=gpu:8 State=UNKNOWN",
                f"PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = [
        subprocess.Popen(
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={sock}",
                f"--key-file={key}",
                f"--log-file={d}/log/munged.log",
                f"--pid-file={d}/munge/munged.pid",
                f"--seed-file={d}/munge/seed",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    ]
    _wait(lambda: sock.exists(), 30, "munged's socket", d)
    procs.append(
        subprocess.Popen(
            [_which("slurmctld"), "-D", "-i"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    )
    procs.append(
        subprocess.Popen(
            [_which("slurmd"), "-D"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
    )
    try:
        _wait(lambda: _node_state(env) in ("idle", "mixed"), 90, "the node to come up idle", d)
        yield env
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _node_state(env) -> str:
    p = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
    return p.stdout.strip().rstrip("*~#") if p.returncode == 0 else ""


def _wait(cond, seconds: float, what: str, d: Path) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.5)
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted((d / "log").glob("*.log")))
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _queue_empty(env) -> bool:
    p = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
    return p.returncode == 0 and not p.stdout.strip()


def test_round_sh_runs_two_rounds_on_a_real_slurm(slurm, tiny_overrides, tmp_path):
    venv_bin = Path(sys.executable).parent
    env = {
        **slurm,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "OPDCACHE": str(venv_bin / "opdcache"),
        "TRAIN_NODES": "1",
        "GPUS_PER_NODE": "1",
    }
    run = tmp_path / "run"
    sets = [x for s in [*tiny_overrides, "score.workers=1"] for x in ("--set", s)]
    subprocess.run(
        [str(venv_bin / "opdcache"), "init", str(run), *sets], check=True, capture_output=True, env=env
    )
    for r in (0, 1):
        p = subprocess.run(
            ["bash", str(ROOT / "pipelines" / "slurm" / "round.sh"), str(run), str(r), "2"],
            env=env, cwd=tmp_path, capture_output=True, text=True,
        )  # fmt: skip
        assert p.returncode == 0, p.stdout + p.stderr
        ids = p.stdout
        deadline = time.monotonic() + 900
        while not _queue_empty(env):
            assert time.monotonic() < deadline, f"round {r}: jobs still queued after 15 min: {ids}"
            time.sleep(2)
        outs = {f.name: f.read_text() for f in tmp_path.glob("slurm-*.out")}
        states = subprocess.run(
            ["scontrol", "show", "job", "-o"], env=env, capture_output=True, text=True
        ).stdout.splitlines()
        failed = [s for s in states if "JobState=COMPLETED" not in s]
        assert not failed, (
            "\n".join(failed) + "\n" + "\n".join(f"== {n}\n{t[-1500:]}" for n, t in outs.items())
        )
    budget = json.loads((run / "budget.json").read_text())
    assert [d["round"] for d in budget["history"]] == [0, 1]
    assert (run / "checkpoints" / "round=2" / "model.safetensors").exists()
    v = subprocess.run(
        [str(venv_bin / "opdcache"), "verify", str(run)], env=env, capture_output=True, text=True
    )
    assert v.returncode == 0, v.stdout + v.stderr
    assert (run / "tensorboard").is_dir()  # the unsharded stages rebuilt the metrics files
