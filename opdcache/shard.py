"""Sharded stages: N workers of one stage split a round's parts, part p going to worker p mod N.

    opdcache rollout RUN --round R --shard i/N             # job arrays: worker i of N
    torchrun --nproc_per_node N -m opdcache.cli teacher RUN --round R   # RANK / WORLD_SIZE
    opdcache score RUN --rounds R --shard i/N               # parts scored in place (score/stage.py)
    torchrun --nproc_per_node N -m opdcache.cli run CONFIG RUN --rounds R   # all stages (loop.py)

Parts are the unit: each is written atomically and skipped when present, so workers never wait on
each other, a killed worker's parts are redone by the next launch (of any worker count), and the
stage is done when every part is. The workers of one stage and round hold the run lock together
(``RunLock(job=...)``); any other writer is refused meanwhile. The ranks of a sharded ``opdcache
run`` also wait for each other between stages (``join_ranks``, ``barrier``); there rank 0 alone
holds the run lock, as under any launcher.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

from opdcache.errors import OpdcacheError

_SHARD = re.compile(r"^(\d+)/(\d+)$")

# How long a rank of a sharded ``opdcache run`` waits at a barrier (or DeepSpeed collective) for the
# others: rank 0 evaluates alone, and one rank's rollout may take much longer than another's.
BARRIER_TIMEOUT = timedelta(seconds=float(os.environ.get("OPDCACHE_BARRIER_TIMEOUT", 6 * 3600)))


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise OpdcacheError(f"shard {self.index}/{self.count}: expected i/N with 0 <= i < N")

    @staticmethod
    def parse(text: str) -> Shard:
        m = _SHARD.match(text.strip())
        if not m:
            raise OpdcacheError(f"--shard {text!r}: expected i/N, e.g. 0/4 (worker 0 of 4)")
        return Shard(int(m[1]), int(m[2]))

    @staticmethod
    def of(text: str | None) -> Shard:
        """``--shard i/N`` if given, else the launcher's RANK / WORLD_SIZE, else the whole stage (0/1)."""
        if text:
            return Shard.parse(text)
        return Shard(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    def owns(self, part: int) -> bool:
        return part % self.count == self.index

    def job(self, stage: str, r: int | str) -> str | None:
        """The lock's job key: the workers of one stage, round (or, for score, a description of the
        variant and rounds) and worker count cooperate."""
        what = f"round={r}" if isinstance(r, int) else r
        return f"{stage} {what} workers={self.count}" if self.count > 1 else None

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard(0, 1)


def pin_devices(per_worker: int = 1) -> None:
    """Under a launcher, give this worker its own GPUs (LOCAL_RANK's ``per_worker`` of the visible ones)
    before anything starts CUDA (which reads CUDA_VISIBLE_DEVICES once), so N workers on a node do not
    all land on GPU 0. Without LOCAL_RANK, or with CUDA_VISIBLE_DEVICES already naming exactly
    ``per_worker`` devices (a job array's task), nothing changes. On a machine without GPUs the
    variable is set and ignored."""
    local = os.environ.get("LOCAL_RANK")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if local is None or (visible is not None and len(visible.split(",")) == per_worker):
        return
    first = int(local) * per_worker
    if visible is None:  # no CUDA call here: it would fix the device list before we narrow it
        mine = [str(d) for d in range(first, first + per_worker)]
    else:
        devices = visible.split(",")
        mine = devices[first : first + per_worker]
        if len(mine) < per_worker:
            raise OpdcacheError(
                f"worker LOCAL_RANK={local} needs {per_worker} GPU(s); CUDA_VISIBLE_DEVICES={visible} "
                f"has {len(devices)}"
            )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


def pin_cpu_cores() -> None:
    """Under a launcher, give this worker's vLLM CPU engine its own share of the host's cores
    (``VLLM_CPU_OMP_THREADS_BIND``): vLLM's automatic binding does not know about the other workers,
    so N engines on one host all bind the same cores. Worker LOCAL_RANK of LOCAL_WORLD_SIZE takes the
    LOCAL_RANK-th contiguous slice of the cores this process may use (a core each, shared round-robin,
    when there are fewer cores than workers). A binding set by the user, one worker per host, or no
    launcher: nothing changes. GPU engines ignore the variable."""
    local, workers = os.environ.get("LOCAL_RANK"), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local is None or workers < 2 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    cores = sorted(os.sched_getaffinity(0))
    i = int(local)
    if len(cores) < workers:
        mine = [cores[i % len(cores)]]
    else:
        per, extra = divmod(len(cores), workers)
        start = i * per + min(i, extra)
        mine = cores[start : start + per + (i < extra)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in mine)


def join_ranks() -> None:
    """The process group of a sharded ``opdcache run``, once per process (call ``pin_devices`` first).

    gloo on CPU; on GPUs gloo for CPU tensors (``barrier``) and NCCL for CUDA tensors in the same
    default group, which DeepSpeed then reuses (deepspeed.comm.init_distributed) for training.
    """
    import torch
    import torch.distributed as dist

    # vLLM forks its engine process by default; a fork of this process inherits the initialised
    # process group of N ranks (vLLM makes its own one-process world only when none is initialised)
    # and hangs in its set-up (seen on CPU, vllm 0.32; the launcher's RANK etc. are harmless). A
    # spawned one starts clean (on GPUs vLLM spawns anyway, once CUDA is initialised).
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # pin_devices left this worker only its own GPUs; DeepSpeed selects GPU LOCAL_RANK of those
        os.environ["LOCAL_RANK"] = "0"
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)


def barrier(shard: Shard) -> None:
    """Wait for every worker of a sharded run (``join_ranks``); nothing to wait for with one worker.
    A CPU tensor's all-reduce, so that gloo carries it under either backend of ``join_ranks``."""
    if shard.count == 1:
        return
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.zeros(1))
