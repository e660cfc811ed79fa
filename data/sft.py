"""SFT batch source: chat conversations (jsonl) in the Phi-4 format, packed with document masking.

Input: one JSON object per line with `messages`, a list of `{role, content}` (roles system | user | assistant,
at least one assistant turn). Each conversation is rendered by `Phi4Tokenizer.render_chat`, whose token spans give
the loss mask: assistant content and its `<|im_end|>`. A conversation of n tokens is one segment of n - 1
positions: input_ids = ids[:-1], labels[t] = ids[t+1] when that token is in the mask, else -100 (the final
`<|im_end|>` is a target, never an input). Conversations longer than seq_len + 1 tokens are DROPPED, counted and
logged, never truncated: a cut assistant turn would teach the model to stop mid-answer without its `<|im_end|>`.

Packing (data.pack=true): per epoch, the training conversations are permuted by (seed, epoch); each block of
PACK_BLOCK of them is packed best-fit-decreasing into rows of seq_len, and the block's rows are shuffled. Positions
restart at 0 per conversation and `cu_seqlens` lists every conversation start, so with the model's doc_masking no
conversation attends to another. A row's unused tail is pad 100349 with labels -100 and is its own segment in
cu_seqlens, so it attends to nothing real. data.pack=false: one conversation per row, padded the same way.

Order: a sample is one row. Epoch rows follow each other; global row i of step s, micro-batch m, rank r is
base + s G + (m W + r) b + [0, b), as in data/loader.py, so a global batch is the same for any world size and
the state (rows consumed) resumes exactly. The rendered file can be cached (`cached_arrays`, the trainer keeps it in
`<output_dir>/sft_tokens/`) so that restarts skip tokenization. The helpers here (jsonl reading, the token cache,
best-fit rows, `pack_segments`, `sample_index`) also serve the DPO pairs (data/pairs.py).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data.fileio import atomic_path, atomic_write, sha256_file
from data.mixture import held_out_mask
from data.tokenizer import PAD_ID  # <|dummy_85|>, never eos (spec section 10 item 2)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACK_BLOCK = 256  # conversations packed together before their rows are shuffled
STATE_FORMAT = 1
EPOCHS_CACHED = 2
ORDER_SALT = 0x5F7  # separates the SFT permutations from other streams seeded with data.seed


class ChatDataError(ValueError):
    """A conversation file or batch that cannot be used; the message names the file and line, or the batch."""


# ---- shared by SFT and DPO ------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ChatDataError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ChatDataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def cached_arrays(cache_dir: str | Path | None, key: dict, build) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a tokenized file: from cache_dir when its key.json equals `key`, else `build()` and saved.

    Tokenizing a large file takes minutes per rank at every (re)start; the cache makes restarts take seconds, and
    its arrays are memory-mapped read-only, so the ranks of a node share one copy. Ranks that miss it together
    build identical arrays; every file is replaced atomically and key.json is written last.
    """
    cache_dir = Path(cache_dir) if cache_dir else None
    if cache_dir is not None and (cache_dir / "key.json").is_file():
        try:
            saved = json.loads((cache_dir / "key.json").read_text())
            if saved.get("key") == key:
                return {n: np.load(cache_dir / f"{n}.npy", mmap_mode="r") for n in saved["arrays"]}, saved["meta"]
        except (OSError, ValueError, KeyError) as e:
            log.warning("token cache %s unreadable (%s): tokenizing again", cache_dir, e)
    arrays, meta = build()
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "key.json").unlink(missing_ok=True)  # the old arrays are about to be replaced
        for name, array in arrays.items():
            with atomic_path(cache_dir / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, array)
        atomic_write(cache_dir / "key.json", json.dumps({"key": key, "arrays": sorted(arrays), "meta": meta}))
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


def sample_index(n: int, base: int, global_batch: int, micro_batch: int, rank: int, world_size: int) -> int:
    """First global sample of this rank's n-th micro-batch: base + s G + (m W + r) b (as data/loader.py)."""
    accum = global_batch // (micro_batch * world_size)
    step, m = divmod(n, accum)
    return base + step * global_batch + (m * world_size + rank) * micro_batch


def samples_consumed(n: int, base: int, global_batch: int, micro_batch: int, world_size: int) -> int:
    """Global samples handed out by all ranks after each rank yielded n micro-batches (ranks move in lockstep)."""
    accum = global_batch // (micro_batch * world_size)
    step, m = divmod(n, accum)
    return base + step * global_batch + m * world_size * micro_batch


def check_layout(seq_len: int, micro_batch: int, global_batch: int, rank: int, world_size: int) -> None:
    if seq_len < 2 or micro_batch < 1 or not 0 <= rank < world_size or global_batch % (micro_batch * world_size):
        raise ChatDataError(f"bad layout: seq_len={seq_len}, micro_batch={micro_batch}, global_batch={global_batch}"
                            f" (must divide by micro_batch x world_size), rank={rank}, world_size={world_size}")


