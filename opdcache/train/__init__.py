"""Training: the OPD objectives (loss.py), batches from the cache (data.py), the DeepSpeed stage (stage.py)."""

from typing import Literal, get_args

Objective = Literal["student-topk", "bucket", "sum-and-sample", "sampled-token"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)  # train.objective; loss.OBJECTIVE_FNS implements each
