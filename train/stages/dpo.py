"""DPO (both rounds): preference pairs packed into rows, the reference log-probs computed before the first step by
the starting weights, and the sigmoid or IPO loss over pairs.

The stage object owns the reference log-probs: `before_training` loads or builds them (train/stages/ref_cache.py),
`loss` reads them. train.global_batch / micro_batch count preference pairs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from data.post_mixture import dpo_share_warning, safety_share
from train.config import ConfigError, RunConfig
from train.stages.dpo_loss import completion_lengths, preference_loss, sequence_logps
from train.stages.ref_cache import RefCacheError, prepare_reference
from train.stages.sft import check_post_files, rank0_first

log = logging.getLogger(__name__)


class DPOStage:
    def __init__(self, cfg: RunConfig, batches):
        self.cfg, self.batches = cfg, batches
        self.ref_logps: torch.Tensor | None = None  # (num_pairs, 2) float64, set by before_training
        # A declared mixture's safety + hallucination share, warned about outside the paper's 1-5% (Table 9 caption)
        # and logged with every step so that the metrics and the recipe summary carry it.
        self.share_metrics = {}
        if cfg.data.dpo_sources:
            warning = dpo_share_warning(cfg.data)
            if warning:
                log.warning("%s", warning)
            self.share_metrics = {"data/safety_share": safety_share(cfg.data.dpo_sources),
                                  "data/safety_share_outside_paper_range": float(warning is not None)}

    def before_training(self, engine, dist_state, resumed: bool, should_stop) -> None:
        """The reference log-probs: the engine holds exactly the starting weights now (unless resumed)."""
        self.ref_logps = prepare_reference(self.cfg, engine, self.batches, dist_state, resumed, should_stop)

    def loss(self, engine, batch: dict):
        """(loss summed over the batch's pairs, summed stats)."""
        if self.ref_logps is None:
            raise RefCacheError("reference log-probs are not loaded (before_training must run first)")
        policy = sequence_logps(engine, batch)
        reference = self.ref_logps[batch["pair_ids"].cpu()].to(device=policy.device, dtype=policy.dtype)
        if not torch.isfinite(reference).all():
            raise RefCacheError(f"reference log-probs missing for pairs {batch['pair_ids'].tolist()}")
        lengths = completion_lengths(batch) if self.cfg.dpo.loss == "ipo" else None
        losses, stats = preference_loss(policy, reference, self.cfg.dpo.beta, self.cfg.dpo.loss, lengths)
        return losses.sum(), {k: float(v) for k, v in stats.items()}

    def loss_units(self, batch: dict) -> int:
        """What the loss is averaged over: preference pairs."""
        return int(batch["num_pairs"])

    def step_metrics(self, sums: dict, n_units: float) -> dict:
        """Per-pair means of the summed stats over the global batch, e.g. dpo/rewards_accuracy."""
        return {**{f"dpo/{k}": v / max(n_units, 1.0) for k, v in sums.items()}, **self.share_metrics}


def validate(cfg: RunConfig) -> None:
    check_post_files(cfg, "dpo", "preference pair")
    if not cfg.train.init_from:
        raise ConfigError("stage=dpo needs train.init_from: the starting checkpoint is also the reference model")
    if not cfg.model.doc_masking:
        raise ConfigError("stage=dpo packs sequences into rows and needs model.doc_masking=true")
    if cfg.dpo.beta <= 0 or cfg.dpo.ref_chunk_pairs <= 0:
        raise ConfigError(f"dpo.beta={cfg.dpo.beta} and dpo.ref_chunk_pairs={cfg.dpo.ref_chunk_pairs} must be > 0")


def build(cfg: RunConfig, rank: int, world_size: int) -> DPOStage:
    """PairBatches for data.dpo_path (or one source), a weighted PairMixture (global pair ids) for data.dpo_sources."""
    from data.post_batches import dpo_batches

    cache = Path(cfg.output_dir) / "dpo_tokens"
    return rank0_first(lambda: DPOStage(cfg, dpo_batches(
        cfg.data, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch, global_batch=cfg.train.global_batch,
        rank=rank, world_size=world_size, token_cache=cache)), cache, rank, world_size)
