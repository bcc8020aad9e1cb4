"""Checks on HF checkpoint directories before a stage loads them (one clear error, nothing written)."""

from __future__ import annotations

from pathlib import Path

from opdcache.errors import OpdcacheError


def require_checkpoint(path: str, role: str) -> str:
    """A local checkpoint must hold a config, weights and a tokenizer.

    Names that are not filesystem paths (``org/model``) are left to transformers, which resolves
    them from the local Hugging Face cache.
    """
    looks_local = path.startswith(("/", ".", "~")) or Path(path).exists()
    if not looks_local:
        return path
    p = Path(path).expanduser()
    if not p.is_dir():
        raise OpdcacheError(f"{role} checkpoint {p}: no such directory")
    missing = []
    if not (p / "config.json").exists():
        missing.append("config.json")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        missing.append("weights (*.safetensors or *.bin)")
    if not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        missing.append("tokenizer (tokenizer.json / tokenizer_config.json)")
    if missing:
        raise OpdcacheError(f"{role} checkpoint {p}: missing {', '.join(missing)}")
    return str(p)
