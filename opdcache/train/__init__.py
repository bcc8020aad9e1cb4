"""Training: the OPD objectives (loss.py), batches from the cache (data.py), the DeepSpeed stage (stage.py)."""
