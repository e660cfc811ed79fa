"""Pretraining/midtraining batch source: a deterministic, resumable, packed mixture of token-shard sources.

The order of samples
- A sample is one window of seq_len tokens from ONE source (packing never mixes sources, so the token
  fractions are exactly the sample fractions). `Schedule` (data/mixture.py) maps global sample i to
  (source s, its k-th sample) by a fixed low-discrepancy interleaving: every prefix of the run holds each
  source at its weight (within a few samples), at any scale.
- Source stream: epoch e of a source is its training documents (held-out removed, midtraining selection and
  up-weighting applied) in the order of a permutation seeded by (seed, source name, e), concatenated; epochs
  follow each other with no gap, so the stream is endless and nothing is dropped at an epoch's end.
- Large sources (manifest num_docs >= `blocked_min_docs`, default BLOCKED_MIN_DOCS = 1e6): the per-document state
  is built once into `state_dir` (default `<source path>/loader_state`) and memory-mapped, and epoch e is a
  block-wise permutation (data/docstate.py): O(blocks) work per epoch, O(block_docs) per block read. Sources
  below the threshold keep the full in-RAM permutation above (their batches and fingerprints are unchanged).
- Windows tile the stream with stride seq_len and one token of overlap: the source's k-th sample reads stream
  tokens [k T, k T + T + 1); input_ids = the first T, labels = the last T. Every token of an epoch is an input
  exactly once and a target exactly once (the stream's first token is never a target), so each document of
  an epoch is used once.
- Ranks: optimizer step s, micro-batch m (of A = G / (b W)), rank r takes global samples
  base + s G + (m W + r) b + [0, b). A global batch holds the same samples for any world size W.
  State = samples consumed (global) = the next step's `base`: a run resumes exactly, on any W or micro batch.

Packing (doc_masking=True): position_ids restart at 0 at every document start and at every row start;
cu_seqlens lists those segment starts over the flattened B*T tokens (plus B*T). A document's last token is its
eod: the eod is predicted (it is the target of the document's last text token), but the eod's own target, the
next document's first token, is -100. With doc_masking=False: positions 0..T-1, labels run across documents,
and cu_seqlens holds the row boundaries only (one attention segment per row).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch

from data.config import DataConfig
from data.docstate import BLOCK_DOCS, MappedStream, StateError, load_or_build
from data.mixture import Schedule, epoch_entries, held_out_mask, name_key, validate_mixture
from data.order import LayoutError, SampleCursor
from data.shards import ShardedSource
from data.tokenizer import IGNORE_INDEX

STATE_FORMAT = 1
EPOCHS_CACHED = 2  # per source: the current epoch and the next (a window can straddle them)
BLOCKED_MIN_DOCS = 1_000_000  # sources with at least this many documents use data/docstate.py


class LoaderError(ValueError):
    """The loader cannot be built or restored as asked; the message says which source or key."""


class SourceStream:
    """One source's token stream: documents `entries` (global doc indices, repeats allowed) per epoch.

    shuffle=True: endless, epoch e in the order of a permutation seeded by (seed, key, e).
    shuffle=False: the entries once, in the given order (held-out evaluation).
    Memory: 8 bytes per document of the directory plus ~12 bytes per entry per cached epoch.
    """

    def __init__(self, sharded: ShardedSource, lengths: np.ndarray, entries: np.ndarray, seed: int, key: int,
                 shuffle: bool = True):
        self.sharded, self.lengths, self.seed, self.key, self.shuffle = sharded, lengths, seed, key, shuffle
        self.entries = entries.astype(np.int64)
        self.epoch_tokens = int(lengths[self.entries].sum())  # tokens in one epoch (pass) of the stream
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(docs (n,), cum (n+1,) token offsets of each doc within the epoch) for epoch e."""
        if e in self._cache:
            self._cache.move_to_end(e)
            return self._cache[e]
        docs = self.entries
        if self.shuffle:
            docs = docs[np.random.default_rng([self.seed, self.key, e]).permutation(len(docs))]
        cum = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(self.lengths[docs], out=cum[1:])
        self._cache[e] = (docs, cum)
        if len(self._cache) > EPOCHS_CACHED:
            self._cache.popitem(last=False)
        return docs, cum

    def read(self, start: int, n: int, out: np.ndarray) -> list[int]:
        """Fill out[:n] with stream tokens [start, start + n); return the offsets in [0, n) where a document starts."""
        L = self.epoch_tokens
        if not self.shuffle and start + n > L:
            raise IndexError(f"source '{self.sharded.name}': read past the end of a one-pass stream")
        starts, filled = [], 0
        while filled < n:
            e, off = divmod(start + filled, L)
            docs, cum = self.epoch(e)
            i = int(np.searchsorted(cum, off, side="right")) - 1
            while filled < n and i < len(docs):
                skip = off - int(cum[i])  # tokens of document i already behind us
                if skip == 0:
                    starts.append(filled)
                doc = self.sharded.doc(int(docs[i]))
                take = min(len(doc) - skip, n - filled)
                out[filled:filled + take] = doc[skip:skip + take]
                filled += take
                off += take
                i += 1
        return starts


