"""Scoring: Prune-OPD math (reliability.py), variants (variant.py), the score stage (stage.py)."""
