"""Phi-4 model: single-device tensors only (no DeepSpeed, Slurm, wandb or files).

Names are resolved lazily so that importing `model.config` (e.g. for config loading in data tools) does not
import torch.
"""
from model.config import ModelConfig

__all__ = ["ModelConfig", "Transformer", "KVCache", "count_params"]


def __getattr__(name):
    if name in ("Transformer", "KVCache", "count_params"):
        from model import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