def pack_rows(tokens: np.ndarray, starts: list[list[int]], doc_masking: bool) -> dict:
    """Batch dict from windows `tokens` (B, T+1) and each row's document starts (offsets into the window)."""
    B, T = tokens.shape[0], tokens.shape[1] - 1
    input_ids = torch.from_numpy(tokens[:, :T].copy())  # copies: labels are edited below, never the window
    labels = tokens[:, 1:].copy()
    if not doc_masking:
        # numpy, not torch.arange(...).expand(...).contiguous(): the latter is ~100x slower on CPU here
        return {"input_ids": input_ids, "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(np.tile(np.arange(T, dtype=np.int64), (B, 1))),
                "cu_seqlens": torch.from_numpy(np.arange(0, B * T + 1, T, dtype=np.int32)), "max_seqlen": T}
    positions = np.empty((B, T), dtype=np.int64)
    cu = []
    for r in range(B):
        st = np.asarray(starts[r], dtype=np.int64)
        labels[r, st[st >= 1] - 1] = IGNORE_INDEX  # the eod before a new document does not predict it
        seg = np.concatenate([[0], st[(st > 0) & (st < T)]])  # segment starts within the row
        seg_len = np.diff(np.append(seg, T))
        positions[r] = np.arange(T) - np.repeat(seg, seg_len)
        cu.append(r * T + seg)
    cu.append([B * T])
    cu_seqlens = torch.from_numpy(np.concatenate(cu).astype(np.int32))
    return {"input_ids": input_ids, "labels": torch.from_numpy(labels), "position_ids": torch.from_numpy(positions),
            "cu_seqlens": cu_seqlens, "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max())}


class MixtureLoader:
    """This rank's micro-batches of a mixture, in order, endlessly; `state_dict()` makes it resumable.

    seed: defaults to cfg.seed. A source with >= blocked_min_docs documents maps its state from
    state_dir (default `<source path>/loader_state`; built there by the first rank) and reads in blocks of block_docs.
    Counters (`tokens_by_source`, `tokens_by_provenance`) are global (all ranks),
    derived from the samples consumed, so they need no communication and survive a resume.
    """

    def __init__(self, cfg: DataConfig, seq_len: int, micro_batch: int, global_batch: int, rank: int = 0,
                 world_size: int = 1, doc_masking: bool = True, seed: int | None = None, verify: str = "size",
                 expect_tokenizer: str | None = None, state_dir: str | None = None,
                 blocked_min_docs: int = BLOCKED_MIN_DOCS, block_docs: int = BLOCK_DOCS):
        validate_mixture(cfg)
        if seq_len < 1 or global_batch < 1:
            raise LoaderError(f"bad layout: seq_len={seq_len}, global_batch={global_batch} (both must be >= 1)")
        try:
            self.cursor = SampleCursor(micro_batch, global_batch, rank, world_size)
        except LayoutError as e:
            raise LoaderError(str(e)) from None
        self.cfg, self.seq_len, self.doc_masking = cfg, seq_len, doc_masking
        self.micro_batch, self.global_batch, self.rank, self.world_size = micro_batch, global_batch, rank, world_size
        self.grad_accum = self.cursor.grad_accum
        self.seed = cfg.seed if seed is None else seed
        self.names = [s.name for s in cfg.sources]
        self.provenance = {s.name: s.provenance for s in cfg.sources}
        self.streams: list[SourceStream | MappedStream] = []
        self._held_out: dict[str, SourceStream | MappedStream] = {}
        identity = []
        for src in cfg.sources:
            if not src.path:
                raise LoaderError(f"source '{src.name}' has no path: this mixture is planning-only "
                                  f"(prepare the source with `python -m data.prepare` and set its path)")
            sharded = ShardedSource(src.path, verify=verify, expect_tokenizer=expect_tokenizer)
            if sharded.provenance != src.provenance:
                raise LoaderError(f"source '{src.name}': config says provenance {src.provenance!r} but "
                                  f"{src.path}/manifest.json says {sharded.provenance!r}")
            blocked = sharded.num_docs >= blocked_min_docs
            if blocked:
                try:
                    state = load_or_build(state_dir or f"{src.path}/loader_state", sharded, src,
                                          cfg.held_out_fraction, self.seed, block_docs)
                except StateError as e:
                    raise LoaderError(f"source '{src.name}': {e}") from None
                train = MappedStream(sharded, state["train"], self.seed, name_key(src.name), block_docs)
                held_stream = MappedStream(sharded, state["held"], self.seed, 0, block_docs, shuffle=False)
                n_train = len(train.entries)
            else:
                lengths = sharded.doc_lengths()
                held = held_out_mask(len(lengths), cfg.held_out_fraction, self.seed)
                entries = epoch_entries(lengths, src, held)
                n_train = len(entries)
            if n_train == 0:
                raise LoaderError(f"source '{src.name}' ({src.path}): no training documents left after "
                                  f"min_doc_tokens={src.min_doc_tokens} and held_out_fraction="
                                  f"{cfg.held_out_fraction} ({sharded.num_docs} documents)")
            if not blocked:
                train = SourceStream(sharded, lengths, entries, self.seed, name_key(src.name))
                # Held-out: the selected held-out documents once each, no up-weighting, fixed order.
                plain = replace(src, upweight_min_tokens=0, upweight_factor=1.0)
                held_stream = SourceStream(sharded, lengths, epoch_entries(lengths, plain, ~held), self.seed, 0,
                                           shuffle=False)
            self.streams.append(train)
            self._held_out[src.name] = held_stream
            identity.append({"name": src.name, "provenance": src.provenance, "weight": src.weight,
                             "min_doc_tokens": src.min_doc_tokens, "upweight_min_tokens": src.upweight_min_tokens,
                             "upweight_factor": src.upweight_factor, "tokenizer": sharded.tokenizer,
                             "num_docs": sharded.num_docs, "num_tokens": sharded.num_tokens,
                             "shards": [e["tokens_sha256"] for e in sharded.manifest["shards"]],
                             **({"blocked_docs": block_docs} if blocked else {})})  # absent: the full permutation
        self.schedule = Schedule.from_weights([s.weight for s in cfg.sources])
        # Everything that fixes the global order of samples; not the layout (world size, batch sizes, masking).
        ident = {"format": STATE_FORMAT, "seed": self.seed, "seq_len": seq_len,
                 "held_out_fraction": cfg.held_out_fraction, "sources": identity}
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    # ---- the global order ----------------------------------------------------------------------------
    def window(self, i: int, out: np.ndarray | None = None) -> tuple[str, np.ndarray, list[int]]:
        """Global sample i: (source name, tokens (T+1,) int64, offsets in the window where documents start)."""
        s, k = self.schedule.locate(i)
        out = np.empty(self.seq_len + 1, dtype=np.int64) if out is None else out
        starts = self.streams[int(s)].read(int(k) * self.seq_len, self.seq_len + 1, out)
        return self.names[int(s)], out, starts

    def batch_at(self, first: int, size: int) -> dict:
        """The packed batch of global samples [first, first + size)."""
        tokens = np.empty((size, self.seq_len + 1), dtype=np.int64)
        starts, source_tokens = [], {}
        for r in range(size):
            name, _, st = self.window(first + r, tokens[r])
            starts.append(st)
            source_tokens[name] = source_tokens.get(name, 0) + self.seq_len
        batch = pack_rows(tokens, starts, self.doc_masking)
        batch["source_tokens"] = source_tokens
        return batch

    def sample_index(self, n: int) -> int:
        """First global sample of this rank's n-th micro-batch (counted from the last (re)start)."""
        return self.cursor.first_sample(n)

    # ---- iteration and state -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return self.batch_at(self.cursor.advance(), self.micro_batch)

    @property
    def samples_consumed(self) -> int:
        """Global samples handed out by all ranks together (ranks move in lockstep)."""
        return self.cursor.consumed

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "samples_consumed": self.samples_consumed, "seed": self.seed,
                "seq_len": self.seq_len, "fingerprint": self.fingerprint,
                "weights": {n: s.weight for n, s in zip(self.names, self.cfg.sources)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the saved samples; refused when the mixture, data, seed or seq_len changed."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise LoaderError(f"loader state: format {state.get('format') if isinstance(state, dict) else state!r} "
                              f"is not {STATE_FORMAT}")
        if state["fingerprint"] != self.fingerprint:
            saved = (state.get("seed"), state.get("seq_len"), state.get("weights"))
            now = (self.seed, self.seq_len, self.state_dict()["weights"])
            what = [f"{k}: saved {a} != now {b}" for k, a, b in zip(("seed", "seq_len", "weights"), saved, now) if a != b]
            raise LoaderError("loader state does not match this data mixture (fingerprint "
                              f"{state['fingerprint'][:12]} != {self.fingerprint[:12]}): "
                              + ("; ".join(what) if what else "the sources' shards or selection settings changed")
                              + ". Resuming would repeat or skip data; start a new stage (train.init_from) instead.")
        self.cursor.restart_at(state["samples_consumed"])

    def tokens_by_source(self) -> dict[str, int]:
        counts = self.schedule.counts_before(self.samples_consumed)
        return {n: int(c) * self.seq_len for n, c in zip(self.names, counts)}

    def tokens_by_provenance(self) -> dict[str, int]:
        out = {"synthetic": 0, "organic": 0}
        for name, tokens in self.tokens_by_source().items():
            out[self.provenance[name]] += tokens
        return out

    # ---- held-out evaluation -------------------------------------------------------------------------
    def held_out_windows(self, source_name: str) -> int:
        """Windows of seq_len the source's held-out documents fill (0 when none are held out)."""
        if source_name not in self._held_out:
            raise LoaderError(f"no source named {source_name!r}; sources: {self.names}")
        return max(0, self._held_out[source_name].epoch_tokens - 1) // self.seq_len

    def held_out_batches(self, source_name: str, n_batches: int) -> Iterator[dict]:
        """This rank's first n_batches held-out micro-batches of a source, the same at every call.

        Rank r's j-th batch holds held-out windows (j W + r) b + [0, b). Every rank yields the same number of
        batches (fewer than asked when the held-out documents run out), so collectives stay matched.
        """
        stream, T, b = self._held_out.get(source_name), self.seq_len, self.micro_batch
        available = self.held_out_windows(source_name) // (b * self.world_size)
        for j in range(min(n_batches, available)):
            first = (j * self.world_size + self.rank) * b
            tokens = np.empty((b, T + 1), dtype=np.int64)
            starts = [stream.read((first + r) * T, T + 1, tokens[r]) for r in range(b)]
            batch = pack_rows(tokens, starts, self.doc_masking)
            batch["source_tokens"] = {source_name: b * T}
            yield batch


def measure_throughput(loader: MixtureLoader, n_batches: int = 200, warmup: int = 5) -> dict:
    """Loader speed on this machine: micro-batches/s and tokens/s over n_batches (a benchmark, not a test)."""
    for _ in range(warmup):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    dt = time.perf_counter() - t0
    tokens = n_batches * loader.micro_batch * loader.seq_len
    return {"seq_len": loader.seq_len, "micro_batch": loader.micro_batch, "batches": n_batches,
            "seconds": dt, "batches_per_s": n_batches / dt, "tokens_per_s": tokens / dt,
            "ms_per_batch": 1000 * dt / n_batches}
