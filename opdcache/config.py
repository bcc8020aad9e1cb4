"""One YAML config per run, validated into typed dataclasses; the resolved config lands in RUN/config.yaml.

    opdcache init RUN --config pipelines/configs/default.yaml --set budget.initial=2048

Unknown keys, wrong types and out-of-range values are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opdcache.budget import BudgetConfig
from opdcache.errors import ConfigError
from opdcache.rundir import RunDir, atomic_write_bytes, check_variant_name
from opdcache.score.variant import VariantSpec


@dataclass(frozen=True)
class ModelsConfig:
    student: str = ""  # HF checkpoint (path or hub id already in the local cache) of round 0
    teacher: str = ""


@dataclass(frozen=True)
class DataConfig:
    prompts: str = ""  # JSONL or Parquet with prompt_id, question, answer
    # str.format template; {question} is the raw question (paper App. A.8, DAPO-Math template)
    template: str = "{question} Please reason step by step, and put your final answer within \\boxed{{}}."
    chat_template: bool = False  # wrap the rendered prompt in the student tokenizer's chat template


@dataclass(frozen=True)
class RolloutConfig:
    k: int = 16  # top-k kept per position for student and teacher
    n_samples: int = 8  # responses per prompt
    prompts_per_round: int = 64
    temperature: float = 1.0
    seed: int = 0
    part_size: int = 16  # prompts per cache part (the unit of resume)
    dtype: str = "auto"  # vLLM dtype; "auto" = float32 on CPU, bfloat16 on GPU
    kv_cache_gib: int = 2  # CPU only: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = 0.85  # GPU only
    max_model_len: int = 0  # 0: longest prompt + budget M_max
    enforce_eager: bool = False  # vLLM without graph capture: faster start-up, slower decoding

    def __post_init__(self) -> None:
        if (
            self.k < 1
            or self.n_samples < 1
            or self.prompts_per_round < 1
            or self.temperature <= 0
            or self.part_size < 1
        ):
            raise ConfigError(
                f"rollout: k, n_samples, prompts_per_round must be >= 1, temperature > 0; got {self}"
            )


@dataclass(frozen=True)
class TeacherConfig:
    dtype: str = "auto"  # torch dtype; "auto" = float32 on CPU (bf16 changes top-k sets), bfloat16 on GPU
    device: str = "auto"  # "auto" = cuda if available else cpu
    device_map: str = ""  # e.g. "auto" to shard a teacher too big for one device (accelerate)
    chunk_positions: int = 1024  # log-softmax chunk: bounds memory to chunk x vocab floats

    def __post_init__(self) -> None:
        if self.chunk_positions < 1:
            raise ConfigError(f"teacher.chunk_positions must be >= 1, got {self.chunk_positions}")


@dataclass(frozen=True)
class ScoreConfig(VariantSpec):
    """The variant that drives training and the budget (VariantSpec fields plus its name)."""

    variant: str = "prune"

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_variant_name(self.variant)
        except Exception as e:
            raise ConfigError(f"score.variant: {e}") from e

    def spec(self) -> VariantSpec:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(VariantSpec)}
        return VariantSpec(**fields)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    epochs: int = 1  # passes over each round's cached rollouts
    micro_batch_size: int = 4
    grad_accum: int = 1
    grad_clip: float = 1.0  # set explicitly: DeepSpeed's own default is also 1.0
    zero_stage: int = 0
    bf16: bool = False
    ppo_clip: float = 0.2
    dual_clip: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.zero_stage not in (0, 1, 2, 3)
            or self.micro_batch_size < 1
            or self.grad_accum < 1
            or self.epochs < 1
        ):
            raise ConfigError(
                f"train: zero_stage in 0-3, micro_batch_size/grad_accum/epochs >= 1; got {self}"
            )


@dataclass(frozen=True)
class ArmConfig:
    """Which comparison arm `opdcache run` executes (paper §4.1 baselines)."""

    # prune:    score.* variant (overlap or top_p) weights the loss and drives the dynamic budget
    # opd:      plain OPD (L = 1) at a fixed budget of budget.max tokens
    # truncate: plain OPD at a fixed, shorter budget of arm.truncate_tokens
    # random:   score.* is scored as the reference (and drives the budget); training uses a random
    #           variant matched to its kept fraction or reward mass (arm.random_match)
    name: Literal["prune", "opd", "truncate", "random"] = "prune"
    truncate_tokens: int = 4096
    random_match: Literal["fraction", "mass"] = "fraction"


@dataclass(frozen=True)
class EvalConfig:
    """Avg@n of the student checkpoints during `opdcache run` (off while ``data`` is empty)."""

    data: str = ""  # JSONL/Parquet with prompt_id, question, answer
    every: int = 1  # evaluate checkpoints of rounds 0, every, 2*every, ... and the last one
    n: int = 16
    temperature: float = 0.6
    max_tokens: int = 0  # 0: budget.max
    checker: Literal["math", "exact"] = "math"

    def __post_init__(self) -> None:
        if self.every < 1 or self.n < 1 or self.temperature < 0 or self.max_tokens < 0:
            raise ConfigError(f"eval: every, n >= 1, temperature, max_tokens >= 0; got {self}")


@dataclass(frozen=True)
class RunConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    arm: ArmConfig = field(default_factory=ArmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-6 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }.get(tp)
    if ok is None:
        raise TypeError(f"config type {tp} at {where} is not supported")
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where and not str(e).startswith(where) else str(e)) from e


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[leaf] = yaml.safe_load(value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        return from_dict(RunConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def write_run_config(root: str | Path, cfg: RunConfig) -> Path:
    path = RunDir(root).config
    atomic_write_bytes(path, to_yaml(cfg).encode())
    return path


def read_run_config(root: str | Path) -> RunConfig | None:
    """The run's resolved config, or None when the run was never initialised with one."""
    path = RunDir(root).config
    return load_config(path) if path.exists() else None
