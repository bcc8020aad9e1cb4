"""A LoRA student (train/lora.py): the adapter's shape and the merged checkpoint, stated naively."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from opdcache.config import LoraConfig
from opdcache.errors import OpdcacheError
from opdcache.train.lora import save_lora, state_bytes, with_adapter

pytest.importorskip("peft")


def test_merged_checkpoint_is_base_plus_scaled_update(models, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(models / "student")
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    cfg = base.config
    lora = LoraConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj")
    model = with_adapter(base, lora, str(models / "student"), trained=False, seed=0)
    # B = 0 at the start: the student is unchanged; move B so the merge has something to add
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.01)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_out, v_out = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = 4 * (cfg.hidden_size + q_out) + 4 * (cfg.hidden_size + v_out)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == per_layer * cfg.num_hidden_layers
    save_lora(model, tmp_path / "ckpt")
    merged = load_file(tmp_path / "ckpt" / "model.safetensors")
    adapter = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    for k, w in before.items():
        if k not in merged:  # tied embeddings are saved once
            continue
        name = k.removesuffix(".weight")
        a_key = f"base_model.model.{name}.lora_A.weight"
        if a_key in adapter:
            a, b = adapter[a_key], adapter[a_key.replace("lora_A", "lora_B")]
            want = w.numpy() + (8.0 / 4) * b @ a
            assert np.allclose(merged[k], want, atol=1e-6), k
            assert not np.allclose(merged[k], w.numpy()), k
        else:
            assert np.array_equal(merged[k], w.numpy()), f"{k} is not a target, yet changed"
    assert any(".q_proj." in k for k in adapter) and not any(".k_proj." in k for k in adapter)
    # the training module is untouched by the save (not merged in place)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_state_bytes_counts_what_lora_trains(models):
    base = AutoModelForCausalLM.from_pretrained(models / "student")
    full_params = sum(p.numel() for p in base.parameters())
    model = with_adapter(base, LoraConfig(rank=2), str(models / "student"), trained=False, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    got = state_bytes(model, opt)
    n = sum(p.numel() for p in trainable)
    assert got["trainable_params"] == n < full_params / 5
    assert got["grad_bytes"] == 4 * n
    assert got["optimizer_bytes"] == 2 * 4 * n + 4 * len(trainable)  # exp_avg, exp_avg_sq, a step each


def test_a_checkpoint_without_adapter_is_named(models):
    base = AutoModelForCausalLM.from_pretrained(models / "student")
    with pytest.raises(OpdcacheError, match="no LoRA adapter"):
        with_adapter(base, LoraConfig(rank=2), str(models / "student"), trained=True, seed=0)
    with pytest.raises(OpdcacheError, match="target_modules = 'nope'"):
        with_adapter(
            base, LoraConfig(rank=2, target_modules="nope"), str(models / "student"), trained=False, seed=0
        )
