"""Phi-4 model: single-device tensors only (no DeepSpeed, Slurm, wandb or files)."""
from model.config import ModelConfig
from model.transformer import KVCache, Transformer, count_params

__all__ = ["ModelConfig", "Transformer", "KVCache", "count_params"]
