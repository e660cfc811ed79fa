"""DPO's reference log-prob cache.

The reference model is the stage's starting checkpoint (`train.init_from`). Its log-probs are computed once, before
the first step, by the engine itself (at that point it holds exactly the starting weights), so training never holds
a second model. They go to a cache file (`dpo.ref_cache`, default `<output_dir>/ref_logps.pt`):
- keyed by the reference checkpoint's identity, the pairs file's sha256, the tokenizer/template fingerprint, the
  max length, the model's numerics and the precision; a cache with another key is refused, never silently reused;
- computed in chunks of `dpo.ref_chunk_pairs` pairs, sharded over ranks (rank r takes the r-th remaining chunk of
  each round); every rank runs the same number of forwards, padding with a throw-away batch, because ZeRO-3
  gathers parameters collectively;
- resumable: each finished chunk is written atomically to `<cache>.parts/`; a restart skips the finished ones;
  rank 0 then assembles the cache file atomically and removes the parts. The output_dir must be shared by ranks.
Files hold tensors, strings and ints only and are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from data.fileio import atomic_path, sha256_file
from train.checkpoint import resolve_checkpoint_dir
from train.distributed import (StoppedBeforeTraining, barrier, from_rank0, max_over_ranks, rank_and_world,
                               to_device)
from train.stages.dpo_loss import sequence_logps

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Model fields that do not change the numbers a forward pass computes (beyond kernel rounding).
NON_NUMERIC_MODEL_FIELDS = ("activation_checkpointing", "checkpoint_every", "lean_activations", "loss_chunk_tokens",
                            "attn_backend", "max_seq_len")


class RefCacheError(RuntimeError):
    """The reference log-prob cache cannot be used or built as asked; the message says why and what to do."""


# ---- the cache key ---------------------------------------------------------------------------------------
def reference_identity(init_from: str) -> dict:
    """What identifies the reference weights: a checkpoint's meta.json hash and its files' names, sizes, mtimes."""
    path = Path(init_from)
    if (path / "config.json").is_file():  # a Hugging Face directory
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
        kind, meta_sha = "hf", sha256_file(path / "config.json")
    else:
        path, _ = resolve_checkpoint_dir(path, verify_files=False)  # identity only; init_from verified it
        files = sorted(p for p in path.rglob("*") if p.is_file())
        kind, meta_sha = "checkpoint", sha256_file(path / "meta.json")
    return {"kind": kind, "name": path.name, "meta_sha256": meta_sha,
            "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_key(cfg, batches, precision: str) -> dict:
    model = {k: v for k, v in asdict(cfg.model).items() if k not in NON_NUMERIC_MODEL_FIELDS}
    return {"format": CACHE_FORMAT, "reference": reference_identity(cfg.train.init_from), "data": batches.identity,
            "model": model, "precision": precision}


def cache_path(cfg) -> Path:
    return Path(cfg.dpo.ref_cache) if cfg.dpo.ref_cache else Path(cfg.output_dir) / "ref_logps.pt"


def _check_key(found: str, key: dict, where: Path) -> None:
    if found == json.dumps(key, sort_keys=True):
        return
    try:
        old = json.loads(found)
    except json.JSONDecodeError:
        old = {}
    differing = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k)) or ["?"]
    raise RefCacheError(
        f"reference log-prob cache {where} was computed for a different {', '.join(differing)} "
        f"(data file, tokenizer/template, max length, reference checkpoint, model or precision) and cannot be used "
        f"for this run. Delete it (and any '.parts' directory beside it) or set dpo.ref_cache to another path.")


def load_ref_cache(path: Path, key: dict) -> torch.Tensor | None:
    """(num_pairs, 2) float64 reference log-probs from a complete cache file, None when there is none."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    _check_key(saved["key"], key, path)
    return saved["logps"]


# ---- computing the cache ---------------------------------------------------------------------------------
def _finished_chunks(parts: Path, key_json: str, chunks: list[np.ndarray]) -> list[int]:
    """Indices of chunks already written by an interrupted run (rank 0 reads; a foreign key is refused)."""
    done = []
    for f in sorted(parts.glob("chunk_*.pt")):
        saved = torch.load(f, map_location="cpu", weights_only=True)
        _check_key(saved["key"], json.loads(key_json), f)
        k = int(f.stem.split("_")[1])
        if k < len(chunks) and np.array_equal(saved["pair_ids"].numpy(), chunks[k]):
            done.append(k)
    return done


