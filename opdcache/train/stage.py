"""The training stage: one round of OPD on cached rollouts, under DeepSpeed.

    opdcache train RUN --round R

Reads RUN/cache/round=R and the run's variant scores (weights L), trains the round's student
checkpoint with the OPD loss (loss.py) under ``deepspeed.initialize`` (CPU: gloo, one process or
the launcher; GPUs unchanged), and writes RUN/checkpoints/round=R+1 (HF safetensors + tokenizer,
what the next rollout loads) and RUN/deepspeed/round=R+1 (engine checkpoint, optimizer state for the
next round). The HF checkpoint is renamed into place last: it marks the stage as done.

One round's update, as the reference recipe (verl) does it:
  1. each rank owns a fixed share of the round's responses (``plan_batches``);
  2. old log-probs: the trainer's own forward (no grad) at the cached top-k ids, before any step, so
     the importance ratio is 1 at the first step; the whole student side of the reward uses them
     (the cached vLLM values stay the rollout record; their difference is reported);
  3. per epoch (``train.epochs``), mini-batches of ``train.mini_batch_responses`` responses (default:
     all, i.e. one optimizer step per round), each accumulated over micro-batches of
     ``train.micro_batch_size``; every rank runs the same number of micro-batches (empty ones are
     zero-weight), and the token mean is over the whole mini-batch on all ranks.

Arms prune-grpo and grpo (issue 24) train ``loss.hybrid_policy_loss`` instead: the same forward also
gives the sampled token's log-prob (its old value from the same recompute), and ``term_masks``
says which positions take the OPD term and which the GRPO term.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from opdcache.arms import ArmPlan
from opdcache.arms import plan as arm_plan
from opdcache.config import RunConfig
from opdcache.errors import OpdcacheError
from opdcache.models.checkpoint import student_checkpoint
from opdcache.models.memory import release_gpu_memory
from opdcache.results import TrainResult
from opdcache.rundir import RunDir, atomic_write_bytes, replace_dir
from opdcache.train.data import Example, collate, load_examples
from opdcache.train.extensions import before_deepspeed
from opdcache.train.lora import save_lora, state_bytes
from opdcache.train.loss import REST_OBJECTIVES, Terms, policy_loss
from opdcache.train.retention import prune_checkpoints

RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def single_process_env() -> Iterator[None]:
    """A single process without a launcher still needs the rendezvous variables.

    They are set for the stage only: a process started later (a vLLM worker, a child ``opdcache``)
    must not inherit RANK and a MASTER_PORT this process's gloo store holds. The process group
    stays initialized, so later rounds in the same process do not rendezvous again.
    """
    if "RANK" in os.environ:
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        yield
    finally:
        for key in RENDEZVOUS:
            os.environ.pop(key, None)


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # step() is the accumulation boundary: a mini-batch has as many micro-batches as it needs
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.grad_clip,
        # ZeRO-3 exports the HF checkpoint by gathering the partitions (save_16bit_model needs this)
        "zero_optimization": {
            "stage": t.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": t.zero_stage == 3,
        },
        "bf16": {"enabled": t.bf16},
        "steps_per_print": 1 << 30,
    }


def sequence_logprobs(
    model: Any, batch: dict[str, torch.Tensor], sampled: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi_theta at the cached top-k ids, ``[B, T, k]``; with ``sampled`` also at the sampled token
    y_tau, ``[B, T]`` (the GRPO term's), from the same forward."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    idx = batch["positions"].unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    lp = torch.log_softmax(logits.gather(1, idx).float(), dim=-1)
    if not sampled:
        return lp.gather(2, batch["topk_ids"])
    both = lp.gather(2, torch.cat([batch["topk_ids"], batch["response_ids"].unsqueeze(-1)], dim=-1))
    return both[..., :-1], both[..., -1]


def forward_terms(
    model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0, rest_grad: bool = True
) -> Terms:
    """One forward of the student on a collated batch -> the objectives' ``Terms``: log p_theta at the
    student's and the teacher's cached top-k ids and at the sampled token, log P_R over the rest of the
    vocabulary (U = both top-k sets), and the full-vocabulary entropy (no gradient). ``rest_grad``
    False: log P_R and the teacher-id log-probs only as diagnostics, without a gradient (objectives
    that do not train on them keep no vocabulary-sized tensor alive for the backward).
    ``sampler_weight`` is the batch's (set by the old-log-prob pass); with ``temperature`` != 1 that
    pass gets it here as p(y) / p_T(y), y's probability under the rollout's sampling distribution."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    idx = batch["positions"].unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    picked = logits.gather(1, idx).float()
    lp = torch.log_softmax(picked, dim=-1)
    s_ids, t_ids, y = batch["topk_ids"], batch["teacher_ids"], batch["response_ids"].unsqueeze(-1)
    with torch.no_grad():
        in_u = torch.zeros(lp.shape, dtype=torch.bool, device=lp.device)
        in_u.scatter_(2, s_ids, True).scatter_(2, t_ids, True)
        y_in_rest = ~in_u.gather(2, y)[..., 0]
        entropy = torch.special.entr(lp.exp()).sum(-1)
        sampler_weight = batch.get("sampler_weight")
        if temperature != 1.0:
            lp_temp = torch.log_softmax(picked / temperature, dim=-1)
            sampler_weight = (lp.gather(2, y) - lp_temp.gather(2, y))[..., 0].exp()
    with torch.set_grad_enabled(rest_grad and torch.is_grad_enabled()):
        log_rest = lp.masked_fill(in_u, float("-inf")).logsumexp(-1)
        logp_t = lp.gather(2, t_ids)
    return Terms(
        logp=lp.gather(2, s_ids),
        old=batch["old"],
        teacher=batch["teacher"],
        weight=batch["weight"],
        mask=batch["mask"],
        logp_t=logp_t,
        teacher_t=batch["teacher_topk"],
        new_t=~(t_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)).any(-1),
        log_rest=log_rest,
        logp_y=lp.gather(2, y)[..., 0],
        old_y=batch["old_y"],
        teacher_y=batch["teacher_y"],
        y_in_rest=y_in_rest,
        entropy=entropy,
        sampler_weight=sampler_weight,
    )


