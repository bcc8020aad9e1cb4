"""Tiny Qwen2 checkpoints with a `tokenizers`-built tokenizer, made locally (no downloads).

Used by tests and benchmarks; deterministic from the seed. The tokenizer is character level over
arithmetic text plus optional extra word tokens, so the vocabulary size is controllable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CHARS = list("0123456789+-*/=()., abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\\{}?:;!'\n")


def build_tokenizer(
    out_dir: str | Path,
    eos: str = "<|endoftext|>",
    extra_tokens: int = 0,
    extra_specials: tuple[str, ...] = (),
) -> PreTrainedTokenizerFast:
    """Character-level tokenizer; ``extra_tokens`` adds whole-word tokens ``<w0>``, ``<w1>``, ..."""
    specials = ["<|endoftext|>", "<|pad|>", *extra_specials]
    if eos not in specials:
        specials.append(eos)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for c in CHARS + [f"<w{i}>" for i in range(extra_tokens)]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|pad|>",
        additional_special_tokens=list(extra_specials),
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 2,
    pad_vocab_to: int | None = None,
    eos: str = "<|endoftext|>",
    extra_tokens: int = 0,
    max_positions: int = 2048,
    embedding_scale: float = 8.0,
) -> Path:
    """A randomly initialised Qwen2 causal LM + tokenizer saved in HF format (fp32 safetensors).

    ``pad_vocab_to`` makes the embedding matrix larger than the tokenizer, as real checkpoints do
    (e.g. 152064 rows for a 151936-token tokenizer). ``embedding_scale`` sets how peaked the random
    model is: 8 gives near one-hot next-token distributions (mostly copying the input token), ~1.5
    gives spread-out ones.
    """
    out = Path(out_dir)
    tok = build_tokenizer(out, eos=eos, extra_tokens=extra_tokens)
    n = len(tok)
    vocab = max(n, pad_vocab_to or n)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embedding_scale)
    model.save_pretrained(out)
    return out
