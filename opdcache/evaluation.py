"""Avg@n accuracy of a checkpoint on a prompt file (vLLM sampling, answers in ``\\boxed{}``), and with
a teacher the distillation metrics on the student's own samples.

    opdcache eval CHECKPOINT --data FILE [--n 16] [--checker math|exact] [--out FILE]
    opdcache eval CHECKPOINT --data FILE --teacher TEACHER [--k 16] [--band 64]

``math`` checks answers with math-verify (symbolic equivalence, for real math data: AIME / AMC /
MATH-500 exports); ``exact`` compares the last ``\\boxed{}`` content as a string (the toy task).
With a teacher, every sample's positions get the student's top-k (vLLM raw log-probs) and the
teacher's log-probs at those ids (the gathering forward of the teacher stage), from which: the top-k
reverse KL to the teacher (``reliability.topk_reverse_kl``), the teacher's and the student's own NLL
of the sampled tokens, their difference (``sample_kl``: log p(y) - log q(y) at the sampled y, a
Monte Carlo estimate of the full-vocabulary reverse KL under the eval's sampling, which the top-k KL
cannot see: mass moved outside the student's top-k), the exact full-vocabulary reverse KL (the
checkpoint loaded in transformers fp32 beside the teacher: sum_v p(v) (log p(v) - log q(v)) per
position), and the top-k overlap (eq. 6), each a token mean per prompt, then a mean over prompts (so two checkpoints can be compared prompt by prompt),
plus overlap and KL by depth band.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opdcache.chain import horizon
from opdcache.config import DataConfig
from opdcache.errors import OpdcacheError
from opdcache.grading import Checker, extract_boxed, grader
from opdcache.models.checkpoint import require_checkpoint
from opdcache.prompts import encode_prompts, load_prompts
from opdcache.results import EvalResult
from opdcache.rollout import engine
from opdcache.rundir import atomic_write_bytes

DAPO_TEMPLATE = DataConfig.template


@dataclass(frozen=True)
class EvalTeacher:
    """A loaded teacher for the distillation metrics."""

    model: Any
    path: str
    vocab: int  # usable vocabulary (teacher_stage.checked_vocab)
    k: int = 16
    band: int = 64
    chunk: int = 1024  # teacher.chunk_positions
    student: Any = None  # the evaluated checkpoint in transformers (fp32): the full-vocabulary KL


class _Pooled:
    """Token sums and counts of one metric, per prompt and per depth band."""

    def __init__(self) -> None:
        self.per_prompt: dict[str, list[float]] = {}
        self.bands: dict[int, list[float]] = {}

    def add(self, prompt: str, values: np.ndarray, band: int) -> None:
        acc = self.per_prompt.setdefault(prompt, [0.0, 0.0])
        acc[0] += float(values.sum(dtype=np.float64))
        acc[1] += len(values)
        b = np.arange(len(values)) // band
        for i in np.unique(b):
            row = self.bands.setdefault(int(i) * band, [0.0, 0.0])
            row[0] += float(values[b == i].sum(dtype=np.float64))
            row[1] += int((b == i).sum())

    def prompt_means(self) -> dict[str, float]:
        return {p: s / c for p, (s, c) in self.per_prompt.items() if c}

    def mean(self) -> float:
        means = list(self.prompt_means().values())
        return float(np.mean(means)) if means else float("nan")

    def band_means(self) -> dict[str, float]:
        return {str(b): s / c for b, (s, c) in sorted(self.bands.items())}


def distill_fields(teacher: EvalTeacher, prompts: list, encoded: list, outs: list, progress: bool) -> dict:
    """The EvalResult fields of the distillation metrics (module docstring) for generated ``outs``."""
    from tqdm.auto import tqdm

    from opdcache.score.reliability import topk_overlap, topk_reverse_kl  # numba: after vLLM spawned
    from opdcache.teacher.forward import score_response

    kl, full, nll, own, ov = _Pooled(), _Pooled(), _Pooled(), _Pooled(), _Pooled()
    ent, t_ent = _Pooled(), _Pooled()
    total = sum(len(o.outputs) for o in outs)
    with tqdm(total=total, desc="teacher metrics", unit="sample", disable=not progress) as bar:
        for pr, ids, out in zip(prompts, encoded, outs, strict=True):
            for c in out.outputs:
                bar.update(1)
                if not c.token_ids:
                    continue
                a = engine.completion_arrays(c, teacher.k)
                t = score_response(
                    teacher.model,
                    np.asarray(ids),
                    a["response_ids"],
                    a["student_topk_ids"],
                    teacher.k,
                    teacher.vocab,
                    teacher.chunk,
                    student=teacher.student,
                )
                if t.full_kl is not None:
                    full.add(pr.prompt_id, t.full_kl, teacher.band)
                    ent.add(pr.prompt_id, t.student_entropy, teacher.band)
                    t_ent.add(pr.prompt_id, t.teacher_entropy, teacher.band)
                kl.add(
                    pr.prompt_id, topk_reverse_kl(a["student_topk_logprobs"], t.on_student_topk), teacher.band
                )
                nll.add(pr.prompt_id, -t.sampled_logprob, teacher.band)
                own.add(pr.prompt_id, -a["student_logprob"], teacher.band)
                ov.add(pr.prompt_id, topk_overlap(a["student_topk_ids"], t.topk_ids), teacher.band)
    return {
        "teacher": teacher.path,
        "k": teacher.k,
        "topk_kl": kl.mean(),
        "teacher_nll": nll.mean(),
        "student_nll": own.mean(),
        "sample_kl": nll.mean() - own.mean(),
        "full_kl": full.mean() if full.per_prompt else None,
        "student_entropy": ent.mean() if ent.per_prompt else None,  # full vocabulary, own samples
        "teacher_entropy": t_ent.mean() if t_ent.per_prompt else None,  # at the student's prefixes
        "overlap": ov.mean(),
        "band": teacher.band,
        "overlap_by_band": ov.band_means(),
        "kl_by_band": kl.band_means(),
        "per_prompt_kl": kl.prompt_means(),
        "per_prompt_nll": nll.prompt_means(),
        "per_prompt_sample_kl": {p: v - own.prompt_means()[p] for p, v in nll.prompt_means().items()},
        "per_prompt_full_kl": full.prompt_means(),
        "full_kl_by_band": full.band_means(),
    }


def evaluate_with(
    llm: Any,
    tokenizer: Any,
    data: str | Path,
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    checker: Checker,
    template: str,
    chat: bool,
    fields: Mapping[str, str] | None = None,
    checkpoint: str = "",
    teacher: EvalTeacher | None = None,
    progress: bool = False,
    seed: int = 0,
) -> EvalResult:
    """Evaluate with an engine already holding the checkpoint (asked for >= ``teacher.k`` log-probs
    when a teacher is given). Prompt p's samples draw from ``request_seed`` of (``seed``, p's id): the
    same for every checkpoint, so two checkpoints' accuracies are paired on common random numbers."""
    prompts = load_prompts(data, fields, quiet=True)
    encoded = encode_prompts(tokenizer, prompts, template, chat)
    t0 = time.perf_counter()
    k = teacher.k if teacher else 0
    seeds = [engine.request_seed(n, "eval", seed, pr.prompt_id) for pr in prompts]  # same per checkpoint
    outs = engine.generate(llm, encoded, n, temperature, max_tokens, k=k, top_p=top_p, seeds=seeds)
    per_prompt, lengths, truncated, boxed, prefixes = {}, [], 0, 0, []
    for pr, out in zip(prompts, outs, strict=True):
        correct = grader(pr.answer, checker)
        per_prompt[pr.prompt_id] = float(np.mean([correct(c.text) for c in out.outputs]))
        if checker == "chain":
            prefixes += [horizon(c.text, pr.answer)[1] for c in out.outputs]
        lengths += [len(c.token_ids) for c in out.outputs]
        truncated += sum(c.finish_reason == "length" for c in out.outputs)
        boxed += sum(extract_boxed(c.text) is not None for c in out.outputs)
    distill = distill_fields(teacher, prompts, encoded, outs, progress) if teacher else {}
    acc = np.array(list(per_prompt.values()))
    return EvalResult(
        checkpoint,
        str(data),
        n,
        temperature,
        max_tokens,
        checker,
        len(prompts),
        float(acc.mean()),
        float((acc > 0).mean()),
        float(np.mean(lengths)),
        truncated / len(lengths),
        time.perf_counter() - t0,
        per_prompt,
        top_p=top_p,
        boxed_rate=boxed / len(lengths),
        stop_rate=1 - truncated / len(lengths),
        horizon=float(np.mean(prefixes)) if prefixes else None,
        **distill,
    )


