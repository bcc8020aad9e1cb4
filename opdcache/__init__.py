"""opdcache: reliability-aware on-policy distillation (Prune-OPD) around a precomputed teacher cache."""

__version__ = "0.1.0"
