"""Pretraining and midtraining: the mixture loader's packed windows, next-token loss over labelled tokens.

`LMStage` (the loss on labelled tokens) also serves SFT, whose rows carry labels only on assistant turns.
"""
from __future__ import annotations

from pathlib import Path

from data.tokenizer import IGNORE_INDEX
from train.config import ConfigError, RunConfig


class PackedLMBatches:
    """The mixture loader's packed windows, with data counters for logging."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        from data.loader import MixtureLoader

        self.loader = MixtureLoader(cfg.data, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch,
                                    global_batch=cfg.train.global_batch, rank=rank, world_size=world_size,
                                    doc_masking=cfg.model.doc_masking, seed=cfg.data.seed)

    def __next__(self) -> dict:
        batch = next(self.loader)
        batch.pop("source_tokens", None)
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def metrics(self) -> dict:
        out = {f"data/tokens/{k}": v for k, v in self.loader.tokens_by_source().items()}
        out.update({f"data/provenance/{k}": v for k, v in self.loader.tokens_by_provenance().items()})
        return out

    def held_out_batches(self, n_batches: int) -> dict[str, list[dict]]:
        out = {}
        for name in self.loader.names:
            batches = list(self.loader.held_out_batches(name, n_batches))
            for b in batches:
                b.pop("source_tokens", None)
            if batches:
                out[name] = batches
        return out


class LMStage:
    """Next-token loss summed over labelled tokens; nothing to do before training, no extra metrics."""

    def __init__(self, batches):
        self.batches = batches

    def before_training(self, engine, dist_state, resumed: bool, should_stop) -> None:
        pass

    def loss(self, engine, batch: dict):
        """(loss summed over the batch's labelled tokens, summed stats)."""
        loss = engine(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                      cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"), reduction="sum")
        return loss, {}

    def loss_units(self, batch: dict) -> int:
        """What the loss is averaged over: labelled tokens."""
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def step_metrics(self, sums: dict, n_units: float) -> dict:
        return {}


def validate(cfg: RunConfig) -> None:
    if not cfg.data.sources:
        raise ConfigError(f"stage={cfg.stage} needs data.sources")
    for src in cfg.data.sources:
        if not src.path or not (Path(src.path) / "manifest.json").is_file():
            raise ConfigError(f"data.sources[{src.name}].path={src.path!r}: no prepared shards "
                              f"(manifest.json); run `python -m data.prepare` first")


def build(cfg: RunConfig, rank: int, world_size: int) -> LMStage:
    return LMStage(PackedLMBatches(cfg, rank, world_size))
