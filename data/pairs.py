"""DPO preference pairs (jsonl) and their batches.

Each line is one pair, in one of two forms:
- text: `{"prompt": [messages], "chosen": str, "rejected": str}`. prompt ids = apply_chat_template(prompt,
  add_generation_prompt=True); a completion is encode(text) + [<|im_end|> 100265].
- token ids (Pivotal Token Search, `python -m train.pts`): `{"prompt_ids": [...], "chosen_ids": [...],
  "rejected_ids": [...]}`, used AS GIVEN: no re-tokenization, no template, no EOS appended (token boundaries must
  match the rollout; a PTS prompt is the chat-formatted question plus the partial assistant response, each side one token).
  Other keys (id, metadata) are ignored.
A pair is two sequences, prompt + chosen and prompt + rejected; only completion tokens are labelled. Pairs whose
longer sequence exceeds seq_len + 1 tokens are DROPPED (counted, logged), as are pairs whose two sides are equal.

Batches: a micro-batch holds `micro_batch` pairs; their 2 x micro_batch sequences are packed best-fit into rows of
at most seq_len with document masking (data/packing.py `pack_segments`); rows are as long as the fullest one,
rounded up to ROW_MULTIPLE. `seq_slot` (rows, T) gives, for every labelled position, the sequence it belongs to
(2 j + 0 for pair j's chosen side, 2 j + 1 for its rejected side), -1 elsewhere; `pair_ids` are the pairs'
line-order indices (into the reference log-prob cache); `num_pairs` the count.
Order: a sample is one pair; epoch e is a permutation of the training pairs seeded by (seed, e); the rank
slicing and the resumable state are data/order.py's, the token cache (`<output_dir>/dpo_tokens/` in the trainer)
data/packing.py's.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from data.fileio import JsonlError, read_jsonl, sha256_file
from data.mixture import held_out_mask
from data.order import LayoutError, SampleCursor, check_seq_len
from data.packing import (ChatDataError, best_fit_rows, cached_arrays, order_state, pack_segments, restore_order,
                          segment_arrays)
from data.tokenizer import EOS_ID, IGNORE_INDEX, PAD_ID, VOCAB_SIZE  # EOS <|im_end|> ends a text completion

log = logging.getLogger(__name__)

STATE_FORMAT = 1
PAIRS_FORMAT = 1  # bump when the rendering rules below change (it keys the reference cache)
ORDER_SALT = 0xD90
ID_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
ROW_MULTIPLE = 64  # DPO rows end at the fullest row's length rounded up to this (short PTS pairs waste no compute)


def _token_ids(value, key: str, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value):
        raise ChatDataError(f"{where}: '{key}' must be a non-empty list of integer token ids")
    # Range-checked as Python ints: a huge id (2**70) would overflow int64 before numpy could check it.
    if min(value) < 0 or max(value) >= VOCAB_SIZE:
        i = next(i for i, t in enumerate(value) if not 0 <= t < VOCAB_SIZE)
        raise ChatDataError(f"{where}: '{key}'[{i}] = {value[i]} is outside the vocabulary [0, {VOCAB_SIZE})")
    ids = np.asarray(value, dtype=np.int32)
    pad = np.flatnonzero(ids == PAD_ID)
    if pad.size:  # pad marks unused row positions; as data it would be attended to and trained on
        raise ChatDataError(f"{where}: '{key}'[{pad[0]}] = {PAD_ID} is the pad id <|dummy_85|>, which real text "
                            f"never holds (padding left in a rollout?)")
    return ids


def parse_pair(obj: dict, where: str, tok) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(prompt, chosen, rejected) token ids and the form ('ids' | 'text') of one jsonl record."""
    if any(k in obj for k in ID_KEYS):
        missing = [k for k in ID_KEYS if k not in obj]
        if missing:
            raise ChatDataError(f"{where}: token-id pair without {missing} (expected all of {list(ID_KEYS)})")
        return (*(_token_ids(obj[k], k, where) for k in ID_KEYS), "ids")
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise ChatDataError(f"{where}: missing '{key}' (expected 'prompt' messages with 'chosen'/'rejected' "
                                f"texts, or {list(ID_KEYS)})")
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str):
            raise ChatDataError(f"{where}: '{key}' must be a string (or use '{key}_ids' for token ids), got "
                                f"{type(obj[key]).__name__}")
        if not obj[key].strip():  # the completion would be <|im_end|> alone: a preference for saying nothing
            raise ChatDataError(f"{where}: '{key}' is empty; expected the text of a completion")
    try:
        prompt = tok.apply_chat_template(obj["prompt"], add_generation_prompt=True)
    except ValueError as e:
        raise ChatDataError(f"{where}: 'prompt': {e}") from None
    chosen, rejected = (tok.encode(obj[k]) + [EOS_ID] for k in ("chosen", "rejected"))
    return (np.asarray(prompt, np.int32), np.asarray(chosen, np.int32), np.asarray(rejected, np.int32), "text")