# ---- SFT ----------------------------------------------------------------------------------------------
def check_loss_mask(batch: dict, where: str) -> None:
    """Raise when no position is labelled, or when every real (non-pad) position is: both mean a broken mask."""
    labelled = batch["labels"].numpy() != IGNORE_INDEX  # numpy: torch's per-op overhead is ~100x here on CPU
    real = batch["input_ids"].numpy() != PAD_ID
    if not labelled.any():
        raise ChatDataError(
            f"SFT {where}: the loss mask is all zeros (every label is -100), so nothing would be learned. "
            "Likely cause: conversations without assistant turns, or a mask not built from render_chat's spans.")
    if labelled[real].all():
        raise ChatDataError(
            f"SFT {where}: the loss mask is all ones (every token is labelled, prompts and role headers "
            "included). Likely cause: pretraining-style labels instead of render_chat's assistant-only mask.")


def load_conversations(path: str | Path, tokenizer) -> dict[str, np.ndarray]:
    """Render every conversation: flat `tokens` int32, `mask` bool, `offsets` (n+1,) int64."""
    tokens, masks, lengths = [], [], []
    for line_no, obj in read_jsonl(path):
        messages = obj.get("messages")
        try:
            ids, mask = tokenizer.render_chat(messages)
        except ValueError as e:
            raise ChatDataError(f"{path}:{line_no}: {e}") from None
        if not any(m.get("role") == "assistant" for m in messages):
            raise ChatDataError(f"{path}:{line_no}: no assistant message, so nothing to learn from this "
                                "conversation (expected messages with at least one role 'assistant')")
        tokens.append(np.asarray(ids, dtype=np.int32))
        masks.append(np.asarray(mask, dtype=bool))
        lengths.append(len(ids))
    if not lengths:
        raise ChatDataError(f"{path}: no conversations")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {"tokens": np.concatenate(tokens), "mask": np.concatenate(masks), "offsets": offsets}


