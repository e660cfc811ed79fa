"""SFT: chat conversations rendered in the Phi-4 format, packed with document masking, loss on assistant turns."""
from __future__ import annotations

from pathlib import Path

from train.config import ConfigError, RunConfig
from train.stages.lm import LMStage


def has_records(path: str) -> bool:
    """A jsonl file with at least one non-blank line (reads up to the first)."""
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def validate(cfg: RunConfig) -> None:
    if not cfg.data.sft_path or not Path(cfg.data.sft_path).is_file():
        raise ConfigError(f"stage=sft: data.sft_path={cfg.data.sft_path!r} is not a file (jsonl of conversations)")
    if not has_records(cfg.data.sft_path):
        raise ConfigError(f"stage=sft: data.sft_path={cfg.data.sft_path!r} holds no conversation")
    if cfg.data.pack and not cfg.model.doc_masking:
        raise ConfigError("stage=sft: data.pack=true needs model.doc_masking=true, or packed conversations would "
                          "attend to each other (set data.pack=false to train one conversation per row)")


def build(cfg: RunConfig, rank: int, world_size: int) -> LMStage:
    from data.sft import ChatBatches

    return LMStage(ChatBatches(cfg.data.sft_path, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch,
                               global_batch=cfg.train.global_batch, rank=rank, world_size=world_size,
                               seed=cfg.data.seed, pack=cfg.data.pack, held_out_fraction=cfg.data.held_out_fraction,
                               token_cache=Path(cfg.output_dir) / "sft_tokens"))
