"""Teacher scoring: tokenizer compatibility (compat.py), gathering forward (forward.py), stage (stage.py)."""
