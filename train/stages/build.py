"""The one place a training stage is chosen: its checks before any process group, and its stage object."""
from __future__ import annotations

from pathlib import Path

from train.config import ConfigError, RunConfig, load_config
from train.stages import dpo, lm, sft

STAGE_MODULES = {"pretrain": lm, "midtrain": lm, "sft": sft, "dpo": dpo}


def validate(cfg: RunConfig) -> None:
    """Checks that need no process group: paths that must exist before compute is spent."""
    STAGE_MODULES[cfg.stage].validate(cfg)
    if cfg.train.eval_config:
        from train.eval.config import EvalConfig

        if not Path(cfg.train.eval_config).is_file():
            raise ConfigError(f"train.eval_config={cfg.train.eval_config!r} is not a file (an EvalConfig YAML)")
        load_config(cfg.train.eval_config, schema=EvalConfig)  # its own errors name the key
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise ConfigError(f"train.init_from={cfg.train.init_from!r} does not exist")


def build_stage(cfg: RunConfig, rank: int, world_size: int):
    """The stage object: `batches`, `before_training`, `loss`, `loss_units`, `step_metrics` (see train/stages/)."""
    return STAGE_MODULES[cfg.stage].build(cfg, rank, world_size)
