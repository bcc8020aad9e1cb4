"""The toy teacher and the two toy students, pre-trained here on CPU (deterministic from a seed).

    teacher        hidden 128, 3 layers, compact format, 700 steps
    student_high   hidden 128, 2 layers, compact format, 500 steps, logits x 0.7 -> high compatibility
    student_low    hidden 128, 2 layers, compact then rambling on after the answer, 800 steps,
                   logits x 0.7 -> low compatibility once it passes its answer

Each is a Qwen3 HF checkpoint with a word-level `tokenizers` tokenizer over the toy vocabulary,
saved with ``toy_model.json`` (its spec and training record); a directory whose spec matches is
reused, so ``opdcache demo`` builds the models once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from opdcache.toy.task import VOCAB, Format, sample_problems, solution

EOS, PAD = "<|endoftext|>", "<|pad|>"


@dataclass(frozen=True)
class ToyModelSpec:
    fmt: Format
    hidden: int
    layers: int
    steps: int  # optimizer steps
    batch: int = 16
    lr: float = 3e-3
    seed: int = 0
    max_steps: int = 40  # longest problem (solution steps) in the training data
    switch_p: float = 0.2  # drift only: verbose notation from a geometric step, mean 1/switch_p; 0 = never
    ramble: float = 0.0  # drift only: check lines after the answer stop w.p. 1/ramble each (task.solution)
    max_len: int = 800  # training sequences are cut here (rambling ones can run longer)
    task_version: int = 4  # bump when the task's text or vocabulary changes: forces a rebuild
    smoothing: float = 0.02  # target mass spread over the token's confusion neighbours (see below)
    logit_scale: float = 1.0  # < 1: the trained model's logits scaled down (an under-confident student)


def toy_specs(seed: int = 0, smoke: bool = False) -> dict[str, ToyModelSpec]:
    scale = 0.1 if smoke else 1.0
    n = lambda s: max(20, int(s * scale))  # noqa: E731
    return {
        "teacher": ToyModelSpec("compact", 128, 3, n(700), seed=seed),
        "student_high": ToyModelSpec("compact", 128, 2, n(500), seed=seed + 1, logit_scale=0.7),
        # solves in the teacher's notation, then re-checks backwards; sequences cut at 400 tokens,
        # so it rarely sees a ramble end and rambles on (toy-task.md)
        "student_low": ToyModelSpec(
            "drift", 128, 2, n(800), seed=seed + 2, switch_p=0.0, ramble=48.0, max_len=400, logit_scale=0.7
        ),
    }


def confusion_matrix(vocab_size: int, seed: int = 1234) -> torch.Tensor:
    """Q[y] = which tokens are "near misses" of y, shared by every toy model (it is the language).

    A deterministic task has one right next token, so a model's top-16 beyond rank 1 would be
    arbitrary and two models' top-k sets would overlap by chance only. Training targets therefore
    put ``smoothing`` mass on Q[y]: for a number, the numbers y±1..±10 (weight 0.7^|d|, a little
    less below); for a word, the other words in a fixed seeded order (weight 0.7^rank). Nothing that
    ends an answer (EOS, ``\\boxed{``, ``}``) is a near miss. Models that share the language then
    share their top-k ranking, as real LMs trained on similar data do.
    """
    q = torch.zeros(vocab_size, vocab_size)
    first_num = 2  # ids 0, 1 are EOS and PAD (build_toy_tokenizer's order)
    for y in range(100):
        for d in range(1, 11):
            q[first_num + y, first_num + (y + d) % 100] = 0.7**d
            q[first_num + y, first_num + (y - d) % 100] = 0.7**d * 0.8
    words = list(range(first_num + 100, vocab_size))
    # no near misses that end an answer (EOS, the box): sampled at T = 1 they would cut it short
    enders = {first_num + VOCAB.index("\\boxed{"), first_num + VOCAB.index("}")}
    order = np.random.default_rng(seed).permutation(len(words))
    for y in words:
        ranked = [words[i] for i in order if words[i] != y and words[i] not in enders]
        for rank, j in enumerate(ranked):
            q[y, j] = 0.7**rank
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


def build_toy_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one token per number 0-99 and per toy word; text is space-separated."""
    vocab = {tok: i for i, tok in enumerate([EOS, PAD, *VOCAB])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(out_dir)
    return fast


def _batches(tok: PreTrainedTokenizerFast, spec: ToyModelSpec, rng: np.random.Generator):
    """Endless (input_ids, labels) batches; the loss covers the solution and EOS, not the question."""
    while True:
        probs = sample_problems(spec.batch, int(rng.integers(2**31)), max_steps=spec.max_steps)
        seqs = []
        for p in probs:
            q = tok(p.question, add_special_tokens=False).input_ids
            text = solution(p, spec.fmt, rng, switch_p=spec.switch_p, ramble=spec.ramble)
            a = (tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id])[: spec.max_len - len(q)]
            seqs.append((q, a))
        width = max(len(q) + len(a) for q, a in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        for i, (q, a) in enumerate(seqs):
            ids[i, : len(q) + len(a)] = torch.tensor(q + a)
            labels[i, len(q) : len(q) + len(a)] = torch.tensor(a)
        yield ids, labels


def train_toy_model(out_dir: str | Path, spec: ToyModelSpec, progress: bool = True) -> Path:
    """Pre-train one toy model from scratch (AdamW, cosine decay) and save it atomically."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_toy_tokenizer(tmp)
    torch.manual_seed(spec.seed)
    # Qwen3, not Qwen2: transformers 5 rebuilds a qwen2 checkpoint's tokenizer as Qwen2Tokenizer
    # (digit-splitting BPE), ignoring tokenizer.json; qwen3 checkpoints load it as saved.
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=4 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.hidden // 32,
        num_key_value_heads=spec.hidden // 32,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
    )
    model = Qwen3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps))),
    )
    batches = _batches(tok, spec, np.random.default_rng(spec.seed))
    q = confusion_matrix(len(tok))
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(spec.steps), desc=f"pretrain {out.name}", disable=not progress)
    model.train()
    for _ in bar:
        ids, labels = next(batches)
        logits = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, :-1]
        target, mask = labels[:, 1:], labels[:, 1:] != -100
        lp = torch.log_softmax(logits[mask].float(), -1)
        y = target[mask]
        nll = -lp.gather(1, y[:, None])[:, 0]
        loss = ((1 - spec.smoothing) * nll - spec.smoothing * (q[y] * lp).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    with torch.no_grad():  # the final norm feeds only the (tied) output head: every logit times the scale
        model.model.norm.weight.mul_(spec.logit_scale)
    model.save_pretrained(tmp)
    record = {
        "spec": dataclasses.asdict(spec),
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": time.perf_counter() - t0,
    }
    (tmp / "toy_model.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def built_spec(path: Path) -> dict | None:
    """The spec a model was built from; a field added since then reads as its default."""
    try:
        saved = json.loads((path / "toy_model.json").read_text())["spec"]
    except (OSError, ValueError, KeyError):
        return None
    defaults = {
        f.name: f.default for f in dataclasses.fields(ToyModelSpec) if f.default is not dataclasses.MISSING
    }
    return {**defaults, **saved}


def build_toy_models(
    models_dir: str | Path, seed: int = 0, smoke: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Build (or reuse) the teacher and both students under ``models_dir``."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in toy_specs(seed, smoke).items():
        path = root / name
        if built_spec(path) != dataclasses.asdict(spec):
            train_toy_model(path, spec, progress)
        out[name] = path
    return out
