"""SFT and DPO batch sources over a post-training mixture, and the one place that picks them.

`sft_batches` / `dpo_batches` return today's single-file sources (data/sft.py ChatBatches, data/pairs.py
PairBatches, unchanged byte for byte) for one source, and `ChatMixture` / `PairMixture` for several. A mixture
reads every file with the single-file class (its checks, token cache in `<token_cache>/<name>/`, held-out split),
then orders examples by data/post_mixture.py's `Interleave`:
- ChatMixture: a sample is one row. The interleaved stream of conversations is cut into blocks of PACK_BLOCK,
  each packed best-fit and its rows shuffled by (seed, block), as ChatBatches packs an epoch's blocks;
  data.pack=false: one conversation per row, stream position = row.
- PairMixture: a sample is one pair, stream position = pair. Pair ids are global over the concatenated files
  (file k's pair j is sum of the earlier files' pair counts + j), so the reference log-prob cache indexes them.
`metrics()` reports per source the drawn examples, training tokens, epochs and share (in data.post_weight_unit)
over the samples consumed so far: `data/share/<name>`, `data/examples/<name>`, `data/tokens/<name>`,
`data/epoch/<name>`.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data.config import DataConfig, PostSourceConfig
from data.order import LayoutError, SampleCursor
from data.packing import ChatDataError, best_fit_rows, order_state, pack_segments, restore_order, segment_arrays
from data.pairs import PairBatches, pack_pairs
from data.post_mixture import MIX_SALT, Interleave, SourceWalk, post_sources
from data.sft import PACK_BLOCK, ChatBatches, check_loss_mask

MIX_FORMAT = 1
BLOCKS_CACHED = 4


def _cursor(micro_batch: int, global_batch: int, rank: int, world_size: int) -> SampleCursor:
    try:
        return SampleCursor(micro_batch, global_batch, rank, world_size)
    except LayoutError as e:
        raise ChatDataError(str(e)) from None


def _sub_cache(token_cache, name: str) -> Path | None:
    return Path(token_cache) / name if token_cache else None


class _Mixture:
    """What both mixtures share: the sources, their walks and interleaving, the state and the share metrics."""

    kind = ""

    def _setup(self, sources: list[PostSourceConfig], parts, tokens: list[np.ndarray], seed: int, unit: str):
        self.sources, self.parts, self.unit = sources, parts, unit
        self.names = [s.name for s in sources]
        self.walks = [SourceWalk(s.name, p.train_ids, t, seed, unit == "tokens")
                      for s, p, t in zip(sources, parts, tokens)]
        self.order = Interleave([s.weight for s in sources], self.walks)
        ident = {"format": MIX_FORMAT, "unit": unit, "salt": MIX_SALT,
                 "sources": [[s.name, s.weight, s.role, p.fingerprint] for s, p in zip(sources, parts)]}
        self.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        self.where = ", ".join(str(s.path) for s in sources)

    def __iter__(self):
        return self

    @property
    def samples_consumed(self) -> int:
        return self.cursor.consumed

    def state_dict(self) -> dict:
        return order_state(self.kind, MIX_FORMAT, self.cursor, self.fingerprint)

    def load_state_dict(self, state: dict) -> None:
        restore_order(state, self.kind, MIX_FORMAT, self.cursor, self.fingerprint, self.where,
                      "a source file, its weight or role, data.post_weight_unit, the tokenizer, train.seq_len, "
                      "data.pack, data.seed or data.held_out_fraction")

    def share_metrics(self, draws: np.ndarray, tokens: np.ndarray) -> dict:
        """Per source: examples and training tokens drawn, epochs, and the share in the weight unit."""
        drawn = tokens if self.unit == "tokens" else draws
        total = max(int(drawn.sum()), 1)
        out = {}
        for s, name in enumerate(self.names):
            out[f"data/share/{name}"] = int(drawn[s]) / total
            out[f"data/examples/{name}"] = int(draws[s])
            out[f"data/tokens/{name}"] = int(tokens[s])
            out[f"data/epoch/{name}"] = int(draws[s]) / self.walks[s].n
        return out

    def _drawn_stream(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(examples, training tokens) per source over stream positions [0, n)."""
        draws = self.order.drawn_before(n)
        return draws, np.array([w.tokens_drawn(d) for w, d in zip(self.walks, draws)], dtype=np.int64)


