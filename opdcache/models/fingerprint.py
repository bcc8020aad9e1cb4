"""Short content fingerprints recorded in every cache shard (which models/tokenizer made it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def tokenizer_fingerprint(tok: Any) -> str:
    """Hash of the token -> id mapping and the special tokens."""
    payload = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def model_fingerprint(path: str | Path) -> str:
    """Hash of config.json plus the names and sizes of the weight files (cheap; no weight reads)."""
    p = Path(path)
    if not p.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:16]
    h = hashlib.sha256((p / "config.json").read_bytes() if (p / "config.json").exists() else b"")
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]
