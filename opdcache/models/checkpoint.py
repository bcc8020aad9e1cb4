"""Which checkpoint a round uses, and checks on HF checkpoint directories before a stage loads them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from opdcache.errors import OpdcacheError

if TYPE_CHECKING:
    from opdcache.config import RunConfig
    from opdcache.rundir import RunDir


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


def student_checkpoint(run: RunDir, cfg: RunConfig, r: int) -> str:
    """The checkpoint round ``r`` samples from: RUN/checkpoints/round=<r> if trained, else models.student."""
    ckpt = run.checkpoint(r)
    if ckpt.is_dir():
        return require_checkpoint(str(ckpt), f"round-{r} student")
    if not cfg.models.student:
        raise OpdcacheError("models.student is not set in the run config")
    return require_checkpoint(cfg.models.student, "student")