def load_pairs(path: str | Path, tokenizer) -> tuple[dict[str, np.ndarray], dict]:
    """Every pair of a file: arrays (flat `tokens` int32, `bounds` (n, 4) offsets of prompt | chosen | rejected)
    and meta (`forms` counted, `tokenizer`: its fingerprint, or 'token-ids-as-given' when no pair is text)."""
    parts, lengths, forms = [], [], {"ids": 0, "text": 0}
    try:
        for line_no, obj in read_jsonl(path):
            prompt, chosen, rejected, form = parse_pair(obj, f"{path}:{line_no}", tokenizer)
            parts += [prompt, chosen, rejected]
            lengths.append((len(prompt), len(chosen), len(rejected)))
            forms[form] += 1
    except JsonlError as e:
        raise ChatDataError(str(e)) from None
    if not lengths:
        raise ChatDataError(f"{path}: no preference pairs")
    flat = np.cumsum(np.concatenate([[0], np.asarray(lengths, dtype=np.int64).reshape(-1)]))
    bounds = np.stack([flat[0:-1:3], flat[1::3], flat[2::3], flat[3::3]], axis=1)  # (n, 4)
    # token-id-only files never touch the tokenizer; text files depend on it and on the template
    meta = {"forms": forms, "tokenizer": tokenizer.fingerprint if forms["text"] else "token-ids-as-given"}
    return {"tokens": np.concatenate(parts), "bounds": bounds}, meta


