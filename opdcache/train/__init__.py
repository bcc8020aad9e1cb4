"""Training: the OPD objective (loss.py), batches from the cache (data.py), the DeepSpeed stage (stage.py)."""