class ChatMixture(_Mixture):
    """This rank's SFT micro-batches over several conversation files (see the module docstring)."""

    kind = "sft_mixture"

    def __init__(self, sources: list[PostSourceConfig], seq_len: int, micro_batch: int, global_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 1234, pack: bool = True,
                 held_out_fraction: float = 0.0, tokenizer=None, token_cache: str | Path | None = None,
                 unit: str = "examples"):
        self.cursor = _cursor(micro_batch, global_batch, rank, world_size)
        if tokenizer is None:
            from data.tokenizer import Phi4Tokenizer
            tokenizer = Phi4Tokenizer()
        self.seq_len, self.pack, self.seed = seq_len, pack, seed
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        parts = [ChatBatches(s.path, seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                             world_size=world_size, seed=seed, pack=pack, held_out_fraction=held_out_fraction,
                             tokenizer=tokenizer, token_cache=_sub_cache(token_cache, s.name)) for s in sources]
        # training tokens of a conversation: its labelled targets, mask[offset + 1 : next offset]
        tokens = [np.add.reduceat(p.mask, p.offsets[:-1], dtype=np.int64) - p.mask[p.offsets[:-1]] for p in parts]
        self._setup(sources, parts, tokens, seed, unit)
        self._blocks: OrderedDict[int, list[list[int]]] = OrderedDict()
        self._block_first = [0]  # global row of each computed block's first row, plus the end of the last

    def _segment(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        s, c = self.order.at(position)
        part = self.parts[s]
        a, b = part.offsets[c], part.offsets[c + 1]
        return segment_arrays(part.tokens[a:b], part.mask[a:b])

    def block_rows(self, b: int) -> list[list[int]]:
        """Block b's rows, as lists of stream positions: best-fit packed, shuffled by (seed, block)."""
        if b in self._blocks:
            self._blocks.move_to_end(b)
            return self._blocks[b]
        first = b * PACK_BLOCK
        lengths = np.empty(PACK_BLOCK, dtype=np.int64)
        for j in range(PACK_BLOCK):
            s, c = self.order.at(first + j)
            lengths[j] = self.parts[s].segment_lengths[c]
        rows = best_fit_rows(lengths, self.seq_len)
        order = np.random.default_rng([self.seed, MIX_SALT, b]).permutation(len(rows))
        self._blocks[b] = [[first + k for k in rows[o]] for o in order]
        if len(self._blocks) > BLOCKS_CACHED:
            self._blocks.popitem(last=False)
        return self._blocks[b]

    def locate(self, i: int) -> tuple[int, int]:
        """Global row i -> (block, row within the block); data.pack=false: (row, 0)."""
        if not self.pack:
            return i, 0
        while i >= self._block_first[-1]:
            self._block_first.append(self._block_first[-1] + len(self.block_rows(len(self._block_first) - 1)))
        b = bisect.bisect_right(self._block_first, i) - 1
        return b, i - self._block_first[b]

    def row(self, i: int) -> list[int]:
        b, k = self.locate(i)
        return self.block_rows(b)[k] if self.pack else [i]

    def batch_at(self, first: int, size: int) -> dict:
        """The batch of global rows [first, first + size)."""
        rows = [self.row(i) for i in range(first, first + size)]
        segments = [self._segment(p) for row in rows for p in row]
        starts = np.cumsum([0] + [len(row) for row in rows])
        batch, _ = pack_segments(segments, [list(range(a, a + len(row))) for a, row in zip(starts, rows)],
                                 self.seq_len)
        return batch

    def __next__(self) -> dict:
        step, m = self.cursor.step_and_micro
        first = self.cursor.advance()
        batch = self.batch_at(first, self.micro_batch)
        check_loss_mask(batch, f"micro-batch {m} of step {step + 1} (since start/resume) on rank {self.rank}, "
                               f"global rows {first}..{first + self.micro_batch - 1} of the mixture {self.where}")
        return batch

    def drawn(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(examples, training tokens) per source in global rows [0, rows)."""
        if not self.pack:
            return self._drawn_stream(rows)
        b, k = self.locate(rows)
        draws, tokens = self._drawn_stream(b * PACK_BLOCK)
        for row in self.block_rows(b)[:k]:
            for p in row:
                s, c = self.order.at(p)
                draws[s] += 1
                tokens[s] += self.walks[s].tokens[c]
        return draws, tokens

    def metrics(self) -> dict:
        return {"data/rows_consumed": self.samples_consumed, **self.share_metrics(*self.drawn(self.samples_consumed))}

    def held_out_batches(self, n_batches: int) -> dict[str, list[dict]]:
        """Each file's held-out rows (ChatBatches.held_out_batches), under the source's name."""
        out = {}
        for name, part in zip(self.names, self.parts):
            batches = part.held_out_batches(n_batches).get("sft")
            if batches:
                out[name] = batches
        return out


class PairMixture(_Mixture):
    """This rank's DPO micro-batches over several pair files; pair ids are global (see the module docstring)."""

    kind = "dpo_mixture"

    def __init__(self, sources: list[PostSourceConfig], seq_len: int, micro_batch: int, global_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 1234, held_out_fraction: float = 0.0,
                 tokenizer=None, token_cache: str | Path | None = None, unit: str = "examples"):
        self.cursor = _cursor(micro_batch, global_batch, rank, world_size)
        if tokenizer is None:
            from data.tokenizer import Phi4Tokenizer
            tokenizer = Phi4Tokenizer()
        self.seq_len, self.seed = seq_len, seed
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        parts = [PairBatches(s.path, seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                             world_size=world_size, seed=seed, held_out_fraction=held_out_fraction,
                             tokenizer=tokenizer, token_cache=_sub_cache(token_cache, s.name)) for s in sources]
        # training tokens of a pair: the completion tokens of both sides
        tokens = [(p.bounds[:, 2] - p.bounds[:, 1]) + (p.bounds[:, 3] - p.bounds[:, 2]) for p in parts]
        self._setup(sources, parts, tokens, seed, unit)
        self.first_id = np.cumsum([0] + [p.num_pairs for p in parts])  # global id of each file's first pair
        self.num_pairs = int(self.first_id[-1])
        self.valid = np.concatenate([p.valid for p in parts])
        # What the reference log-probs depend on: every file's identity, in order (weights only reorder pairs).
        self.identity = {"format": MIX_FORMAT, "sources": [[s.name, p.identity] for s, p in zip(sources, parts)]}

    def sequences(self, pair_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = int(np.searchsorted(self.first_id, pair_id, side="right")) - 1
        return self.parts[s].sequences(int(pair_id - self.first_id[s]))

    def pairs_batch(self, pair_ids) -> dict:
        """Packed rows for these global pair ids (data/pairs.py `pack_pairs`)."""
        return pack_pairs([self.sequences(int(i)) for i in pair_ids], pair_ids, self.seq_len)

    def pair_at(self, i: int) -> int:
        """Global sample i -> the global pair id."""
        s, local = self.order.at(i)
        return int(self.first_id[s]) + local

    def __next__(self) -> dict:
        first = self.cursor.advance()
        return self.pairs_batch([self.pair_at(first + j) for j in range(self.micro_batch)])

    def metrics(self) -> dict:
        return {"data/pairs_consumed": self.samples_consumed,
                **self.share_metrics(*self._drawn_stream(self.samples_consumed))}

    def held_out_batches(self, n_batches: int) -> dict[str, list[dict]]:
        """Each file's held-out pairs (PairBatches.held_out_batches) with global pair ids, under the source's name."""
        out = {}
        for s, (name, part) in enumerate(zip(self.names, self.parts)):
            batches = part.held_out_batches(n_batches).get("dpo", [])
            for batch in batches:
                batch["pair_ids"] = batch["pair_ids"] + int(self.first_id[s])
            if batches:
                out[name] = batches
        return out


def sft_batches(data: DataConfig, seq_len: int, micro_batch: int, global_batch: int, rank: int = 0,
                world_size: int = 1, tokenizer=None, token_cache: str | Path | None = None):
    """The SFT batch source of a data config: ChatBatches for one source, ChatMixture for several."""
    sources = post_sources(data, "sft")
    common = dict(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                  world_size=world_size, seed=data.seed, pack=data.pack, held_out_fraction=data.held_out_fraction,
                  tokenizer=tokenizer, token_cache=token_cache)
    if not sources:
        raise ChatDataError("SFT needs data.sft_path or data.sft_sources")
    if len(sources) == 1:
        return ChatBatches(sources[0].path, **common)
    return ChatMixture(sources, unit=data.post_weight_unit, **common)


def dpo_batches(data: DataConfig, seq_len: int, micro_batch: int, global_batch: int, rank: int = 0,
                world_size: int = 1, tokenizer=None, token_cache: str | Path | None = None):
    """The DPO batch source of a data config: PairBatches for one source, PairMixture for several."""
    sources = post_sources(data, "dpo")
    common = dict(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, rank=rank,
                  world_size=world_size, seed=data.seed, held_out_fraction=data.held_out_fraction,
                  tokenizer=tokenizer, token_cache=token_cache)
    if not sources:
        raise ChatDataError("DPO needs data.dpo_path or data.dpo_sources")
    if len(sources) == 1:
        return PairBatches(sources[0].path, **common)
    return PairMixture(sources, unit=data.post_weight_unit, **common)