@torch.no_grad()
def compute_ref_logps(model, batches, key: dict, path: Path, chunk_pairs: int, device, on_chunk=None,
                      should_stop=None) -> torch.Tensor:
    """Reference log-probs of every usable pair by `model` (engine or module), written to `path`; see the docstring.

    Every rank calls this. `on_chunk(k)` is called after chunk k is written (progress; tests interrupt with it).
    `should_stop()` is polled by every rank after each round of chunks (a preemption signal: the finished chunks
    stay on disk for the next attempt, and StoppedBeforeTraining is raised).
    """
    rank, world = rank_and_world()
    key_json = json.dumps(key, sort_keys=True)
    parts = path.with_name(path.name + ".parts")
    ids = np.flatnonzero(batches.valid)
    chunks = [ids[s:s + chunk_pairs] for s in range(0, len(ids), chunk_pairs)]
    try:
        done = _finished_chunks(parts, key_json, chunks) if rank == 0 and parts.is_dir() else []
        message = None
    except RefCacheError as e:
        done, message = [], str(e)
    done, message = from_rank0((done, message))
    if message:
        raise RefCacheError(message)
    todo = [k for k in range(len(chunks)) if k not in set(done)]
    if rank == 0:
        log.info("reference log-probs: %d pairs in %d chunks, %d already done, %d ranks -> %s", len(ids),
                 len(chunks), len(done), world, path)
    was_training = model.training
    model.eval()
    b = batches.micro_batch
    for start in range(0, len(todo), world):
        k = todo[start + rank] if start + rank < len(todo) else None
        groups = [] if k is None else [chunks[k][s:s + b].tolist() for s in range(0, len(chunks[k]), b)]
        n_forwards = max_over_ranks(len(groups), device)
        logps = []
        for j in range(n_forwards):
            if j < len(groups):
                logps.append(sequence_logps(model, to_device(batches.pairs_batch(groups[j]), device)).double().cpu())
            else:  # a throw-away forward so that every rank joins the same ZeRO-3 gathers
                sequence_logps(model, to_device(batches.pairs_batch(ids[:1].tolist()), device))
        if k is not None:
            parts.mkdir(parents=True, exist_ok=True)
            with atomic_path(parts / f"chunk_{k:06d}.pt") as tmp:
                torch.save({"key": key_json, "pair_ids": torch.from_numpy(chunks[k].copy()),
                            "logps": torch.cat(logps)}, tmp)
            if on_chunk is not None:
                on_chunk(k)
        finished = min(len(done) + start + world, len(chunks))
        if rank == 0:
            log.info("reference log-probs: %d/%d chunks", finished, len(chunks))
        if should_stop is not None and finished < len(chunks) and should_stop():
            model.train(was_training)
            raise StoppedBeforeTraining(f"reference log-probs: stopped after {finished} of {len(chunks)} chunks; "
                                        f"they are kept in {parts} for the next attempt")
    model.train(was_training)
    barrier()
    if rank == 0:
        table = torch.full((batches.num_pairs, 2), float("nan"), dtype=torch.float64)
        for k in range(len(chunks)):
            saved = torch.load(parts / f"chunk_{k:06d}.pt", map_location="cpu", weights_only=True)
            table[saved["pair_ids"]] = saved["logps"]
        with atomic_path(path) as tmp:
            torch.save({"key": key_json, "logps": table}, tmp)
        shutil.rmtree(parts, ignore_errors=True)
    barrier()
    return load_ref_cache(path, key)


def prepare_reference(cfg, engine, batches, dist_state, resumed: bool, should_stop=None) -> torch.Tensor:
    """(num_pairs, 2) reference log-probs: the cache loaded, or built with the engine's (starting) weights."""
    path = cache_path(cfg)
    key = cache_key(cfg, batches, dist_state.precision)
    if from_rank0(path.is_file()):
        log.info("reference log-probs: loaded %s", path)
        return load_ref_cache(path, key)
    if resumed:
        raise RefCacheError(
            f"reference log-prob cache {path} is missing, but this run resumed from a checkpoint, so the engine no "
            "longer holds the reference (starting) weights. Restore the cache file, or start the stage again in a "
            "new output_dir.")
    return compute_ref_logps(engine, batches, key, path, cfg.dpo.ref_chunk_pairs, dist_state.device,
                             should_stop=should_stop)
