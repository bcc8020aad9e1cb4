"""One YAML config per run, validated into typed dataclasses; the resolved config lands in RUN/config.yaml.

    opdcache init RUN --config pipelines/configs/default.yaml --set budget.initial=2048

Unknown keys, wrong types and out-of-range values are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from opdcache.budget import BudgetConfig
from opdcache.errors import ConfigError, OpdcacheError
from opdcache.fields import fail, help_rows, setting, validate
from opdcache.grading import Checker
from opdcache.rundir import RunDir, atomic_write_bytes, check_variant_name
from opdcache.variant import VariantSpec

Objective = Literal["student-topk", "bucket", "sum-and-sample", "sampled-token"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)  # train.objective; train/loss.OBJECTIVE_FNS implements each


def render(question: str, template: str) -> str:
    """Apply the prompt template (``str.format`` with ``{question}``)."""
    return template.format(question=question)


def check_template(template: str, where: str) -> str:
    """A template that renders a question: ``{question}`` in it, no other placeholder, literal braces
    doubled (``\\boxed{{}}``). Checked by rendering a dummy question."""
    try:
        text = render("\x00", template)
    except (KeyError, IndexError, ValueError) as e:
        raise OpdcacheError(
            f"{where} {template!r}: cannot render it ({type(e).__name__}: {e}); the only placeholder is "
            "{question}, literal braces are doubled, e.g. '\\boxed{{}}'"
        ) from None
    if "\x00" not in text:
        raise OpdcacheError(
            f"{where} {template!r}: expected {{question}} in it (else every prompt is the same)"
        )
    return template


@dataclass(frozen=True)
class ModelsConfig:
    student: str = setting(
        "", "round-0 student: HF checkpoint directory (or hub id already in the local cache)"
    )
    teacher: str = setting("", "teacher: HF checkpoint directory; must share the student's tokenizer")


@dataclass(frozen=True)
class DataConfig:
    prompts: str = setting("", "training prompts: JSONL or Parquet with prompt_id, question, answer")
    template: str = setting(
        "{question} Please reason step by step, and put your final answer within \\boxed{{}}.",
        "str.format template; {question} is the raw question (paper App. A.8, DAPO-Math template)",
    )
    chat_template: bool = setting(False, "wrap the rendered prompt in the student tokenizer's chat template")
    fields: dict[str, str] = setting(
        default_factory=dict,
        help="role -> field of the prompt file, e.g. {answer: reward_model.ground_truth}; roles question, "
        "answer, prompt_id; unset roles are found automatically (docs/prompts.md)",
    )

    def __post_init__(self) -> None:
        validate(self, "data")
        check_template(self.template, "data.template")


@dataclass(frozen=True)
class RolloutConfig:
    k: int = setting(16, "top-k kept per position for student and teacher", ge=1)
    n_samples: int = setting(4, "responses per prompt (the reference: 4)", ge=1)
    prompts_per_round: int = setting(64, "prompts sampled per round", ge=1)
    temperature: float = setting(
        1.0,
        "sampling temperature of the rollouts (the reference: 1.0); it only chooses the prefixes: the"
        " cached log-probs, the teacher and the loss stay at T = 1 (raw log-probs)",
        gt=0,
    )
    seed: int = setting(0, "prompt shuffle and sampling seed")
    part_size: int = setting(16, "prompts per cache part (the unit of resume)", ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", 'vLLM dtype; "auto" = float32 on CPU, bfloat16 on GPU'
    )
    kv_cache_gib: int = setting(2, "CPU only: VLLM_CPU_KVCACHE_SPACE in whole GiB", ge=1)
    gpu_memory_utilization: float = setting(0.85, "GPU only: vLLM's share of GPU memory", gt=0, le=1)
    max_model_len: int = setting(0, "vLLM context length; 0 = longest prompt + budget.max", ge=0)
    max_num_batched_tokens: int = setting(
        0,
        "vLLM tokens per scheduler step; 0 = vLLM's default (on CPU prefill is not chunked, for per-request "
        "sampling streams: at least the context)",
        ge=0,
    )
    enforce_eager: bool | Literal["auto"] = setting(
        "auto", "vLLM without compilation / graph capture; auto = on for CPU (start-up), off for GPU"
    )
    tensor_parallel_size: int = setting(
        1, "vLLM tensor parallelism: GPUs one engine spans (data parallelism: sharded workers, --shard)", ge=1
    )
    chunk_tokens: int = setting(
        128,
        "arm prune-inflight: most positions of a sample the teacher scores in one forward (fewer when R is "
        "that few bad events from 0, so no position past the stop is scored; larger: fewer teacher calls)",
        ge=1,
    )
    unreliable_tail: int = setting(
        0, "arm prune-inflight: positions still generated after R reaches 0 before the sample stops", ge=0
    )

    def __post_init__(self) -> None:
        validate(self, "rollout")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named placements


@dataclass(frozen=True)
class TeacherConfig:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", 'torch dtype; "auto" = float32 on CPU (bf16 changes top-k sets), bfloat16 on GPU'
    )
    device: str = setting("auto", '"auto" = cuda if available, else cpu')
    device_map: str = setting("", 'e.g. "auto" to shard a teacher too big for one device (accelerate)')
    chunk_positions: int = setting(1024, "log-softmax chunk: bounds memory to chunk x vocab floats", ge=1)

    def __post_init__(self) -> None:
        validate(self, "teacher")
        if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", self.device):
            fail("teacher", "device", "auto, cpu, cuda, cuda:N, xpu[:N] or mps", self.device)
        if self.device_map not in ("", *DEVICE_MAPS):
            fail(
                "teacher",
                "device_map",
                f"empty or one of {', '.join(DEVICE_MAPS)} (accelerate)",
                self.device_map,
            )


@dataclass(frozen=True)
class ScoreConfig:
    """The variant that drives training and the budget: its name and its VariantSpec (keys inline)."""

    variant: str = setting("prune", "name of the variant under RUN/scores/")
    spec: VariantSpec = setting(default_factory=VariantSpec, inline=True)
    workers: int = setting(0, "cache parts scored at once (threads); 0 = one per CPU core", ge=0)

    def __post_init__(self) -> None:
        validate(self, "score")
        try:
            check_variant_name(self.variant)
        except Exception as e:
            raise ConfigError(f"score.variant: {e}") from e


@dataclass(frozen=True)
class LoraConfig:
    """A LoRA student (peft): one adapter on the initial student, trained through every round."""

    rank: int = setting(0, "LoRA rank r; 0 = full fine-tuning (the default)", ge=0)
    alpha: float = setting(32.0, "LoRA alpha (the update is scaled by alpha / rank)", gt=0)
    dropout: float = setting(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: str = setting(
        "all-linear",
        "modules that get adapters: all-linear (peft's), or comma-separated names (q_proj,v_proj)",
    )

    def __post_init__(self) -> None:
        validate(self, "train.lora")
        if not [m for m in self.target_modules.split(",") if m.strip()]:
            fail(
                "train.lora",
                "target_modules",
                "all-linear or comma-separated module names",
                self.target_modules,
            )


@dataclass(frozen=True)
class TrainConfig:
    lr: float = setting(1e-6, "AdamW learning rate", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    epochs: int = setting(1, "passes over each round's cached rollouts", ge=1)
    mini_batch_responses: int = setting(
        0,
        "responses per optimizer step, over all ranks; 0 = all of the round's (one step, the reference)",
        ge=0,
    )
    micro_batch_size: int = setting(4, "responses per forward/backward on one rank (accumulated)", ge=1)
    grad_accum: int = setting(1, "removed: a mini-batch accumulates its micro-batches; must be 1", ge=1, le=1)
    grad_clip: float = setting(
        1.0, "gradient norm clip (set explicitly; DeepSpeed's default is also 1.0)", ge=0
    )
    zero_stage: int = setting(0, "DeepSpeed ZeRO stage", ge=0, le=3)
    bf16: bool = setting(False, "train in bfloat16")
    ppo_clip: float = setting(0.2, "PPO ratio clip epsilon", ge=0)
    dual_clip: float = setting(3.0, "dual clip c for negative advantages", gt=1)
    seed: int = setting(0, "data order and dropout seed")
    keep_states: int = setting(
        1, "DeepSpeed states kept under RUN/deepspeed/ (the newest; 0 = all); each holds the optimizer", ge=0
    )
    keep_checkpoints: int = setting(
        3,
        "student checkpoints whose weights stay under RUN/checkpoints/ (the newest N, plus any a scheduled "
        "eval has not read yet; 0 = all); a removed one keeps its metrics and a record (train/retention.py)",
        ge=0,
    )
    lora: LoraConfig = setting(default_factory=LoraConfig)
    objective: Objective = setting(
        "sum-and-sample",
        "the OPD loss (train/loss.py, docs/objectives.md; the default keeps a real student from flattening, docs/real-pair.md): "
        "student-topk = the paper's released code (the "
        "student's top-k ids only); bucket = KL over student top-k ∪ teacher top-k plus one bucket for the "
        "rest; sum-and-sample = bucket + the sampled token's residual when it lies in the rest (unbiased for "
        "the full reverse-KL gradient); sampled-token = tinker's advantage on the sampled token",
    )
    residual_clamp: float = setting(
        10.0, "objective sum-and-sample: |d_y - l_R| of the sampled residual is clamped to this (nats)", gt=0
    )
    grpo_coef: float = setting(
        1.0,
        "arms prune-grpo / grpo: weight of the GRPO term (sampled token, PPO-clipped, outcome advantage)",
        ge=0,
    )
    grpo_mode: Literal["switch", "sum"] = setting(
        "switch",
        "arm prune-grpo: switch = OPD x L where R > 0, GRPO where R = 0 (paper App. A.4); sum = OPD x L and"
        " GRPO on every position (the peers' form)",
    )

    def __post_init__(self) -> None:
        validate(self, "train")
        if self.lora.rank and self.zero_stage == 3:
            fail("train", "zero_stage", "0-2 with a LoRA student (train.lora.rank > 0)", self.zero_stage)


@dataclass(frozen=True)
class ArmConfig:
    """Which comparison arm `opdcache run` executes (paper §4.1 baselines)."""

    name: Literal["prune", "prune-inflight", "opd", "truncate", "random", "prune-grpo", "grpo", "iw-opd"] = (
        setting(
            "prune",
            "prune: score.* weights the loss and drives the budget; prune-inflight: prune, and a sample stops "
            "generating once its R reaches 0 (rollout.chunk_tokens, rollout.unreliable_tail); opd: L = 1 at "
            "budget.max; truncate: L = 1 at arm.truncate_tokens; random: random positions matched to score.*'s "
            "retention; prune-grpo: prune, with the GRPO outcome loss where R = 0 (train.grpo_mode, "
            "train.grpo_coef; outcome graded by eval.checker); grpo: the outcome loss on every position, no "
            "teacher signal, at budget.max; iw-opd: TRL's IW-OPD position weights (score.iw_gamma) at budget.max",
        )
    )
    truncate_tokens: int = setting(4096, "the truncate arm's fixed budget", ge=1)
    random_match: Literal["fraction", "mass"] = setting(
        "fraction", "random arm: match the kept token fraction or the kept |reward| mass"
    )

    def __post_init__(self) -> None:
        validate(self, "arm")


@dataclass(frozen=True)
class EvalConfig:
    """Avg@n of the student checkpoints during `opdcache run` (off while ``data`` is empty)."""

    data: str = setting("", "eval prompts (JSONL/Parquet); empty = no evaluation during `opdcache run`")
    every: int = setting(1, "evaluate the checkpoints of rounds 0, every, 2*every, ... and the last", ge=1)
    n: int = setting(16, "samples per prompt (Avg@n)", ge=1)
    temperature: float = setting(1.0, "sampling temperature (the reference protocol: 1.0)", ge=0)
    top_p: float = setting(0.95, "nucleus sampling mass (the reference protocol: 0.95)", gt=0, le=1)
    max_tokens: int = setting(0, "response budget; 0 = budget.max", ge=0)
    checker: Checker = setting(
        "math",
        "math: math-verify equivalence of the last \\boxed{}; exact: boxed string equality; last-number:"
        " lm-eval's GSM8K flexible-extract (the response's last number; for models too small to box)",
    )
    fields: dict[str, str] = setting(default_factory=dict, help="as data.fields, for the eval file")
    teacher: str = setting(
        "",
        "distillation metrics on the student's samples against this checkpoint (usually models.teacher):"
        " top-k reverse KL (k = rollout.k), teacher NLL, overlap by depth band; empty = accuracy only",
    )
    band: int = setting(64, "depth band width (tokens) of the eval's overlap and KL by depth", ge=1)

    def __post_init__(self) -> None:
        validate(self, "eval")


@dataclass(frozen=True)
class LogConfig:
    """Where the run's metrics go besides the run directory's own files (metrics.py)."""

    tensorboard: bool = setting(
        True, "write RUN/tensorboard/ event files after every round (RUN/metrics.jsonl is always written)"
    )

    def __post_init__(self) -> None:
        validate(self, "log")


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
    log: LogConfig = field(default_factory=LogConfig)


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
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_convert(k, kt, f"{where} key"): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
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
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    The keys of an ``inline`` field's dataclass are read at this level (fields.py)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    inline = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("inline")}
    owner = {f.name: None for f in dataclasses.fields(cls) if f.name not in inline}
    for name, sub in inline.items():
        owner.update({f.name: name for f in dataclasses.fields(sub)})
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {name: {} for name in inline}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in owner:
            near = difflib.get_close_matches(str(key), list(owner), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(owner)}"
            raise ConfigError(f"{path}: unknown key{hint}")
        if owner[key] is None:
            kwargs[key] = _convert(value, hints[key], path)
        else:
            nested[owner[key]][key] = value
    try:
        for name, sub in inline.items():
            kwargs[name] = from_dict(sub, nested[name], where)
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where and not str(e).startswith(where) else str(e)) from e


def to_dict(obj: Any) -> Any:
    """The YAML shape of a config dataclass (inline fields flattened into their section)."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = to_dict(getattr(obj, f.name))
        if f.metadata.get("inline"):
            out.update(value)
        else:
            out[f.name] = value
    return out


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
    if _leaf_type(key.split(".")) is str and not (
        len(value) > 1 and value[0] == value[-1] and value[0] in "'\""
    ):
        node[leaf] = value  # text as typed: a template such as "{question} Solve." is not YAML
        return
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem}); quote it") from None