class ChatBatches:
    """This rank's SFT micro-batches, endlessly over epochs; `state_dict()` (rows consumed) makes it resumable.

    token_cache: a directory for the rendered conversations (see `cached_arrays`); None = render in memory.
    """

    def __init__(self, path: str | Path, seq_len: int, micro_batch: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1234, pack: bool = True, held_out_fraction: float = 0.0,
                 tokenizer=None, token_cache: str | Path | None = None):
        check_layout(seq_len, micro_batch, global_batch, rank, world_size)
        if tokenizer is None:
            from data.tokenizer import Phi4Tokenizer
            tokenizer = Phi4Tokenizer()
        self.path, self.seq_len, self.pack, self.seed = Path(path), seq_len, pack, seed
        self.micro_batch, self.global_batch, self.rank, self.world_size = micro_batch, global_batch, rank, world_size
        if not self.path.is_file():
            raise ChatDataError(f"{path}: file not found")
        sha256 = sha256_file(path)
        key = {"format": STATE_FORMAT, "kind": "sft", "sha256": sha256, "tokenizer": tokenizer.fingerprint}
        data, _ = cached_arrays(token_cache, key, lambda: (load_conversations(path, tokenizer), {}))
        self.tokens, self.mask, self.offsets = data["tokens"], data["mask"], data["offsets"]
        self.num_conversations = len(self.offsets) - 1
        self.segment_lengths = np.diff(self.offsets) - 1  # positions each conversation takes in a row
        fits = self.segment_lengths <= seq_len
        held = held_out_mask(self.num_conversations, held_out_fraction, seed)
        self.train_ids = np.flatnonzero(fits & ~held)
        self.held_ids = np.flatnonzero(fits & held)
        self.dropped_too_long = int((~fits).sum())
        if self.dropped_too_long:
            log.warning("%s: %d of %d conversations are longer than seq_len + 1 = %d tokens and are dropped",
                        path, self.dropped_too_long, self.num_conversations, seq_len + 1)
        if len(self.train_ids) == 0:
            raise ChatDataError(f"{path}: no training conversation left ({self.num_conversations} read, "
                                f"{self.dropped_too_long} longer than seq_len + 1 = {seq_len + 1} tokens, "
                                f"held_out_fraction={held_out_fraction})")
        ident = {"format": STATE_FORMAT, "sha256": sha256, "tokenizer": tokenizer.fingerprint,
                 "seq_len": seq_len, "pack": pack, "pack_block": PACK_BLOCK, "seed": seed,
                 "held_out_fraction": held_out_fraction}
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        self._epochs: OrderedDict[int, list[list[int]]] = OrderedDict()
        self._epoch_first = [0]  # global index of each computed epoch's first row, plus the end of the last
        self._base, self._micro = 0, 0
        self.held_rows = self._pack(self.held_ids, None)
        log.info("%s: %d conversations (%d train, %d held out, %d dropped), %s, %d rows in epoch 0", path,
                 self.num_conversations, len(self.train_ids), len(self.held_ids), self.dropped_too_long,
                 "packed" if pack else "one per row", self.rows_in_epoch(0))

    # ---- the global order of rows --------------------------------------------------------------------
    def _segment(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return segment_arrays(self.tokens[a:b], self.mask[a:b])

    def _pack(self, ids: np.ndarray, rng: np.random.Generator | None) -> list[list[int]]:
        """Rows of conversation ids: best-fit per block (rows shuffled when rng is given), or one per row."""
        if not self.pack:
            return [[int(i)] for i in ids]
        rows = []
        for start in range(0, len(ids), PACK_BLOCK):
            block = ids[start:start + PACK_BLOCK]
            block_rows = best_fit_rows(self.segment_lengths[block], self.seq_len)
            order = rng.permutation(len(block_rows)) if rng is not None else range(len(block_rows))
            rows += [[int(block[k]) for k in block_rows[o]] for o in order]
        return rows

    def epoch_rows(self, e: int) -> list[list[int]]:
        """Epoch e's rows (lists of conversation ids): a fresh permutation seeded by (seed, e)."""
        if e in self._epochs:
            self._epochs.move_to_end(e)
            return self._epochs[e]
        rng = np.random.default_rng([self.seed, ORDER_SALT, e])
        rows = self._pack(rng.permutation(self.train_ids), rng)
        self._epochs[e] = rows
        if len(self._epochs) > EPOCHS_CACHED:
            self._epochs.popitem(last=False)
        return rows

    def rows_in_epoch(self, e: int) -> int:
        return len(self.epoch_rows(e)) if self.pack else len(self.train_ids)

    def locate(self, i: int) -> tuple[int, int]:
        """Global row i -> (epoch, row within the epoch)."""
        if not self.pack:
            return divmod(i, len(self.train_ids))
        while i >= self._epoch_first[-1]:
            self._epoch_first.append(self._epoch_first[-1] + self.rows_in_epoch(len(self._epoch_first) - 1))
        e = bisect.bisect_right(self._epoch_first, i) - 1
        return e, i - self._epoch_first[e]

    def rows_batch(self, rows: list[list[int]]) -> dict:
        segments = [self._segment(c) for row in rows for c in row]
        starts = np.cumsum([0] + [len(row) for row in rows])
        batch, _ = pack_segments(segments, [list(range(a, a + len(row))) for a, row in zip(starts, rows)],
                                 self.seq_len)
        return batch

    def batch_at(self, first: int, size: int) -> dict:
        """The batch of global rows [first, first + size)."""
        rows = []
        for i in range(first, first + size):
            e, k = self.locate(i)
            rows.append(self.epoch_rows(e)[k])
        return self.rows_batch(rows)

    # ---- iteration and state -------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = sample_index(self._micro, self._base, self.global_batch, self.micro_batch, self.rank,
                             self.world_size)
        batch = self.batch_at(first, self.micro_batch)
        accum = self.global_batch // (self.micro_batch * self.world_size)
        step, m = divmod(self._micro, accum)
        check_loss_mask(batch, f"micro-batch {m} of step {step + 1} (since start/resume) on rank {self.rank}, "
                               f"global rows {first}..{first + self.micro_batch - 1} of {self.path}")
        self._micro += 1
        return batch

    @property
    def samples_consumed(self) -> int:
        return samples_consumed(self._micro, self._base, self.global_batch, self.micro_batch, self.world_size)

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "kind": "sft", "samples_consumed": self.samples_consumed,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the saved rows; refused when the file, tokenizer, seq_len, packing or seed changed."""
        if not isinstance(state, dict) or state.get("kind") != "sft" or state.get("format") != STATE_FORMAT:
            raise ChatDataError(f"SFT data state {state!r:.200} is not an SFT state of format {STATE_FORMAT}")
        if state["fingerprint"] != self.fingerprint:
            raise ChatDataError(
                f"SFT data state does not match {self.path} (fingerprint {state['fingerprint'][:12]} != "
                f"{self.fingerprint[:12]}): the file, tokenizer, train.seq_len, data.pack, data.seed or "
                "data.held_out_fraction changed. Resuming would repeat or skip data; start a new run instead.")
        self._base, self._micro = int(state["samples_consumed"]), 0

    def metrics(self) -> dict:
        e, k = self.locate(self.samples_consumed)
        return {"data/epoch": e + k / self.rows_in_epoch(e), "data/rows_consumed": self.samples_consumed}

    def held_out_batches(self, n_batches: int) -> dict[str, list[dict]]:
        """This rank's first n_batches held-out micro-batches: rows (j W + r) b + [0, b); same count on every rank."""
        b, W = self.micro_batch, self.world_size
        out = []
        for j in range(min(n_batches, len(self.held_rows) // (b * W))):
            first = (j * W + self.rank) * b
            batch = self.rows_batch(self.held_rows[first:first + b])
            check_loss_mask(batch, f"held-out batch {j} on rank {self.rank}")
            out.append(batch)
        return {"sft": out} if out else {}
