"""What differs between stages, in one place: the batch source, the loss, and stage-specific checks and metrics."""
from __future__ import annotations

from pathlib import Path



from train.config import ConfigError, RunConfig

IGNORE_INDEX = -100
LM_STAGES = ("pretrain", "midtrain")


class PackedLMBatches:
    """Pretraining / midtraining: the mixture loader's packed windows, with data counters for logging."""

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


def build_batch_source(cfg: RunConfig, rank: int, world_size: int):
    if cfg.stage in LM_STAGES:
        return PackedLMBatches(cfg, rank, world_size)
    raise ConfigError(f"stage={cfg.stage!r} has no batch source yet")


def validate(cfg: RunConfig) -> None:
    """Stage checks that need no process group: paths that must exist before compute is spent."""
    if cfg.stage in LM_STAGES:
        if not cfg.data.sources:
            raise ConfigError(f"stage={cfg.stage} needs data.sources")
        for src in cfg.data.sources:
            if not src.path or not (Path(src.path) / "manifest.json").is_file():
                raise ConfigError(f"data.sources[{src.name}].path={src.path!r}: no prepared shards "
                                  f"(manifest.json); run `python -m data.prepare` first")
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise ConfigError(f"train.init_from={cfg.train.init_from!r} does not exist")


def loss_function(cfg: RunConfig, engine, batches):
    """fn(batch) -> (summed loss over labelled tokens, extra stats to sum over the global batch)."""
    def lm_loss(batch: dict):
        loss = engine(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                      cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"), reduction="sum")
        return loss, {}
    return lm_loss


def labelled_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def input_tokens(batch: dict) -> int:
    return int(batch["input_ids"].numel())


def step_metrics(extras: dict, n_labelled: float, cfg: RunConfig) -> dict:
    return {}


