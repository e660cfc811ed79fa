"""SFT: chat conversations rendered in the Phi-4 format, packed with document masking, loss on assistant turns."""
from __future__ import annotations

from pathlib import Path

from train.config import ConfigError, RunConfig
from train.stages.lm import LMStage


def has_records(path: str) -> bool:
    """A jsonl file with at least one non-blank line (reads up to the first)."""
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def check_post_files(cfg: RunConfig, kind: str, what: str) -> None:
    """Every file of data.<kind>_path or data.<kind>_sources exists and holds a record; errors name the key."""
    if getattr(cfg.data, f"{kind}_sources"):
        keys = [(f"data.{kind}_sources[{s.name}].path", s.path) for s in getattr(cfg.data, f"{kind}_sources")]
    else:
        keys = [(f"data.{kind}_path", getattr(cfg.data, f"{kind}_path"))]
    for key, path in keys:
        if not path or not Path(path).is_file():
            raise ConfigError(f"stage={cfg.stage}: {key}={path!r} is not a file (jsonl of {what}s)"
                              + (f"; or give data.{kind}_sources" if not path else ""))
        if not has_records(path):
            raise ConfigError(f"stage={cfg.stage}: {key}={path!r} holds no {what}"
                              + (" (did the Pivotal Token Search find none?)" if kind == "dpo" else ""))


def validate(cfg: RunConfig) -> None:
    check_post_files(cfg, "sft", "conversation")
    if cfg.data.pack and not cfg.model.doc_masking:
        raise ConfigError("stage=sft: data.pack=true needs model.doc_masking=true, or packed conversations would "
                          "attend to each other (set data.pack=false to train one conversation per row)")


def build(cfg: RunConfig, rank: int, world_size: int) -> LMStage:
    """ChatBatches for data.sft_path (or one source), a weighted ChatMixture for data.sft_sources."""
    from data.post_batches import sft_batches

    return LMStage(sft_batches(cfg.data, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch,
                               global_batch=cfg.train.global_batch, rank=rank, world_size=world_size,
                               token_cache=Path(cfg.output_dir) / "sft_tokens"))
