"""Scoring: Prune-OPD math (reliability.py), the score stage (stage.py)."""
