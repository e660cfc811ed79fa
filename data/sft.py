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
base + s G + (m W + r) b + [0, b) (data/order.py), so a global batch is the same for any world size and
the state (rows consumed) resumes exactly. The rendered file can be cached (`cached_arrays`, the trainer keeps it in
`<output_dir>/sft_tokens/`) so that restarts skip tokenization. The token cache, best-fit rows and `pack_segments` are
data/packing.py's, shared with the DPO pairs (data/pairs.py); the sample order is data/order.py's.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data.fileio import JsonlError, read_jsonl, sha256_file
from data.mixture import held_out_mask
from data.order import LayoutError, SampleCursor, check_seq_len
from data.packing import (ChatDataError, best_fit_rows, cached_arrays, order_state, pack_segments, restore_order,
                          segment_arrays)
from data.tokenizer import IGNORE_INDEX, PAD_ID  # pad is <|dummy_85|>, never eos

log = logging.getLogger(__name__)

PACK_BLOCK = 256  # conversations packed together before their rows are shuffled
STATE_FORMAT = 1
EPOCHS_CACHED = 2
ORDER_SALT = 0x5F7  # separates the SFT permutations from other streams seeded with data.seed


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
    try:
        for line_no, obj in read_jsonl(path):
            if "messages" not in obj:
                raise ChatDataError(f"{path}:{line_no}: no key 'messages' (keys present: {sorted(obj)[:10]}); "
                                    "expected a list of {role, content} objects")
            messages = obj["messages"]
            try:
                ids, mask = tokenizer.render_chat(messages)
            except ValueError as e:
                raise ChatDataError(f"{path}:{line_no}: {e}") from None
            # The rule data.prepare's chat sources apply: an assistant turn with text, or there is nothing to learn.
            if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
                raise ChatDataError(f"{path}:{line_no}: no assistant message with non-empty content, so nothing to "
                                    "learn from this conversation (expected at least one role 'assistant' with text)")
            tokens.append(np.asarray(ids, dtype=np.int32))
            masks.append(np.asarray(mask, dtype=bool))
            lengths.append(len(ids))
    except JsonlError as e:
        raise ChatDataError(str(e)) from None
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
        try:
            check_seq_len(seq_len)
            self.cursor = SampleCursor(micro_batch, global_batch, rank, world_size)
        except LayoutError as e:
            raise ChatDataError(str(e)) from None
        if tokenizer is None:
            from data.tokenizer import Phi4Tokenizer
            tokenizer = Phi4Tokenizer()
        self.path, self.seq_len, self.pack, self.seed = Path(path), seq_len, pack, seed
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        if not self.path.is_file():
            raise ChatDataError(f"{path}: file not found")
        sha256 = sha256_file(path)
        key = {"format": STATE_FORMAT, "kind": "sft", "sha256": sha256, "tokenizer": tokenizer.fingerprint}
        data, _ = cached_arrays(token_cache, key, lambda: (load_conversations(path, tokenizer), {}),
                                write=rank == 0)  # one writer; the trainer lets rank 0 build it first
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
        step, m = self.cursor.step_and_micro
        first = self.cursor.advance()
        batch = self.batch_at(first, self.micro_batch)
        check_loss_mask(batch, f"micro-batch {m} of step {step + 1} (since start/resume) on rank {self.rank}, "
                               f"global rows {first}..{first + self.micro_batch - 1} of {self.path}")
        return batch

    @property
    def samples_consumed(self) -> int:
        return self.cursor.consumed

    def state_dict(self) -> dict:
        return order_state("sft", STATE_FORMAT, self.cursor, self.fingerprint)

    def load_state_dict(self, state: dict) -> None:
        """Continue after the saved rows; refused when the file, tokenizer, seq_len, packing or seed changed."""
        restore_order(state, "sft", STATE_FORMAT, self.cursor, self.fingerprint, self.path,
                      "the file, tokenizer, train.seq_len, data.pack, data.seed or data.held_out_fraction")

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
