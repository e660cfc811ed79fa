"""The tiny model shapes the tests build, each written once, and seeded builders for them."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from model.config import ModelConfig
from model.transformer import Transformer

# The real Phi-4 vocabulary (so the real tokenizer's ids fit) and Phi-4's layout in miniature: 4 query heads, 2 KV
# heads. Run configs use it too (tests/helpers/train.py TEST_MODEL), so a test can rebuild the trainer's model.
TINY = dict(vocab_size=100_352, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
# A 512-id vocabulary: model-only tests (parity with plain autograd, kernels, benchmarks) where no tokenizer is involved
# and a full-vocabulary LM head would dominate the cost.
SMALL = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160)
# The context (model.max_seq_len) a run config's TEST_MODEL is built with: the tiny preset's.
TINY_RUN_CONTEXT = yaml.safe_load((Path(__file__).parents[2] / "configs/model/tiny.yaml").read_text())["max_seq_len"]


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A TINY Transformer with weights from torch.manual_seed(seed); overrides replace ModelConfig fields."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides}))


def small_model(seed: int = 0, **overrides) -> Transformer:
    """A SMALL Transformer with weights from torch.manual_seed(seed); overrides replace ModelConfig fields."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides}))


def as_overrides(shape: dict) -> list[str]:
    """A shape as `model.key=value` command-line overrides of a run config."""
    return [f"model.{k}={v}" for k, v in shape.items()]
