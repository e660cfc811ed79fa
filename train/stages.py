"""What differs between stages, in one place: the batch source, the loss, and stage-specific checks and metrics."""
from __future__ import annotations

from pathlib import Path

from data.tokenizer import PAD_ID  # <|dummy_85|>: never produced from text, so it only marks padding
from train.config import ConfigError, RunConfig, load_config

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
    if cfg.stage == "sft":
        from data.sft import ChatBatches

        return ChatBatches(cfg.data.sft_path, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch,
                           global_batch=cfg.train.global_batch, rank=rank, world_size=world_size,
                           seed=cfg.data.seed, pack=cfg.data.pack, held_out_fraction=cfg.data.held_out_fraction,
                           token_cache=Path(cfg.output_dir) / "sft_tokens")
    if cfg.stage == "dpo":  # train.global_batch / micro_batch count preference pairs
        from data.pairs import PairBatches

        return PairBatches(cfg.data.dpo_path, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch,
                           global_batch=cfg.train.global_batch, rank=rank, world_size=world_size,
                           seed=cfg.data.seed, held_out_fraction=cfg.data.held_out_fraction,
                           token_cache=Path(cfg.output_dir) / "dpo_tokens")
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
    if cfg.stage == "sft":
        if not cfg.data.sft_path or not Path(cfg.data.sft_path).is_file():
            raise ConfigError(f"stage=sft: data.sft_path={cfg.data.sft_path!r} is not a file (jsonl of conversations)")
        if not _has_records(cfg.data.sft_path):
            raise ConfigError(f"stage=sft: data.sft_path={cfg.data.sft_path!r} holds no conversation")
        if cfg.data.pack and not cfg.model.doc_masking:
            raise ConfigError("stage=sft: data.pack=true needs model.doc_masking=true, or packed conversations would "
                              "attend to each other (set data.pack=false to train one conversation per row)")
    if cfg.stage == "dpo":
        if not cfg.data.dpo_path or not Path(cfg.data.dpo_path).is_file():
            raise ConfigError(f"stage=dpo: data.dpo_path={cfg.data.dpo_path!r} is not a file (jsonl of pairs)")
        if not _has_records(cfg.data.dpo_path):
            raise ConfigError(f"stage=dpo: data.dpo_path={cfg.data.dpo_path!r} holds no preference pair (did the "
                              "Pivotal Token Search find none?)")
        if not cfg.train.init_from:
            raise ConfigError("stage=dpo needs train.init_from: the starting checkpoint is also the reference model")
        if not cfg.model.doc_masking:
            raise ConfigError("stage=dpo packs sequences into rows and needs model.doc_masking=true")
        if cfg.dpo.beta <= 0 or cfg.dpo.ref_chunk_pairs <= 0:
            raise ConfigError(f"dpo.beta={cfg.dpo.beta} and dpo.ref_chunk_pairs={cfg.dpo.ref_chunk_pairs} must be > 0")
    if cfg.train.eval_config:
        from train.eval.run import EvalConfig

        if not Path(cfg.train.eval_config).is_file():
            raise ConfigError(f"train.eval_config={cfg.train.eval_config!r} is not a file (an EvalConfig YAML)")
        load_config(cfg.train.eval_config, schema=EvalConfig)  # its own errors name the key
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise ConfigError(f"train.init_from={cfg.train.init_from!r} does not exist")


def _has_records(path: str) -> bool:
    """A jsonl file with at least one non-blank line (reads up to the first)."""
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def loss_function(cfg: RunConfig, engine, batches):
    """fn(batch) -> (summed loss over labelled tokens, extra stats to sum over the global batch)."""
    if cfg.stage == "dpo":
        from train.dpo import dpo_loss_function

        return dpo_loss_function(cfg, engine, batches)  # loss summed over the batch's pairs

    def lm_loss(batch: dict):
        loss = engine(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                      cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"), reduction="sum")
        return loss, {}
    return lm_loss


def loss_units(batch: dict) -> int:
    """What the loss is averaged over: labelled tokens (LM stages, SFT), preference pairs (DPO)."""
    if "num_pairs" in batch:
        return int(batch["num_pairs"])
    return int((batch["labels"] != IGNORE_INDEX).sum())


def input_tokens(batch: dict) -> int:
    """Real (non-padding) tokens, for throughput and tokens_seen."""
    return int((batch["input_ids"] != PAD_ID).sum())


class StoppedBeforeTraining(Exception):
    """A stop signal arrived during before_training; the work done so far is kept for the requeued job."""


def before_training(cfg: RunConfig, engine, batches, dist_info, should_stop=None) -> None:
    """Work between building the engine and the first step: DPO's reference log-probs (nothing for the others).

    `should_stop()` (collective: every rank calls it at the same points) is polled between units of work; when it
    says stop, StoppedBeforeTraining is raised after the last finished unit was saved."""
    if cfg.stage == "dpo":
        from train.dpo import prepare_reference

        prepare_reference(cfg, engine, batches, dist_info, should_stop)


def step_metrics(extras: dict, n_units: float, cfg: RunConfig) -> dict:
    """Stage metrics from the loss function's summed stats: DPO rewards, margin, accuracy (nothing for the others)."""
    if cfg.stage == "dpo":
        from train.dpo import step_metrics as dpo_metrics

        return dpo_metrics(extras, n_units)
    return {}