def _leaf_type(keys: list[str]) -> Any:
    """The declared type of the config key ``keys`` (a section's inline fields included), or None."""
    cls: Any = RunConfig
    for k in keys:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if k not in hints:  # a field of an inline sub-dataclass (score.gamma is score.spec.gamma)
            inline = [hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("inline")]
            owner = next((c for c in inline if k in typing.get_type_hints(c)), None)
            if owner is None:
                return None
            hints = typing.get_type_hints(owner)
        cls = hints[k]
    return cls


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """The keys (section.key) whose values differ between two configs."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "fields" else {prefix + k: v})
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


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
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_run_config(run: RunDir | str | Path, cfg: RunConfig) -> Path:
    path = RunDir.of(run).config
    atomic_write_bytes(path, to_yaml(cfg).encode())
    return path


def read_run_config(run: RunDir | str | Path) -> RunConfig | None:
    """The run's resolved config, or None when the run was never initialised with one."""
    path = RunDir.of(run).config
    return load_config(path) if path.exists() else None


def _show(value: Any) -> str:
    return (
        '""'
        if value == ""
        else "null"
        if value is None
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def config_help() -> str:
    """Every config key with its default and help (``opdcache init --help``)."""
    rows = list(help_rows(RunConfig))
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (YAML sections, or --set SECTION.KEY=VALUE):"]
    lines += [f"  {k:<{width}}  {h} [default: {_show(d)}]" for k, d, h in rows]
    return "\n".join(lines)


def config_markdown() -> str:
    """docs/config.md: the same table, generated (a test keeps the file in step with the code)."""
    lines = [
        "# Run configuration keys",
        "",
        "Generated from the field definitions in `opdcache/config.py`, `opdcache/budget.py` and",
        "`opdcache/variant.py` (`python -m opdcache.config > docs/config.md`). Set them in the YAML",
        "file given to `opdcache init` / `opdcache run`, or with `--set section.key=value`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    pipe = "\\|"
    lines += [f"| `{k}` | `{_show(d)}` | {h.replace('|', pipe)} |" for k, d, h in help_rows(RunConfig)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_markdown(), end="")
