"""Giving GPU memory back between stages."""

from __future__ import annotations

import gc

import torch


def release_gpu_memory() -> None:
    """Free cached GPU memory after a stage: the next stage (a vLLM engine) runs in another process."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