@dataclass(frozen=True)
class BatchPlan:
    owned: list[int]  # this rank's examples (indices into the round's examples)
    recompute: list[list[int]]  # micro-batches of ``owned`` for the old-log-prob pass
    steps: list[list[list[int]]]  # per optimizer step (epochs x mini-batches): this rank's micro-batches


def term_masks(
    terms: str, mask: torch.Tensor, rel: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions of the OPD term, positions of the GRPO term) of an arm's terms (arms.ArmPlan): gated
    switches at R = 0 (R <= eps, eq. 12's criterion, so the GRPO suffix is exactly what E leaves out)."""
    reliable = rel > eps
    none = torch.zeros_like(mask)
    return {
        "gated": (mask & reliable, mask & ~reliable),
        "sum": (mask, mask),
        "grpo": (none, mask),
    }[terms]


def plan_batches(n: int, rank: int, world: int, mini: int, micro: int, epochs: int, seed: int) -> BatchPlan:
    """Which examples each rank forwards when, with the same number of micro-batches on every rank.

    Rank ``rank`` owns ``perm[rank::world]`` of a seeded permutation of the ``n`` examples. A
    mini-batch of ``mini`` responses (0: all ``n``) takes ``ceil(mini / world)`` of each rank's
    (per-epoch reshuffled) share; it is split into ``ceil(largest share / micro)`` micro-batches on
    every rank, so some may be empty (the trainer runs them with zero weight).
    """
    mini = mini or n
    perm = np.random.default_rng([seed, 0]).permutation(n)
    shares = [perm[q::world].tolist() for q in range(world)]
    owned = shares[rank]
    local = -(-mini // world)
    n_steps = -(-n // mini)

    def split(items: list[int], count: int) -> list[list[int]]:
        return [items[i * micro : (i + 1) * micro] for i in range(count)]

    steps = []
    for epoch in range(epochs):
        mine = [owned[i] for i in np.random.default_rng([seed, 1 + epoch, rank]).permutation(len(owned))]
        for j in range(n_steps):
            largest = max(len(sh[j * local : (j + 1) * local]) for sh in shares)
            steps.append(split(mine[j * local : (j + 1) * local], -(-largest // micro)))
    recompute = split(owned, -(-max(len(sh) for sh in shares) // micro))
    return BatchPlan(owned, recompute, steps)


@dataclass
class Trainer:
    """A DeepSpeed engine holding the student that round ``r`` samples from, with its optimizer state."""

    engine: Any
    model: Any
    tokenizer: Any
    source: str
    r: int


class ResidentTrainer:
    """The trainer kept in memory across the rounds of an ``opdcache run`` (CPU).

    After round r trains, its engine already holds checkpoint r+1 and the optimizer state saved with
    it, so round r+1 skips loading both from disk (they are still written every round, and a resumed
    run loads them). On a GPU ``keep`` drops it (train_round then empties the cache) so the rollout
    engine and the teacher get the memory.
    """

    def __init__(self) -> None:
        self.held: Trainer | None = None

    def take(self, r: int) -> Trainer | None:
        held, self.held = self.held, None
        return held if held is not None and held.r == r else None

    def keep(self, trainer: Trainer) -> None:
        self.held = None if torch.cuda.is_available() else trainer


def train_round(
    run: RunDir,
    r: int,
    cfg: RunConfig,
    variant: str,
    progress: bool = True,
    resident: ResidentTrainer | None = None,
    *,
    student: Callable[[], str] | None = None,
    arm: ArmPlan | None = None,
) -> TrainResult:
    """Train round ``r``'s student on its cache weighted by ``variant``'s L -> checkpoints/round=<r+1>.

    With ``resident`` (``opdcache run``) the engine trained in round r-1 is reused when it holds round
    r's student, and the one trained here is kept for round r+1. ``student`` (a call returning the round's
    checkpoint) and ``arm`` (the arm's plan) where the caller has them (``stages.RoundContext``)."""
    run.require()
    if run.done("train", r):
        return TrainResult(r, skipped=True)
    with single_process_env():
        res = _train_round(run, r, cfg, variant, progress, resident, student, arm)
    if resident is None or torch.cuda.is_available():
        release_gpu_memory()
    return res


def load_trainer(run: RunDir, r: int, cfg: RunConfig, source: str | None = None) -> Trainer:
    """The student of round r (checkpoint r, or the initial student: ``source`` where the caller has
    resolved it) and its optimizer state, under DeepSpeed."""
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = source or student_checkpoint(run, cfg, r)
    tokenizer = AutoTokenizer.from_pretrained(source)
    before_deepspeed()
    lora = cfg.train.lora
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    if lora.rank:  # the initial student under the run's one adapter (train/lora.py)
        from opdcache.train.lora import with_adapter

        base = AutoModelForCausalLM.from_pretrained(student_checkpoint(run, cfg, 0), dtype=dtype)
        model = with_adapter(base, lora, source, trained=run.checkpoint(r).is_dir(), seed=cfg.train.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    ds_prev = run.deepspeed_state(r)
    if ds_prev.is_dir():
        engine.load_checkpoint(str(ds_prev), load_module_strict=True, load_module_only=False)
    return Trainer(engine, model, tokenizer, source, r)


def _batch(examples: list[Example], idx: list[int], pad: int) -> dict[str, torch.Tensor]:
    """Collated micro-batch; an empty one is a zero-weight copy of example 0 (keeps ranks in step)."""
    batch = collate([examples[i] for i in idx] or [examples[0]], pad)
    if not idx:
        batch["mask"].zero_()
        batch["weight"].zero_()
    return batch


def _grad_norm(model: Any) -> float:
    """2-norm of all gradients (what gradient clipping compares with train.grad_clip)."""
    grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _all_reduce(value: float, op: str = "sum") -> float:
    """A scalar reduced over ranks (on the accelerator: NCCL has no CPU tensors)."""
    import deepspeed

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    deepspeed.comm.all_reduce(
        t, op=deepspeed.comm.ReduceOp.MAX if op == "max" else deepspeed.comm.ReduceOp.SUM
    )
    return float(t.item())


def _train_round(
    run: RunDir,
    r: int,
    cfg: RunConfig,
    variant: str,
    progress: bool,
    resident: ResidentTrainer | None,
    student: Callable[[], str] | None,
    arm: ArmPlan | None,
) -> TrainResult:
    t_load = time.perf_counter()
    arm = arm or arm_plan(cfg)
    outcome = arm.terms != "opd"  # the GRPO term needs R, the outcome advantages and log p(y)
    examples = load_examples(run, r, variant, outcome)
    trainer = (resident.take(r) if resident else None) or load_trainer(
        run, r, cfg, student() if student else None
    )
    engine, tokenizer = trainer.engine, trainer.tokenizer
    torch.manual_seed(cfg.train.seed + r)  # after loading: a resident and a loaded trainer draw alike
    rank, world = engine.global_rank, engine.world_size
    t = cfg.train
    eps = dict(arm.variants)[variant].eps if variant in dict(arm.variants) else cfg.score.spec.eps
    plan = plan_batches(
        len(examples), rank, world, t.mini_batch_responses, t.micro_batch_size, t.epochs, t.seed + 7919 * r
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    recompute = _recompute_old(engine, examples, plan.recompute, pad, cfg.rollout.temperature)

    step_fn = partial(_optimizer_step, engine, examples, pad, t, arm.terms if outcome else None, eps, r)
    metrics, tokens = [], 0
    engine.train()
    bar = tqdm(total=len(plan.steps), desc=f"train round {r}", unit="step", disable=not progress or rank)
    for step, micro_batches in enumerate(plan.steps):
        row, local_tokens = step_fn(step, micro_batches)
        metrics.append(row)
        tokens += local_tokens
        bar.update(1)
    bar.close()

    _publish(run, r, cfg, trainer, {"variant": variant, **recompute, "metrics": metrics})
    if resident is not None:
        resident.keep(dataclasses.replace(trainer, r=r + 1, source=student_checkpoint(run, cfg, r + 1)))
    return TrainResult(
        r,
        skipped=False,
        steps=len(plan.steps),
        tokens=int(_all_reduce(tokens)),
        seconds=time.perf_counter() - t0,
        loss_first=metrics[0]["loss"] if metrics else None,
        loss_last=metrics[-1]["loss"] if metrics else None,
        startup_seconds=t0 - t_load,
        clip_frac_first=metrics[0]["clip_frac"] if metrics else None,
        **recompute,
    )


def _recompute_old(
    engine: Any, examples: list[Example], recompute: list[list[int]], pad: int, temperature: float
) -> dict[str, float]:
    """Old log-probs from the model being trained, before any step (verl's recomputed old_log_prob),
    written into ``examples``; returns how far they are from the cached vLLM values (over all ranks)."""
    engine.eval()
    diff_max = diff_sum = diff_n = 0.0
    with torch.no_grad():
        for idx in recompute:
            batch = _batch(examples, idx, pad)
            terms = forward_terms(engine, {k: v.to(engine.device) for k, v in batch.items()}, temperature)
            lp, lp_y = terms.logp.float().cpu(), terms.logp_y.float().cpu()
            sw = None if terms.sampler_weight is None else terms.sampler_weight.float().cpu()
            for row, i in enumerate(idx):
                t_i = len(examples[i].response_ids)
                recomputed = lp[row, :t_i].numpy()
                d = np.abs(recomputed - examples[i].old)  # against the cached vLLM values
                examples[i] = dataclasses.replace(
                    examples[i],
                    old=recomputed,
                    old_y=lp_y[row, :t_i].numpy(),
                    sampler_weight=None if sw is None else sw[row, :t_i].numpy(),
                )
                diff_max, diff_sum, diff_n = (
                    max(diff_max, float(d.max())),
                    diff_sum + float(d.sum()),
                    diff_n + d.size,
                )
    diff_max, diff_sum, diff_n = _all_reduce(diff_max, "max"), _all_reduce(diff_sum), _all_reduce(diff_n)
    return {"old_logprob_max_abs_diff": diff_max, "old_logprob_mean_abs_diff": diff_sum / max(diff_n, 1.0)}


def _optimizer_step(
    engine: Any,
    examples: list[Example],
    pad: int,
    t: Any,
    grpo_terms: str | None,
    eps: float,
    r: int,
    step: int,
    micro_batches: list[list[int]],
) -> tuple[dict[str, Any], int]:
    """One optimizer step over this rank's micro-batches: (its metrics row, this rank's tokens).
    ``grpo_terms`` (the arm's terms) adds the GRPO term where the arm trains on outcomes."""
    world = engine.world_size
    local_tokens = sum(len(examples[i].response_ids) for mb in micro_batches for i in mb)
    n_global = _all_reduce(local_tokens)
    loss_sum, stats_sum = 0.0, {}
    for idx in micro_batches:
        batch = {k: v.to(engine.device) for k, v in _batch(examples, idx, pad).items()}
        terms = forward_terms(engine, batch, rest_grad=t.objective in REST_OBJECTIVES)
        grpo = None
        if grpo_terms is not None:
            opd_on, grpo_on = term_masks(grpo_terms, batch["mask"], batch["rel"], eps)
            grpo = (batch["grpo_adv"] * t.grpo_coef, opd_on, grpo_on)
        loss, stats = policy_loss(
            t.objective, terms, t.ppo_clip, t.dual_clip, n_global, t.residual_clamp, grpo
        )
        if not torch.isfinite(loss):
            raise OpdcacheError(f"train round {r}: non-finite loss at step {step}")
        # DeepSpeed averages gradients over ranks; the token mean is already global
        engine.backward(loss * world, scale_wrt_gas=False)
        loss_sum += loss.item()
        for k_, v in stats.items():
            stats_sum[k_] = stats_sum.get(k_, 0.0) + v.item()
    # DeepSpeed records the norm only in its own optimizer wrappers (ZeRO, bf16); with a client
    # optimizer at ZeRO 0 in fp32 it clips without telling, so one process measures it here
    local_norm = _grad_norm(engine.module) if world == 1 and t.zero_stage == 0 and not t.bf16 else None
    engine.step()
    norm = engine.get_global_grad_norm()
    row = {
        "step": step,
        "loss": _all_reduce(loss_sum),
        "tokens": int(n_global),
        **{k_: _all_reduce(v) for k_, v in stats_sum.items()},
        "grad_norm": float(norm) if norm is not None else local_norm,  # before clipping
    }
    return row, local_tokens


def _publish(run: RunDir, r: int, cfg: RunConfig, trainer: Trainer, meta: dict[str, Any]) -> None:
    """checkpoints/round=<r+1> (HF weights, or the LoRA adapter and merged weights) and the DeepSpeed
    state, staged and moved in whole; then the retention of old states and checkpoints."""
    import deepspeed

    engine, model, t, rank = trainer.engine, trainer.model, cfg.train, trainer.engine.global_rank
    # one staging path for all ranks (the engine checkpoint is written collectively)
    staged = run.staging / f"checkpoint-{r + 1}"
    if rank == 0:
        shutil.rmtree(staged, ignore_errors=True)
    deepspeed.comm.barrier()
    engine.save_checkpoint(str(staged / "deepspeed"))
    if t.zero_stage == 3 and not engine.save_16bit_model(str(staged / "hf")):  # collective: all ranks gather
        raise OpdcacheError(f"train round {r}: DeepSpeed did not export the ZeRO-3 model")
    if rank == 0:
        if t.zero_stage == 3:
            model.config.save_pretrained(staged / "hf")
        elif t.lora.rank:
            save_lora(engine.module, staged / "hf")
        else:
            engine.module.save_pretrained(staged / "hf", safe_serialization=True)
        trainer.tokenizer.save_pretrained(staged / "hf")
        record = {
            "round": r,
            "variant": meta["variant"],
            "source": trainer.source,
            "world_size": engine.world_size,
            **{k: v for k, v in meta.items() if k not in ("variant", "metrics")},
            "lora_rank": t.lora.rank,
            "memory": state_bytes(engine.module, engine.optimizer),
            "metrics": meta["metrics"],
        }
        atomic_write_bytes(staged / "hf" / "opdcache_train.json", json.dumps(record).encode())
        replace_dir(staged / "deepspeed", run.deepspeed_state(r + 1))
        replace_dir(staged / "hf", run.checkpoint(r + 1))
        shutil.rmtree(staged, ignore_errors=True)
        if t.keep_states:  # only after the checkpoint that marks the round done is in place
            for old_state in run.rounds(run.deepspeed)[: -t.keep_states]:
                shutil.rmtree(run.deepspeed_state(old_state), ignore_errors=True)
        prune_checkpoints(run, cfg, r + 1)
    deepspeed.comm.barrier()
