"""The demos: one runner (runner.py) and two descriptions, the toy task (toy.py) and the real pairs (real.py)."""
