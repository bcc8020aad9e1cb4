"""Sharded stages: N workers of one stage split a round's parts, part p going to worker p mod N.

    opdcache rollout RUN --round R --shard i/N             # job arrays: worker i of N
    torchrun --nproc_per_node N -m opdcache.cli teacher RUN --round R   # RANK / WORLD_SIZE
    opdcache score RUN --rounds R --shard i/N               # parts scored in place (score/stage.py)

Parts are the unit: each is written atomically and skipped when present, so workers never wait on
each other, a killed worker's parts are redone by the next launch (of any worker count), and the
stage is done when every part is. The workers of one stage and round hold the run lock together
(``RunLock(job=...)``); any other writer is refused meanwhile.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from opdcache.errors import OpdcacheError

_SHARD = re.compile(r"^(\d+)/(\d+)$")


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
