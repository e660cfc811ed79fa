"""Large sources: per-document loader state built once and memory-mapped, and a block-wise epoch order.

State: one folder per (source shards, selection settings, held-out draw, block size), built by the first process
that needs it (the others wait on its flock, then map what it wrote) and never again:
- `train_entries.npy` / `held_entries.npy`: document indices of one training epoch (repeats allowed) and of the
  held-out documents, in index order (uint32 when the source has < 2^32 documents, else int64);
- `train_cum.npy` / `held_cum.npy`: (n + 1,) int64 cumulative tokens of those entries, in index order;
- `train_block_cum.npy` / `held_block_cum.npy`: (blocks + 1,) int64 the same at every block boundary;
- `meta.json`, written last: the key and the counts; a folder without it is incomplete and is rebuilt.
Each array is written atomically (data/fileio.py) with allow_pickle=False and read with mmap_mode='r', so a rank's
private memory does not grow with the number of documents (only with the number of blocks).

Blocked order (the `MappedStream` of a shuffled source): the entries are cut into blocks of `block_docs` consecutive
entries (the last may be shorter). Epoch e visits the blocks in the order of a permutation of block ids seeded by
(seed, key, e, BLOCK_SALT), O(blocks) work, and block b's entries in the order of a permutation seeded by
(seed, key, e, b, WITHIN_SALT), drawn when the block is first read, O(block_docs) work. Every entry is used once per
epoch, the order is a pure function of (seed, source, epoch), and reading any stream position needs no history.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np

from data.config import SourceConfig
from data.fileio import atomic_path, atomic_write
from data.mixture import epoch_entries, held_out_mask
from data.shards import ShardedSource

STATE_FORMAT = 1
BLOCK_DOCS = 1 << 16  # entries per block: a block's draw is ~1 ms, and 3e9 documents make ~46k blocks
BLOCK_SALT, WITHIN_SALT = 0xB10C, 0xB10C1
META = "meta.json"
LOCK = ".build.lock"
BLOCKS_CACHED = 4  # per stream: (epoch, block) orders kept (a window can straddle blocks and epochs)
EPOCHS_CACHED = 2
ARRAYS = ("entries", "cum", "block_cum")


class StateError(ValueError):
    """Loader state on disk that cannot be built or used; the message names the folder or file."""


def state_key(sharded: ShardedSource, src: SourceConfig, held_out_fraction: float, seed: int, block_docs: int) -> str:
    """Everything the state's content depends on, hashed: the shards, the selection, the held-out draw, blocks."""
    ident = {"format": STATE_FORMAT, "num_docs": sharded.num_docs, "num_tokens": sharded.num_tokens,
             "shards": [[e["tokens_sha256"], e["index_sha256"]] for e in sharded.manifest["shards"]],
             "min_doc_tokens": src.min_doc_tokens, "upweight_min_tokens": src.upweight_min_tokens,
             "upweight_factor": src.upweight_factor, "held_out_fraction": held_out_fraction, "seed": seed,
             "block_docs": block_docs}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def build_state(folder: Path, sharded: ShardedSource, src: SourceConfig, held_out_fraction: float, seed: int,
                block_docs: int, key: str) -> None:
    """Compute and write the state (O(documents) time and memory, once per source and selection)."""
    lengths = sharded.doc_lengths()
    held = held_out_mask(len(lengths), held_out_fraction, seed)
    plain = replace(src, upweight_min_tokens=0, upweight_factor=1.0)  # held-out: each document once, in order
    dtype = np.uint32 if sharded.num_docs < 2**32 else np.int64
    meta = {"format": STATE_FORMAT, "key": key, "source": sharded.name, "block_docs": block_docs}
    for part, entries in (("train", epoch_entries(lengths, src, held)), ("held", epoch_entries(lengths, plain, ~held))):
        cum = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum(lengths[entries], out=cum[1:])
        bounds = np.append(np.arange(0, len(entries), block_docs, dtype=np.int64), len(entries))
        _save(folder / f"{part}_entries.npy", entries.astype(dtype))
        _save(folder / f"{part}_block_cum.npy", cum[bounds] if len(entries) else np.zeros(1, dtype=np.int64))
        _save(folder / f"{part}_cum.npy", cum)
        meta[part] = {"entries": int(len(entries)), "tokens": int(cum[-1])}
        del cum
    atomic_write(folder / META, json.dumps(meta, indent=1))  # last: the folder is complete from here on


