"""What each stage reports (small typed results) and how the CLI prints them.

Every stage result has ``skipped`` (nothing was left to do) and ``startup_seconds`` (engine or model
start-up inside the stage's wall time), which is what RUN/stage_times.jsonl records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import singledispatch

from opdcache.budget import BudgetState, Decision
from opdcache.variant import VariantSpec


@dataclass(frozen=True)
class RolloutResult:
    round: int
    max_tokens: int
    parts: int  # the parts this worker generates (all of the round's unless sharded)
    parts_done_before: int  # found complete (a resumed or repeated rollout)
    tokens: int = 0  # positions written
    seconds: float = 0.0  # generation only
    startup_seconds: float = 0.0  # vLLM engine start (and, in flight, the teacher's load)
    generated_tokens: int = 0  # decoded by the engine: in flight, also those cut off after a stop
    teacher_positions: int = 0  # in flight: response positions the teacher scored during the rollout

    @property
    def skipped(self) -> bool:
        return self.parts_done_before == self.parts


@dataclass(frozen=True)
class TeacherResult:
    round: int
    parts: int  # parts completed by this call
    tokens: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # teacher model load

    @property
    def teacher_positions(self) -> int:  # response positions scored: one forward per position
        return self.tokens

    @property
    def skipped(self) -> bool:
        return self.parts == 0


@dataclass(frozen=True)
class ScoreRound:
    round: int
    responses: int
    positions: int
    mean_metric: float  # mean overlap O, or acceptance rate for top_p
    retained_fraction: float  # sum E / positions
    effective_len_mean: float
    match: dict[str, float] = field(default_factory=dict)  # random arm: target and achieved retention
    seconds: float = 0.0


@dataclass(frozen=True)
class ScoreResult:
    variant: str
    spec: VariantSpec
    rounds: list[ScoreRound]
    startup_seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        return not self.rounds


@dataclass(frozen=True)
class TrainResult:
    round: int
    skipped: bool
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    startup_seconds: float = 0.0  # model, optimizer and DeepSpeed state load
    clip_frac_first: float | None = None  # 0 when old log-probs are the trainer's own
    old_logprob_max_abs_diff: float | None = None  # recomputed vs cached (engine/trainer mismatch)
    old_logprob_mean_abs_diff: float | None = None


@dataclass(frozen=True)
class EvalRoundResult:
    round: int
    skipped: bool
    accuracy: float
    startup_seconds: float = 0.0


@dataclass(frozen=True)
class EvalResult:
    checkpoint: str
    data: str
    n: int
    temperature: float
    max_tokens: int
    checker: str
    prompts: int
    accuracy: float  # Avg@n: mean over prompts and samples
    pass_at_n: float
    mean_response_tokens: float
    truncated: float  # fraction of samples that hit max_tokens
    seconds: float  # generation and grading
    per_prompt: dict[str, float]
    top_p: float = 1.0  # absent from results written before it was recorded
    startup_seconds: float = 0.0  # vLLM engine start
    boxed_rate: float | None = None  # fraction of samples with a complete \boxed{} (None: older results)
    stop_rate: float | None = None  # fraction that ended on their own (EOS / stop), 1 - truncated
    horizon: float | None = None  # checker chain: mean share of steps before the first wrong one
    # distillation metrics against a teacher (opdcache eval --teacher, eval.teacher); None without one
    teacher: str = ""
    k: int = 0  # top-k of the metrics below
    topk_kl: float | None = None  # top-k reverse KL to the teacher, per-prompt mean of the token mean
    teacher_nll: float | None = None  # teacher's NLL of the student's sampled tokens, same averaging
    student_nll: float | None = None  # the student's own NLL of them (raw log-probs), same averaging
    sample_kl: float | None = None  # teacher_nll - student_nll: sampled estimate of the full reverse KL
    full_kl: float | None = None  # exact full-vocabulary reverse KL at the sampled prefixes, same averaging
    student_entropy: float | None = None  # the student's full-vocabulary entropy at its samples' positions
    teacher_entropy: float | None = None  # the teacher's, at the same prefixes
    overlap: float | None = None  # top-k overlap (eq. 6), same averaging
    band: int = 0  # width of the depth bands of overlap_by_band, in tokens
    overlap_by_band: dict[str, float] = field(default_factory=dict)  # band start -> token-mean overlap
    kl_by_band: dict[str, float] = field(default_factory=dict)  # band start -> token-mean top-k KL
    per_prompt_kl: dict[str, float] = field(default_factory=dict)  # prompt -> token-mean top-k KL
    per_prompt_nll: dict[str, float] = field(default_factory=dict)  # prompt -> token-mean teacher NLL
    per_prompt_sample_kl: dict[str, float] = field(default_factory=dict)  # prompt -> sample_kl
    per_prompt_full_kl: dict[str, float] = field(default_factory=dict)  # prompt -> token-mean full KL
    full_kl_by_band: dict[str, float] = field(default_factory=dict)  # band start -> token-mean full KL


@dataclass(frozen=True)
class RoundResult:
    round: int
    max_tokens: int
    decision: Decision
    train: TrainResult | None


@dataclass(frozen=True)
class PackResult:
    archive: str
    components: list[str]  # top-level names packed
    files: int
    bytes: int  # run data: the regular files packed
    archive_bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class UnpackResult:
    archive: str
    dest: str
    files: int
    bytes: int  # run data: the regular files unpacked
    parts_checked: int  # Parquet parts checked against their integrity records
    seconds: float  # all of it, checks included
    check_seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds else 0.0


@singledispatch
def describe(result: object) -> str:
    """One human line (or table) per result, as the CLI prints it."""
    raise TypeError(f"no description for {type(result).__name__}")


@describe.register
def _(s: RolloutResult) -> str:
    rate = f", {s.generated_tokens / s.seconds:.0f} tokens/s" if s.generated_tokens and s.seconds else ""
    cut = s.generated_tokens - s.tokens
    return (
        f"rollout round {s.round}: budget {s.max_tokens}, {s.parts} parts ({s.parts_done_before} already done), "
        f"{s.tokens} tokens{rate}" + (f" ({cut} more decoded past in-flight stops)" if cut > 0 else "")
    )


@describe.register
def _(s: TeacherResult) -> str:
    rate = f", {s.tokens / s.seconds:.0f} positions/s" if s.tokens and s.seconds else ""
    return f"teacher round {s.round}: {s.parts} parts scored, {s.tokens} positions{rate}"


@describe.register
def _(s: ScoreResult) -> str:
    metric = "accept" if s.spec.metric == "top_p" else "overlap"
    lines = [
        f"variant {s.variant}: {json.dumps(s.spec.to_meta())}",
        f"{'round':>5} {'responses':>9} {'positions':>10} {'mean ' + metric:>12} {'retained':>8} {'mean E':>8}",
    ]
    lines += [
        f"{r.round:>5} {r.responses:>9} {r.positions:>10} {r.mean_metric:>12.4f} "
        f"{r.retained_fraction:>8.3f} {r.effective_len_mean:>8.1f}"
        for r in s.rounds
    ]
    return "\n".join(lines)


@describe.register
def _(s: TrainResult) -> str:
    if s.skipped:
        return f"train round {s.round}: checkpoint for round {s.round + 1} exists, skipped"
    rate = s.tokens / s.seconds if s.seconds else 0.0
    return (
        f"train round {s.round}: {s.steps} optimizer steps, {s.tokens} tokens, {rate:.0f} tokens/s, "
        f"loss {s.loss_first:.4g} -> {s.loss_last:.4g}; old log-probs recomputed, |trainer - engine| "
        f"max {s.old_logprob_max_abs_diff:.3g} mean {s.old_logprob_mean_abs_diff:.3g}"
    )


@describe.register
def _(s: BudgetState) -> str:
    lines = [
        f"{'round':>5} {'M_t':>6} {'hit':>6} {'E mean':>8} {'E min':>6} {'E max':>6} {'action':>7} {'M_t+1':>6}"
    ]
    lines += [
        f"{d.round:>5} {d.max_tokens:>6} {d.hit_ratio:>6.3f} {d.effective_len_mean:>8.1f} "
        f"{d.effective_len_min:>6} {d.effective_len_max:>6} {d.action:>7} {d.next_max_tokens:>6}"
        for d in s.history
    ]
    lines.append(
        f"next round {s.next_round}: max_tokens = {s.max_tokens} (low-hit rounds in a row: {s.low_hits})"
    )
    return "\n".join(lines)


@describe.register
def _(out: RoundResult) -> str:
    d, t = out.decision, out.train
    trained = (
        "not run"
        if t is None
        else "skipped"
        if t.skipped
        else f"{t.steps} steps, loss {t.loss_first:.4g} -> {t.loss_last:.4g}"
    )
    return (
        f"round {out.round}: M_t {d.max_tokens}, E mean {d.effective_len_mean:.1f}, hit {d.hit_ratio:.2f} "
        f"-> {d.action} M_t+1 {d.next_max_tokens}; train {trained}"
    )


@describe.register
def _(res: EvalResult) -> str:
    return (
        f"{res.checkpoint} on {res.data}: Avg@{res.n} = {res.accuracy:.4f}, pass@{res.n} = "
        f"{res.pass_at_n:.4f} over {res.prompts} prompts; mean length {res.mean_response_tokens:.0f} tokens, "
        f"{res.truncated:.1%} truncated ({res.seconds:.0f} s)"
        + (
            f"; vs teacher {res.teacher}: top-{res.k} KL {res.topk_kl:.4f}, full KL {res.full_kl or 0:.4f}, "
            f"sampled KL {res.sample_kl:.3f} "
            f"(teacher NLL {res.teacher_nll:.3f} - own {res.student_nll:.3f}), top-{res.k} overlap {res.overlap:.3f}"
            if res.topk_kl is not None
            else ""
        )
    )


@describe.register
def _(res: PackResult) -> str:
    return (
        f"packed {res.files} files, {res.bytes / 1e6:.1f} MB of run data ({', '.join(res.components)}), "
        f"into {res.archive} ({res.archive_bytes / 1e6:.1f} MB) in {res.seconds:.1f} s: {res.mb_per_s:.0f} MB/s"
    )


@describe.register
def _(res: UnpackResult) -> str:
    return (
        f"unpacked {res.archive} into {res.dest}: {res.files} files, {res.bytes / 1e6:.1f} MB, "
        f"{res.parts_checked} Parquet parts checked against their records, in {res.seconds:.1f} s "
        f"({res.check_seconds:.1f} s checking): {res.mb_per_s:.0f} MB/s"
    )
