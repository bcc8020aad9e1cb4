"""The training stage: one round of OPD on cached rollouts, under DeepSpeed.

    opdcache train RUN --round R

Reads RUN/cache/round=R and the run's variant scores (weights L), trains the round's student
checkpoint with the OPD loss (loss.py) under ``deepspeed.initialize`` (CPU: gloo, one process or
the launcher; GPUs unchanged), and writes RUN/checkpoints/round=R+1 (HF safetensors + tokenizer,
what the next rollout loads) and RUN/deepspeed/round=R+1 (engine checkpoint, optimizer state for the
next round). The HF checkpoint is renamed into place last: it marks the stage as done.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from opdcache.config import RunConfig
from opdcache.errors import OpdcacheError
from opdcache.models.checkpoint import student_checkpoint
from opdcache.results import TrainResult
from opdcache.rundir import RunDir, atomic_write_bytes, replace_dir
from opdcache.train.data import collate, load_examples
from opdcache.train.loss import opd_policy_loss

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
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.bf16},
        "steps_per_print": 1 << 30,
    }


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi_theta at the cached top-k ids, ``[B, T, k]``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    idx = batch["positions"].unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    lp = torch.log_softmax(logits.gather(1, idx).float(), dim=-1)
    return lp.gather(2, batch["topk_ids"])


def train_round(run: RunDir, r: int, cfg: RunConfig, variant: str, progress: bool = True) -> TrainResult:
    """Train round ``r``'s student on its cache weighted by ``variant``'s L -> checkpoints/round=<r+1>."""
    run.require()
    if run.done("train", r):
        return TrainResult(r, skipped=True)
    with single_process_env():
        return _train_round(run, r, cfg, variant, progress)


def _train_round(run: RunDir, r: int, cfg: RunConfig, variant: str, progress: bool) -> TrainResult:
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_load = time.perf_counter()
    final = run.checkpoint(r + 1)
    examples = load_examples(run, r, variant)
    source = student_checkpoint(run, cfg, r)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.manual_seed(cfg.train.seed + r)
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.bfloat16 if cfg.train.bf16 else torch.float32
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    ds_prev = run.deepspeed_state(r)
    if ds_prev.is_dir():
        engine.load_checkpoint(str(ds_prev), load_module_strict=True, load_module_only=False)
    rank, world = engine.global_rank, engine.world_size

    order = np.random.default_rng([cfg.train.seed, r]).permutation(len(examples))[rank::world]
    mb = cfg.train.micro_batch_size
    batches = [[examples[i] for i in order[s : s + mb]] for s in range(0, len(order), mb)] * cfg.train.epochs
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics, tokens, t0 = [], 0, time.perf_counter()
    load_seconds = t0 - t_load
    engine.train()
    for step, items in enumerate(
        tqdm(batches, desc=f"train round {r}", unit="batch", disable=not progress or rank)
    ):
        batch = collate(items, pad)
        logp = sequence_logprobs(engine, batch)
        loss, stats = opd_policy_loss(
            logp,
            batch["old"],
            batch["teacher"],
            batch["weight"],
            batch["mask"],
            cfg.train.ppo_clip,
            cfg.train.dual_clip,
        )
        if not torch.isfinite(loss):
            raise OpdcacheError(f"train round {r}: non-finite loss at step {step}")
        engine.backward(loss)
        engine.step()
        tokens += int(batch["mask"].sum())
        metrics.append({"step": step, "loss": loss.item(), **{k: v.item() for k, v in stats.items()}})

    # one staging path for all ranks (the engine checkpoint is written collectively)
    staged = run.staging / f"checkpoint-{r + 1}"
    if rank == 0:
        shutil.rmtree(staged, ignore_errors=True)
    deepspeed.comm.barrier()
    engine.save_checkpoint(str(staged / "deepspeed"))
    if rank == 0:
        if cfg.train.zero_stage == 3:
            engine.save_16bit_model(str(staged / "hf"))
            model.config.save_pretrained(staged / "hf")
        else:
            engine.module.save_pretrained(staged / "hf", safe_serialization=True)
        tokenizer.save_pretrained(staged / "hf")
        atomic_write_bytes(
            staged / "hf" / "opdcache_train.json",
            json.dumps({"round": r, "variant": variant, "source": source, "metrics": metrics}).encode(),
        )
        replace_dir(staged / "deepspeed", run.deepspeed_state(r + 1))
        replace_dir(staged / "hf", final)
        shutil.rmtree(staged, ignore_errors=True)
        if cfg.train.keep_states:  # only after the checkpoint that marks the round done is in place
            for old in run.rounds(run.deepspeed)[: -cfg.train.keep_states]:
                shutil.rmtree(run.deepspeed_state(old), ignore_errors=True)
    deepspeed.comm.barrier()
    return TrainResult(
        r,
        skipped=False,
        steps=len(metrics),
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        loss_first=metrics[0]["loss"] if metrics else None,
        loss_last=metrics[-1]["loss"] if metrics else None,
        startup_seconds=load_seconds,
    )
