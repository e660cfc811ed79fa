"""SFT: chat conversations rendered in the Phi-4 format, packed with document masking, loss on assistant turns."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from data.fileio import atomic_write
from train.config import ConfigError, RunConfig
from train.stages.lm import LMStage

log = logging.getLogger(__name__)

READY = "ready.json"  # written by rank 0 into the token cache directory once it has built it (or failed to)
WAIT_S, POLL_S = 6 * 3600.0, 1.0  # how long the other ranks wait for rank 0's tokenization, and how often they look
# What identifies one launch of the job: torchrun draws a new run id each time, Slurm a job id and restart count.
LAUNCH_ENV = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_RESTART_COUNT")


def launch_id() -> dict:
    return {k: os.environ.get(k, "") for k in LAUNCH_ENV}


def rank0_first(make, cache_dir: Path, rank: int, world_size: int, wait_s: float = WAIT_S):
    """make() on rank 0 first, which tokenizes and writes the token caches under cache_dir, and then on the other
    ranks, which read them (a non-zero rank never writes one: data/packing.py `cached_arrays`).

    The data is built before the process group exists, so rank 0 tells the others through cache_dir/ready.json (the
    run dir is on a filesystem every rank sees): this launch's id and, if make() failed, the error, which the
    others raise too. A ready.json of an earlier launch is ignored."""
    if world_size == 1:
        return make()
    ready, me = Path(cache_dir) / READY, launch_id()
    if rank == 0:
        ready.unlink(missing_ok=True)
        try:
            result = make()
        except Exception as e:
            ready.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(ready, json.dumps({"launch": me, "error": f"{type(e).__name__}: {e}"}))
            raise
        ready.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(ready, json.dumps({"launch": me, "error": None}))
        return result
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            state = json.loads(ready.read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and state.get("launch") == me:
            if state.get("error"):
                raise ConfigError(f"rank 0 could not build the token cache {cache_dir}: {state['error']}")
            return make()
        if time.monotonic() > deadline:
            raise ConfigError(f"rank {rank}: rank 0 wrote no {ready} for this launch ({me}) within {wait_s:.0f} s; "
                              "is the run dir on a filesystem that every node sees?")
        if not said:
            log.info("rank %d: waiting for rank 0 to build the token cache %s", rank, cache_dir)
            said = True
        time.sleep(POLL_S)


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

    cache = Path(cfg.output_dir) / "sft_tokens"
    return rank0_first(lambda: LMStage(sft_batches(
        cfg.data, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch, global_batch=cfg.train.global_batch,
        rank=rank, world_size=world_size, token_cache=cache)), cache, rank, world_size)
