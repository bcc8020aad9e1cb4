"""A task fine-tune of a teacher before it teaches (prune-then-heal's first half).

SmolLM2-135M-Instruct cannot do the stepping chains (chain.py), so no student of it can learn them by
distillation. The chain demo first fine-tunes the teacher on worked chains (supervised, the loss on
the answer tokens and the closing end-of-turn only) with transformers' ``Trainer``; the students are
then that fine-tuned teacher with layers removed (gguf.drop_layers' counterpart on an HF checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from opdcache.errors import OpdcacheError
from opdcache.rundir import atomic_write_bytes

HEAL_META = "opdcache_heal.json"  # beside the weights: what the checkpoint was fine-tuned on


def sft_examples(tokenizer: Any, rows: list[dict[str, str]], template: str) -> list[dict[str, list[int]]]:
    """input_ids / labels of (question, solution) rows: the chat-templated prompt (labels -100), then the
    solution and the end-of-turn token (labelled)."""
    from opdcache.prompts import Prompt, encode_prompts

    prompts = [Prompt(r["prompt_id"], r["question"], r.get("answer", "")) for r in rows]
    out = []
    for ids, r in zip(encode_prompts(tokenizer, prompts, template, chat=True), rows, strict=True):
        answer = tokenizer(r["solution"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer})
    return out


def heal(
    base: str | Path,
    out: str | Path,
    rows: list[dict[str, str]],
    template: str = "{question}",
    epochs: int = 1,
    lr: float = 3e-4,
    batch: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Fine-tune ``base`` on ``rows`` (prompt_id, question, solution) into ``out``; a checkpoint already
    healed the same way is reused. The weights are written to a sibling and renamed into place."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    out = Path(out)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    want = {"base": str(base), "examples": len(rows), "epochs": epochs, "lr": lr, "batch": batch,
            "seed": seed, "rows_sha256": digest}  # fmt: skip
    if (out / HEAL_META).exists() and json.loads((out / HEAL_META).read_text()) == want:
        return out
    if out.exists():
        raise OpdcacheError(f"{out}: exists and is not this fine-tune ({HEAL_META} differs); remove it first")
    if not rows:
        raise OpdcacheError("heal: no training rows")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    data = sft_examples(tok, rows, template)
    tmp = out.with_name(f".{out.name}.healing")
    shutil.rmtree(tmp, ignore_errors=True)
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        per_device_train_batch_size=batch,
        num_train_epochs=epochs,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, len(data) // batch // 20),
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
    )
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate).train()
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for extra in ("generation_config.json",):
        if (Path(base) / extra).exists() and not (tmp / extra).exists():
            shutil.copy(Path(base) / extra, tmp / extra)
    atomic_write_bytes(tmp / HEAL_META, json.dumps(want).encode())
    tmp.rename(out)
    return out


def drop_layers(source: str | Path, out: str | Path, drop: tuple[int, int]) -> Path:
    """``source`` (an HF checkpoint, e.g. a healed teacher) without decoder layers ``drop`` = (A, B),
    0-based inclusive: the depth-pruned student. Reused when ``out`` is this pruning of this source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdcache.models.gguf import kept_layers, write_kept_layers

    out = Path(out)
    stamp = {"source": str(Path(source).resolve()), "drop_layers": list(drop)}
    marker = out / "opdcache_convert.json"
    if out.exists():
        if marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in stamp} == stamp:
            return out
        raise OpdcacheError(f"{out} exists and is not {source} with layers {drop[0]}-{drop[1]} dropped")
    src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    kept = kept_layers(src.config.num_hidden_layers, None, drop)
    return write_kept_layers(
        src, AutoTokenizer.from_pretrained(source), kept, out, stamp | {"kept_layers": kept}, str(source)
    )