class PairBatches:
    """This rank's DPO micro-batches (micro_batch pairs each), endlessly over epochs; resumable by pairs consumed.

    token_cache: a directory for the tokenized pairs (data/packing.py `cached_arrays`); None = tokenize in memory.
    """

    def __init__(self, path: str | Path, seq_len: int, micro_batch: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 1234, held_out_fraction: float = 0.0, tokenizer=None,
                 token_cache: str | Path | None = None):
        try:
            check_seq_len(seq_len)
            self.cursor = SampleCursor(micro_batch, global_batch, rank, world_size)
        except LayoutError as e:
            raise ChatDataError(str(e)) from None
        self.path, self.seq_len, self.seed = Path(path), seq_len, seed
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        if not self.path.is_file():
            raise ChatDataError(f"{path}: file not found")
        if tokenizer is None:
            from data.tokenizer import Phi4Tokenizer
            tokenizer = Phi4Tokenizer()
        sha256 = sha256_file(path)
        key = {"format": PAIRS_FORMAT, "kind": "dpo", "sha256": sha256, "tokenizer": tokenizer.fingerprint,
               "template": _template_fingerprint()}
        data, meta = cached_arrays(token_cache, key, lambda: load_pairs(path, tokenizer),
                                   write=rank == 0)  # one writer; the trainer lets rank 0 build it first
        self.tokens, self.bounds, self.forms = data["tokens"], data["bounds"], meta["forms"]
        self.num_pairs = len(self.bounds)
        p, c, r = (np.diff(self.bounds[:, k:k + 2], axis=1)[:, 0] for k in range(3))
        fits = p + np.maximum(c, r) - 1 <= seq_len  # positions the longer sequence takes in a row
        same = np.array([c[i] == r[i] and np.array_equal(*self._sides(i)) for i in range(self.num_pairs)],
                        dtype=bool)
        self.skipped = {"too_long": int((~fits).sum()), "identical": int((fits & same).sum())}
        self.valid = fits & ~same
        held = held_out_mask(self.num_pairs, held_out_fraction, seed)
        self.train_ids = np.flatnonzero(self.valid & ~held)
        self.held_ids = np.flatnonzero(self.valid & held)
        if any(self.skipped.values()):
            log.warning("%s: pairs skipped: %s (too_long: a side exceeds seq_len + 1 = %d tokens)", path,
                        self.skipped, seq_len + 1)
        if len(self.train_ids) == 0:
            raise ChatDataError(f"{path}: no training pair left ({self.num_pairs} read, skipped {self.skipped}, "
                                f"held_out_fraction={held_out_fraction})")
        # What the reference log-probs depend on (train/dpo.py keys its cache with it, plus the model).
        self.identity = {"format": PAIRS_FORMAT, "data_sha256": sha256, "tokenizer": meta["tokenizer"],
                         "template": _template_fingerprint(), "max_tokens": seq_len, "num_pairs": self.num_pairs}
        ident = {**self.identity, "state_format": STATE_FORMAT, "seed": seed, "held_out_fraction": held_out_fraction}
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        self._perm: tuple[int, np.ndarray] | None = None
        log.info("%s: %d pairs (%s), %d train, %d held out, skipped %s", path, self.num_pairs, self.forms,
                 len(self.train_ids), len(self.held_ids), self.skipped)

    def _sides(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        b = self.bounds[i]
        return self.tokens[b[1]:b[2]], self.tokens[b[2]:b[3]]

    def sequences(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pair i's (prompt, chosen, rejected) token ids, exactly as they are fed to the model."""
        b = self.bounds[i]
        return self.tokens[b[0]:b[1]], self.tokens[b[1]:b[2]], self.tokens[b[2]:b[3]]

    def pairs_batch(self, pair_ids) -> dict:
        """Packed rows for these pairs, with `seq_slot`, `pair_ids` and `num_pairs` (see the module docstring)."""
        return pack_pairs([self.sequences(int(i)) for i in pair_ids], pair_ids, self.seq_len)

    # ---- the global order of pairs ---------------------------------------------------------------------
    def pair_at(self, i: int) -> int:
        """Global sample i -> the pair's line-order index (epoch i // n in a permutation seeded by (seed, epoch))."""
        e, k = divmod(i, len(self.train_ids))
        if self._perm is None or self._perm[0] != e:
            self._perm = (e, np.random.default_rng([self.seed, ORDER_SALT, e]).permutation(self.train_ids))
        return int(self._perm[1][k])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = self.cursor.advance()
        return self.pairs_batch([self.pair_at(first + j) for j in range(self.micro_batch)])

    @property
    def samples_consumed(self) -> int:
        return self.cursor.consumed

    def state_dict(self) -> dict:
        return order_state("dpo", STATE_FORMAT, self.cursor, self.fingerprint)

    def load_state_dict(self, state: dict) -> None:
        restore_order(state, "dpo", STATE_FORMAT, self.cursor, self.fingerprint, self.path,
                      "the file, tokenizer, train.seq_len, data.seed or data.held_out_fraction")

    def metrics(self) -> dict:
        return {"data/epoch": self.samples_consumed / len(self.train_ids), "data/pairs_consumed": self.samples_consumed}

    def held_out_batches(self, n_batches: int) -> dict[str, list[dict]]:
        """Rank r's j-th held-out batch holds held-out pairs (j W + r) b + [0, b); same count on every rank."""
        b, W = self.micro_batch, self.world_size
        out = []
        for j in range(min(n_batches, len(self.held_ids) // (b * W))):
            first = (j * W + self.rank) * b
            out.append(self.pairs_batch(self.held_ids[first:first + b].tolist()))
        return {"dpo": out} if out else {}


def pack_pairs(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pair_ids, seq_len: int) -> dict:
    """A batch of (prompt, chosen, rejected) pairs packed best-fit into rows; `pair_ids` index the reference cache."""
    segments = []
    for prompt, chosen, rejected in pairs:
        for side in (chosen, rejected):
            ids = np.concatenate([prompt, side])
            target = np.zeros(len(ids), dtype=bool)
            target[len(prompt):] = True
            segments.append(segment_arrays(ids, target))
    rows = best_fit_rows(np.array([len(s[0]) for s in segments]), seq_len)
    batch, seg = pack_segments(segments, rows, seq_len, trim_to=ROW_MULTIPLE)
    batch["seq_slot"] = torch.from_numpy(np.where(batch["labels"].numpy() != IGNORE_INDEX, seg, -1))
    batch["pair_ids"] = torch.as_tensor(np.asarray(pair_ids, dtype=np.int64))
    batch["num_pairs"] = len(pair_ids)
    return batch


def _template_fingerprint() -> str:
    """The chat template and completion rule that turn text pairs into ids."""
    from data.tokenizer import CHAT_TEMPLATE

    rule = "prompt=apply_chat_template(add_generation_prompt=True); completion=encode(text)+[100265]"
    return hashlib.sha256(f"{PAIRS_FORMAT}\n{CHAT_TEMPLATE}\n{rule}".encode()).hexdigest()
