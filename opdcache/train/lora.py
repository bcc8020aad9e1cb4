"""A LoRA student (``train.lora.rank`` > 0) through peft.

One adapter sits on the initial student (``models.student``) and is trained through every round, as
TRL, tinker and verl train LoRA students. Each checkpoint holds the adapter (``adapter/``) and the
merged weights at its top level: what the rollout engine reloads in place, ``eval`` and the next
round's teacher check read, like a full fine-tune's checkpoint. The optimizer holds the adapter's
parameters only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from opdcache.errors import OpdcacheError

if TYPE_CHECKING:
    from opdcache.config import LoraConfig

ADAPTER = "adapter"  # the adapter's folder inside a checkpoint


def with_adapter(base: Any, lora: LoraConfig, source: str, trained: bool, seed: int) -> Any:
    """``base`` with the run's adapter: the one saved in checkpoint ``source`` when the round's student
    was trained (``trained``), else a new one (B = 0: the student is unchanged; A drawn from ``seed``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if trained:
        saved = Path(source) / ADAPTER
        if not saved.is_dir():
            raise OpdcacheError(
                f"{source}: no LoRA adapter ({ADAPTER}/) in this checkpoint, though train.lora.rank = "
                f"{lora.rank}; it was trained without LoRA: continue it with train.lora.rank = 0"
            )
        return PeftModel.from_pretrained(base, str(saved), is_trainable=True)
    targets = lora.target_modules.strip()
    torch.manual_seed(seed)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets
        if targets == "all-linear"
        else [m.strip() for m in targets.split(",") if m.strip()],
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(base, config)
    except ValueError as e:  # a target module the model does not have
        raise OpdcacheError(f"train.lora.target_modules = {targets!r}: {e}") from None


def save_lora(module: Any, out: Path) -> None:
    """The adapter to ``out``/adapter and the merged model to ``out`` (the training module untouched)."""
    module.save_pretrained(out / ADAPTER)
    merged = copy.deepcopy(module).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)


def state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes the trainer holds in parameters, gradients and optimizer state (what LoRA shrinks)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)  # one gradient per trainable parameter
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the client optimizer
    opt = sum(
        v.numel() * v.element_size()
        for s in getattr(inner, "state", {}).values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return {
        "trainable_params": sum(p.numel() for p in trainable),
        "param_bytes": params,
        "grad_bytes": grads,
        "optimizer_bytes": opt,
    }