def evaluate(
    checkpoint: str,
    data: str | Path,
    *,
    n: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_tokens: int = 0,
    checker: Checker = "math",
    template: str = DAPO_TEMPLATE,
    chat: bool = False,
    fields: Mapping[str, str] | None = None,
    seed: int = 0,
    kv_cache_gib: int = 2,
    enforce_eager: bool | str = "auto",
    out: str | Path | None = None,
    engines: engine.PersistentEngine | None = None,
    k: int = 1,
    teacher: str = "",
    teacher_k: int = 16,
    band: int = 64,
    teacher_model: Any = None,
    teacher_settings: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate Avg@n of ``checkpoint``, optionally writing the result JSON.

    The reference protocol is the default: Avg@16 at temperature 1.0, top-p 0.95, and a long budget
    (``max_tokens`` 0: as many tokens as the model's context leaves after the longest prompt).
    ``engines`` (``opdcache run``) is an engine kept across stages (asked for ``k`` log-probs, so the
    rollout can use it too); without it an engine is started and shut down here.

    ``teacher`` (a checkpoint sharing the student's tokenizer) adds the distillation metrics at top-
    ``teacher_k``, overlap and KL by depth bands of ``band`` tokens. ``teacher_model`` (``opdcache run``:
    the run's resident teacher) is that checkpoint already loaded; ``teacher_settings`` the run's
    ``teacher.*`` (dtype, device, device_map, chunk_positions); without them the defaults (fp32 on CPU).
    """
    from transformers import AutoTokenizer

    if n < 1 or max_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or teacher_k < 1 or band < 1:
        raise OpdcacheError(
            f"eval: need n >= 1, max_tokens >= 0, temperature >= 0, 0 < top_p <= 1, k >= 1, band >= 1 "
            f"(got {n}, {max_tokens}, {temperature}, {top_p}, {teacher_k}, {band})"
        )
    longest, max_tokens = eval_context(checkpoint, data, max_tokens, template, chat, fields)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    t_model = None
    if teacher:  # checked and loaded before the engine starts: a wrong teacher fails fast
        from opdcache.teacher.stage import checked_vocab, load_teacher

        ts = dict(teacher_settings or {})
        vocab = checked_vocab(teacher, checkpoint)
        t_model = teacher_model or load_teacher(
            teacher, ts.get("dtype", "auto"), ts.get("device", "auto"), ts.get("device_map", "")
        )
        from transformers import AutoModelForCausalLM

        device = t_model.get_output_embeddings().weight.device
        student = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
        t_model = EvalTeacher(
            t_model, teacher, vocab, teacher_k, band, ts.get("chunk_positions", 1024), student
        )
        k = max(k, teacher_k)
    own = engines is None
    if own:
        engines = engine.PersistentEngine(kv_cache_gib=kv_cache_gib, enforce_eager=enforce_eager)
    try:
        llm, startup = engines.get(checkpoint, k, longest + max_tokens, seed)
        res = evaluate_with(
            llm,
            tokenizer,
            data,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            checker=checker,
            template=template,
            chat=chat,
            fields=fields,
            checkpoint=checkpoint,
            teacher=t_model,
            progress=progress,
            seed=seed,
        )
    finally:
        engines.close() if own else engines.release()
    res = dataclasses.replace(res, startup_seconds=startup)
    if out is not None:
        write_eval(res, out)
    return res


def eval_context(
    checkpoint: str,
    data: str | Path,
    max_tokens: int,
    template: str,
    chat: bool,
    fields: Mapping[str, str] | None = None,
) -> tuple[int, int]:
    """(longest prompt in tokens, max_tokens resolved): 0 means what the model's context leaves."""
    from transformers import AutoConfig, AutoTokenizer

    require_checkpoint(checkpoint, "eval")
    ps = load_prompts(data, fields)  # fail on bad data before any engine starts
    longest = max(
        len(e) for e in encode_prompts(AutoTokenizer.from_pretrained(checkpoint), ps, template, chat)
    )
    context = getattr(AutoConfig.from_pretrained(checkpoint), "max_position_embeddings", None) or 1 << 30
    max_tokens = max_tokens or context - longest
    if longest + max_tokens > context:
        raise OpdcacheError(
            f"eval: longest prompt ({longest} tokens) + max_tokens {max_tokens} exceed the context of "
            f"{checkpoint} ({context}); lower max_tokens"
        )
    return longest, max_tokens


def write_eval(res: EvalResult, out: str | Path) -> None:
    atomic_write_bytes(Path(out), json.dumps(asdict(res), indent=1).encode())


def read_eval(path: str | Path) -> EvalResult:
    try:
        return EvalResult(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise OpdcacheError(f"{path}: not an opdcache eval result ({e})") from e


def greedy_answers(
    checkpoints: list[tuple[str, Path]], prompts: list, template: str, chat: bool, tokens: int
) -> dict[str, list[str]]:
    """Each named checkpoint's greedy answer to each prompt (transformers, fp32: read, not sampled)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints[0][1])
    encoded = encode_prompts(tok, prompts, template, chat)
    answers: dict[str, list[str]] = {}
    for name, path in tqdm(checkpoints, desc="greedy answers", unit="model", leave=False):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        answers[name] = []
        for ids in encoded:
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id
                )
            answers[name].append(tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    return answers
