"""Which checkpoint a round uses, and checks on HF checkpoint directories before a stage loads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from opdcache.errors import OpdcacheError

if TYPE_CHECKING:
    from opdcache.config import RunConfig
    from opdcache.rundir import RunDir


REMOVED = "opdcache_removed.json"
KEPT = ("opdcache_train.json", REMOVED)  # what a removed checkpoint's directory still holds


def removal(checkpoint: str | Path) -> dict | None:
    """The removal record (train/retention.py) of a checkpoint directory, or None while its weights are there."""
    p = Path(checkpoint) / REMOVED
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {"by": "train.keep_checkpoints", "record": "unreadable"}


def removal_message(checkpoint: str | Path, role: str) -> str | None:
    """One line for a stage that needs a removed checkpoint's weights (None if they are there)."""
    rec = removal(checkpoint)
    if rec is None:
        return None
    when = f" after round {rec['after_round']}'s training" if "after_round" in rec else ""
    return (
        f"{role} checkpoint {checkpoint}: its weights were removed by {rec.get('by', 'retention')}{when} "
        f"(record {REMOVED}); raise train.keep_checkpoints (0 keeps all) in a new run, or re-train the "
        "round from the cache with `opdcache replay`"
    )


def require_checkpoint(name: str, role: str) -> str:
    """``name`` as a stage will load it: a checkpoint directory holding a config, weights and a
    tokenizer (returned with ``~`` expanded), or a hub id already in the local Hugging Face cache.

    Nothing downloads at run time, so a typo is an error here, not a minute of connection attempts
    inside transformers. The one check behind ``init``, ``eval`` and every stage.
    """
    p = Path(name).expanduser()
    if gone := removal_message(p, role):
        raise OpdcacheError(gone)
    if not p.exists() and not name.startswith(("/", ".", "~")) and _in_hub_cache(name):
        return name
    if not p.is_dir():
        what = "is a file" if p.exists() else "no such directory (nor a hub id in the local cache)"
        raise OpdcacheError(f"{role} checkpoint {name}: {what}; expected a checkpoint directory")
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


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid hub id
        return False


def student_checkpoint(run: RunDir, cfg: RunConfig, r: int) -> str:
    """The checkpoint round ``r`` samples from: RUN/checkpoints/round=<r> if trained, else models.student."""
    ckpt = run.checkpoint(r)
    if ckpt.is_dir():  # a removed one (train.keep_checkpoints) keeps its directory: named by the check
        return require_checkpoint(str(ckpt), f"round-{r} student")
    if not cfg.models.student:
        raise OpdcacheError("models.student is not set in the run config")
    return require_checkpoint(cfg.models.student, "student")