def _load(folder: Path, key: str) -> dict[str, dict[str, np.ndarray]] | None:
    """The memory-mapped arrays of a complete state folder, or None when it is incomplete."""
    path = folder / META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("key") != key or meta.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: key {str(meta.get('key'))[:12]} != {key[:12]}; the folder belongs to other data "
                         f"or settings: delete {folder} (it is rebuilt)")
    out = {}
    for part in ("train", "held"):
        n = meta[part]["entries"]
        arrays = {}
        for name in ARRAYS:
            f = folder / f"{part}_{name}.npy"
            try:
                arrays[name] = np.load(f, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise StateError(f"{f}: unreadable ({e}); delete {folder} (it is rebuilt)") from None
        nb = -(-n // meta["block_docs"])
        if len(arrays["entries"]) != n or len(arrays["cum"]) != n + 1 or len(arrays["block_cum"]) != nb + 1 \
                or (n and int(arrays["cum"][-1]) != meta[part]["tokens"]):
            raise StateError(f"{folder}/{part}_*.npy: sizes disagree with {path}; delete {folder} (it is rebuilt)")
        out[part] = arrays
    return out


def load_or_build(root: str | os.PathLike, sharded: ShardedSource, src: SourceConfig, held_out_fraction: float,
                  seed: int, block_docs: int = BLOCK_DOCS) -> dict[str, dict[str, np.ndarray]]:
    """{'train'|'held': {'entries', 'cum', 'block_cum'}} memory-mapped; built under a lock by the first caller."""
    if block_docs < 1:
        raise StateError(f"block_docs={block_docs}; expected >= 1")
    key = state_key(sharded, src, held_out_fraction, seed, block_docs)
    folder = Path(root) / key[:16]
    state = _load(folder, key)
    if state is not None:
        return state
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK, "w")
    except OSError as e:
        raise StateError(f"{folder}: cannot create the loader state of source '{sharded.name}' ({e.strerror}); "
                         f"pass a writable state_dir") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank building it: wait, then map its result
        state = _load(folder, key)
        if state is None:
            build_state(folder, sharded, src, held_out_fraction, seed, block_docs, key)
            state = _load(folder, key)
    return state


class MappedStream:
    """A source's token stream over memory-mapped entries; shuffle=True: endless, blocked order per epoch.

    shuffle=False: the entries once, in index order (held-out evaluation). `work` counts the elements permuted and
    summed: 'epoch' grows by the number of blocks per new epoch, 'block' by a block's entries per new block.
    """

    def __init__(self, sharded: ShardedSource, arrays: dict[str, np.ndarray], seed: int, key: int, block_docs: int,
                 shuffle: bool = True):
        self.sharded, self.seed, self.key, self.block_docs, self.shuffle = sharded, seed, key, block_docs, shuffle
        self.entries, self.cum = arrays["entries"], arrays["cum"]  # np.memmap, read-only
        self.block_tokens = np.diff(arrays["block_cum"])  # (blocks,) in RAM: O(documents / block_docs)
        self.num_blocks = len(self.block_tokens)
        self.epoch_tokens = int(self.cum[-1])
        self.work: Counter = Counter()
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @staticmethod
    def _lru(cache: OrderedDict, key, size: int, make):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        cache[key] = value = make()
        if len(cache) > size:
            cache.popitem(last=False)
        return value

    def epoch_blocks(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(block ids in epoch order (blocks,), token offset of each within the epoch (blocks + 1,))."""
        def make():
            nb = self.num_blocks
            order = (np.random.default_rng([self.seed, self.key, e, BLOCK_SALT]).permutation(nb) if self.shuffle
                     else np.arange(nb))
            cum = np.zeros(nb + 1, dtype=np.int64)
            np.cumsum(self.block_tokens[order], out=cum[1:])
            self.work["epoch"] += nb
            return order, cum
        return self._lru(self._epochs, e, EPOCHS_CACHED, make)

    def block(self, e: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(docs of block b in epoch e's order (m,), token offsets within the block (m + 1,))."""
        def make():
            lo = b * self.block_docs
            hi = min(lo + self.block_docs, len(self.entries))
            docs = np.asarray(self.entries[lo:hi], dtype=np.int64)
            lens = np.diff(np.asarray(self.cum[lo:hi + 1]))
            if self.shuffle:
                perm = np.random.default_rng([self.seed, self.key, e, b, WITHIN_SALT]).permutation(hi - lo)
                docs, lens = docs[perm], lens[perm]
            cum = np.zeros(hi - lo + 1, dtype=np.int64)
            np.cumsum(lens, out=cum[1:])
            self.work["block"] += hi - lo
            return docs, cum
        return self._lru(self._blocks, (e, b), BLOCKS_CACHED, make)

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch e in full, (docs (n,), cum (n + 1,)): O(documents), for tests and inspection, never for reading."""
        order, _ = self.epoch_blocks(e)
        parts = [self.block(e, int(b)) for b in order]
        docs = np.concatenate([d for d, _ in parts] + [np.zeros(0, np.int64)])
        cum = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(np.concatenate([np.diff(c) for _, c in parts] + [np.zeros(0, np.int64)]), out=cum[1:])
        return docs, cum

    def read(self, start: int, n: int, out: np.ndarray) -> list[int]:
        """Fill out[:n] with stream tokens [start, start + n); return the offsets in [0, n) where a document starts."""
        L = self.epoch_tokens
        if not self.shuffle and start + n > L:
            raise IndexError(f"source '{self.sharded.name}': read past the end of a one-pass stream")
        starts, filled = [], 0
        while filled < n:
            e, off = divmod(start + filled, L)
            order, ecum = self.epoch_blocks(e)
            p = int(np.searchsorted(ecum, off, side="right")) - 1  # every block holds >= 1 token
            boff = off - int(ecum[p])
            docs, bcum = self.block(e, int(order[p]))
            i = int(np.searchsorted(bcum, boff, side="right")) - 1
            while filled < n and i < len(docs):
                skip = boff - int(bcum[i])
                if skip == 0:
                    starts.append(filled)
                doc = self.sharded.doc(int(docs[i]))
                take = min(len(doc) - skip, n - filled)
                if take <= 0:  # only a state that disagrees with the shards gets here (it would loop forever)
                    raise StateError(f"source '{self.sharded.name}': document {int(docs[i])} has {len(doc)} tokens, "
                                     f"its loader state says more; delete the state folder (it is rebuilt)")
                out[filled:filled + take] = doc[skip:skip + take]
                filled += take
                boff += take
                i += 1
        return starts
