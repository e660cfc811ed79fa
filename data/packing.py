"""What SFT conversations and DPO pairs share: the token cache, segments, best-fit packing into rows, the data state.

A segment is one sequence as (inputs, shifted labels); `pack_segments` lays segments into rows of seq_len with
positions restarting per segment and `cu_seqlens` listing every segment start (document masking), the row's unused
tail being pad with labels -100 and a segment of its own, so it attends to nothing real.
"""
from __future__ import annotations

import bisect
import json
import logging
from pathlib import Path

import numpy as np
import torch

from data.fileio import atomic_path, atomic_write
from data.order import SampleCursor
from data.tokenizer import IGNORE_INDEX, PAD_ID

log = logging.getLogger(__name__)


class ChatDataError(ValueError):
    """A conversation or pair file, or a batch, that cannot be used; the message names the file and line, or the batch."""


def read_cache(cache_dir: str | Path | None, key: dict) -> tuple[dict[str, np.ndarray], dict] | None:
    """(arrays, meta) of a complete cache for `key` in cache_dir, else None (missing, other key, or damaged).

    Complete: key.json (written last) equals `key`, and every array it lists opens with the dtype and shape it
    records; a truncated, rewritten or half-written .npy is refused (and logged), never trusted."""
    if not cache_dir or not (Path(cache_dir) / "key.json").is_file():
        return None
    cache_dir = Path(cache_dir)
    try:
        saved = json.loads((cache_dir / "key.json").read_text())
        if saved.get("key") != key:
            return None
        arrays = {}
        for name, spec in saved["arrays"].items():
            array = np.load(cache_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if str(array.dtype) != spec["dtype"] or list(array.shape) != spec["shape"]:
                raise ValueError(f"{name}.npy holds {array.dtype} {list(array.shape)}, key.json says "
                                 f"{spec['dtype']} {spec['shape']}")
            arrays[name] = array
        return arrays, saved["meta"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("token cache %s unreadable (%s): tokenizing again", cache_dir, e)
        return None


def cached_arrays(cache_dir: str | Path | None, key: dict, build, write: bool = True
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a tokenized file: from cache_dir when it holds a complete cache for `key` (`read_cache`),
    else `build()`, saved there when `write`.

    Tokenizing a large file takes minutes at every (re)start; the cache makes restarts take seconds, and its arrays
    are memory-mapped read-only, so the ranks of a node share one copy. One rank writes it (the data sources pass
    write=rank == 0; the trainer starts the other ranks' reads after rank 0 has built it, train/stages/sft.py
    `rank0_first`); a rank that may not write and finds no cache builds in memory. Every file is replaced
    atomically and key.json, which records each array's dtype and shape, is written last.
    """
    found = read_cache(cache_dir, key)
    if found is not None:
        return found
    arrays, meta = build()
    if cache_dir is not None and write:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "key.json").unlink(missing_ok=True)  # the old arrays are about to be replaced
        for name, array in arrays.items():
            with atomic_path(cache_dir / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        specs = {n: {"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a))} for n, a in sorted(arrays.items())}
        atomic_write(cache_dir / "key.json", json.dumps({"key": key, "arrays": specs, "meta": meta}))
    elif cache_dir is not None:
        log.info("token cache %s: not this rank's to write; tokenized in memory", cache_dir)
    return arrays, meta


def segment_arrays(ids: np.ndarray, target_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sequence as (inputs (n-1,), shifted labels (n-1,)): labels[t] = ids[t+1] where target_mask[t+1]."""
    labels = np.where(target_mask[1:], ids[1:], IGNORE_INDEX).astype(np.int64)
    return ids[:-1].astype(np.int64), labels


def best_fit_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices into `lengths` grouped into rows of at most `capacity` tokens."""
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    rows: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))  # the fullest row that still fits
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(int(i))
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def pack_segments(segments: list[tuple[np.ndarray, np.ndarray]], rows: list[list[int]], seq_len: int,
                  pad_id: int = PAD_ID, trim_to: int = 0) -> tuple[dict, np.ndarray]:
    """A batch of len(rows) rows of seq_len from (inputs, labels) segments; rows list segment indices.

    trim_to > 0: rows are as long as the fullest one, rounded up to a multiple of trim_to (at most seq_len).
    Returns the batch dict (input_ids, labels, position_ids, cu_seqlens, max_seqlen) and the segment index of
    every position, (B, T) int64, -1 on padding. A row's padding is one more segment in cu_seqlens.
    """
    B, T = len(rows), seq_len
    if trim_to > 0:
        fullest = max(sum(len(segments[s][0]) for s in row) for row in rows)
        T = min(seq_len, -(-fullest // trim_to) * trim_to)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    seg = np.full((B, T), -1, dtype=np.int64)
    cu = [0]
    for r, members in enumerate(rows):
        at = 0
        for s in members:
            inputs, targets = segments[s]
            n = len(inputs)
            if at + n > T:
                raise ChatDataError(f"segment {s} of {n} tokens does not fit in row {r} ({at} of {T} used)")
            input_ids[r, at:at + n], labels[r, at:at + n] = inputs, targets
            positions[r, at:at + n] = np.arange(n)
            seg[r, at:at + n] = s
            at += n
            cu.append(r * T + at)
        if at < T:  # the padding attends only to itself
            positions[r, at:] = np.arange(T - at)
            cu.append((r + 1) * T)
    cu_seqlens = np.asarray(cu, dtype=np.int32)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "position_ids": torch.from_numpy(positions), "cu_seqlens": torch.from_numpy(cu_seqlens),
             "max_seqlen": int(np.diff(cu_seqlens).max())}
    return batch, seg


def order_state(kind: str, fmt: int, cursor: SampleCursor, fingerprint: str) -> dict:
    """The resumable state of an SFT or DPO batch source: samples consumed, and what they were drawn from."""
    return {"format": fmt, "kind": kind, "samples_consumed": cursor.consumed, "fingerprint": fingerprint}


def restore_order(state, kind: str, fmt: int, cursor: SampleCursor, fingerprint: str, path, changed: str) -> None:
    """Continue after the saved samples; refused when the data they were drawn from changed (`changed` says what)."""
    label = kind.upper()
    if not isinstance(state, dict) or state.get("kind") != kind or state.get("format") != fmt:
        raise ChatDataError(f"{label} data state {state!r:.200} is not a {label} state of format {fmt}")
    if state["fingerprint"] != fingerprint:
        raise ChatDataError(
            f"{label} data state does not match {path} (fingerprint {state['fingerprint'][:12]} != "
            f"{fingerprint[:12]}): {changed} changed. Resuming would repeat or skip data; start a new run instead.")
    cursor.restart_at(state["samples_consumed"])
