"""The chain task's teacher and students (models/heal.py): SFT examples label only the answer and the
end of turn; a fine-tune lowers the answers' NLL and is reused; depth pruning of an HF checkpoint keeps
the other layers' weights, renumbered."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdcache.chain import sample_chains, worked_answer
from opdcache.errors import OpdcacheError
from opdcache.models.heal import HEAL_META, drop_layers, heal, sft_examples

pytestmark = pytest.mark.slow


def _rows(n):
    return [{"prompt_id": f"h{i}", "question": c.question, "solution": worked_answer(c)}
            for i, c in enumerate(sample_chains(n, 7, steps=3))]  # fmt: skip


def _answer_nll(path, tok, examples):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    total = count = 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            n = int((labels != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def test_heal_and_drop_layers(smollm2, tmp_path):
    base = smollm2["student"]  # SmolLM2's first 4 layers: a real tokenizer and chat template, cheap to train
    tok = AutoTokenizer.from_pretrained(base)
    rows = _rows(16)
    ex = sft_examples(tok, rows[:1], "{question}")[0]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": rows[0]["question"]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    answer = tok(rows[0]["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex["input_ids"] == list(prompt) + answer
    assert ex["labels"] == [-100] * len(prompt) + answer

    examples = sft_examples(tok, rows, "{question}")
    before = _answer_nll(base, tok, examples)
    out = heal(base, tmp_path / "healed", rows, lr=1e-3, batch=4, progress=False)
    after = _answer_nll(out, tok, examples)
    assert after < before - 0.5, (before, after)
    meta = json.loads((out / HEAL_META).read_text())
    assert meta["examples"] == 16 and meta["lr"] == 1e-3
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert heal(base, out, rows, lr=1e-3, batch=4, progress=False) == out  # reused, not retrained
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(OpdcacheError, match="not this fine-tune"):
        heal(base, out, rows[:8], lr=1e-3, batch=4, progress=False)

    pruned = drop_layers(out, tmp_path / "pruned", (1, 2))
    src = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    dst = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    assert dst.config.num_hidden_layers == 2
    s, d = src.state_dict(), dst.state_dict()
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(d[f"model.layers.0.{name}"], s[f"model.layers.0.{name}"])
        assert torch.equal(d[f"model.layers.1.{name}"], s[f"model.layers.3.{name}"])
    assert torch.equal(d["model.embed_tokens.weight"], s["model.embed_tokens.weight"])
    assert drop_layers(out, tmp_path / "pruned", (1, 2)) == pruned  # reused
    with pytest.raises(OpdcacheError, match="layers 1-1 dropped"):
        drop_layers(out, tmp_path / "pruned", (1, 1))
