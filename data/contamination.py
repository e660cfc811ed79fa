"""The hybrid 13-gram / 7-gram contamination check (Phi-4 report App. B.1) of one text against benchmark items.

Per document, after normalisation (lowercase, punctuation -> spaces: "1.8 kg" -> "1 8 kg"):
  1. any 13-gram shared with a benchmark and not allow-listed -> contaminated;
  2. otherwise ratio = shared 7-grams / min(#7-grams of the document, #7-grams of the item), maximised over the
     benchmark items: ratio >= contaminated_threshold -> contaminated, > info_threshold -> partial, else clean.
N-grams are 64-bit hashes (a polynomial over blake2b word hashes, computed with numpy). `Decontaminator.check` is the
reference; `check_batch` gives its verdicts for a batch at once (one regex pass per document, cached word hashes, one
numpy pass over the batch's n-grams behind a 24-bit prefix flag table). Files, configs and shards: data/decontaminate.py.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain

import numpy as np

_MULT = np.uint64(0x100000001B3)  # odd multiplier of the polynomial n-gram hash (FNV prime); wraps mod 2**64


def normalize(text: str) -> list[str]:
    """Lowercased words with punctuation (and underscores) turned into separators."""
    return re.sub(r"[\W_]+", " ", text.lower()).split()


_WORD = re.compile(r"[^\W_]+")  # the maximal runs normalize() keeps: same words, ~1.5x faster (one pass, no copy)


@lru_cache(maxsize=1 << 20)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """uint64 hash of every n-gram of `words`, in order, shape (max(0, len(words) - n + 1),)."""
    count = len(words) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter((_word_hash(x) for x in words), dtype=np.uint64, count=len(words))
    h = np.zeros(count, dtype=np.uint64)
    for j in range(n):  # h = sum_j w[i + j] * MULT**(n - 1 - j)  (mod 2**64; uint64 arrays wrap silently)
        h = h * _MULT + w[j:j + count]
    return h


class _WordHashCache(dict):
    """word -> blake2b word hash (as _word_hash), filled on a miss; `get_hashes` maps a word list in one C loop."""

    def __init__(self, max_words: int = 1 << 21):
        super().__init__()
        self.max_words = max_words

    def __missing__(self, word: str) -> int:
        if len(self) >= self.max_words:
            self.clear()  # bounded memory on long-tailed vocabularies; the hashes never change
        value = self[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return value

    def get_hashes(self, words: list[str]) -> np.ndarray:
        return np.fromiter(map(self.__getitem__, words), dtype=np.uint64, count=len(words))


def _window_hashes(w: np.ndarray, n: int) -> np.ndarray:
    """ngram_hashes over an already hashed word array: every window of n, shape (max(0, len(w) - n + 1),)."""
    count = len(w) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = w[:count].copy()
    for j in range(1, n):
        h *= _MULT
        h += w[j:j + count]
    return h


_PREFIX_BITS = 24  # 16 MiB of flags per table


def _prefix_bits(sorted_table: np.ndarray) -> np.ndarray:
    bits = np.zeros(1 << _PREFIX_BITS, dtype=bool)
    bits[sorted_table >> np.uint64(64 - _PREFIX_BITS)] = True
    return bits


def _isin_sorted(values: np.ndarray, sorted_table: np.ndarray) -> np.ndarray:
    if len(sorted_table) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_table, values), len(sorted_table) - 1)
    return sorted_table[pos] == values


def record_text(record, fields: list[str]) -> str | None:
    """The text of a record: the listed fields, flattened (strings, lists, chat messages' content); None if none."""
    parts = []

    def flatten(value):
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for v in value:
                flatten(v)
        elif isinstance(value, dict):
            flatten(value["content"] if "content" in value else list(value.values()))
    found = False
    for name in fields:
        if isinstance(record, dict) and name in record:
            found = True
            flatten(record[name])
    return "\n".join(parts) if found else None


@dataclass
class Verdict:
    cls: str  # clean | partial | contaminated
    ratio: float = 0.0  # max 7-gram overlap ratio (0 when a 13-gram decided)
    benchmark: str = ""  # the benchmark that decided, '' when clean
    item: str = ""
    reason: str = ""  # '13-gram' | '7-gram ratio'
    ngram: str = ""  # the shared 13-gram, for humans
    per_benchmark: dict = field(default_factory=dict)  # name -> class of this document against that benchmark


class Decontaminator:
    """Benchmark n-gram tables and the check; build once, then `check_batch(texts)` (fast) or `check(text)` (the
    per-document reference: same verdicts)."""

    def __init__(self, benchmarks: dict[str, list[tuple[str, str]]], allowlist: list[str] = (), long_n: int = 13,
                 short_n: int = 7, contaminated_threshold: float = 0.4, info_threshold: float = 0.2):
        self.long_n, self.short_n = long_n, short_n
        self.contaminated_threshold, self.info_threshold = contaminated_threshold, info_threshold
        self.names = list(benchmarks)
        self._word_hashes = _WordHashCache()
        allow_long = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [ngram_hashes(normalize(p), long_n)
                                                                          for p in allowlist]))
        self.allow_short = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [ngram_hashes(normalize(p), short_n)
                                                                                for p in allowlist]))
        # Per benchmark: sorted unique 13-gram hashes (allow-list removed) and the item each came from.
        self.long_tables: list[tuple[np.ndarray, np.ndarray]] = []
        self.item_ids: list[str] = []
        self.stats = {}
        item_bench, item_n, pair_hash, pair_item = [], [], [], []
        for b, (name, items) in enumerate(benchmarks.items()):
            long_hash, long_item, too_short = [], [], 0
            for item_id, text in items:
                index = len(self.item_ids)
                self.item_ids.append(str(item_id))
                w = self._word_hashes.get_hashes(normalize(text))  # ngram_hashes(words, n) == _window_hashes(w, n)
                longs = _window_hashes(w, long_n)
                long_hash.append(longs)
                long_item.append(np.full(len(longs), index, dtype=np.int64))
                short = np.unique(_window_hashes(w, short_n))
                short = short[~_isin_sorted(short, self.allow_short)]
                item_bench.append(b)
                item_n.append(len(short))
                too_short += len(short) == 0
                pair_hash.append(short)
                pair_item.append(np.full(len(short), index, dtype=np.int64))
            table, first = np.unique(np.concatenate([np.zeros(0, np.uint64)] + long_hash), return_index=True)
            owner = np.concatenate([np.zeros(0, np.int64)] + long_item)[first]
            keep = ~_isin_sorted(table, allow_long)
            self.long_tables.append((table[keep], owner[keep]))
            self.stats[name] = {"items": len(items), "items_without_short_ngrams": too_short,
                                "long_ngrams": int(keep.sum())}
        self.item_bench = np.asarray(item_bench, dtype=np.int64)
        self.item_n = np.asarray(item_n, dtype=np.int64)
        hashes = np.concatenate([np.zeros(0, np.uint64)] + pair_hash)
        owners = np.concatenate([np.zeros(0, np.int64)] + pair_item)
        order = np.argsort(hashes, kind="stable")
        self.pair_hash, self.pair_item = hashes[order], owners[order]  # inverted index: 7-gram -> items
        # check_batch's screen: the union of the 13-gram tables, and a bit per 24-bit hash prefix of each table
        self._long_any = np.unique(np.concatenate([np.zeros(0, np.uint64)] + [t for t, _ in self.long_tables]))
        self._long_bits, self._short_bits = _prefix_bits(self._long_any), _prefix_bits(self.pair_hash)

    def check(self, text: str) -> Verdict:
        words = normalize(text)
        per = {name: "clean" for name in self.names}
        longs = ngram_hashes(words, self.long_n)
        first_hit = None
        for b, (table, owner) in enumerate(self.long_tables):
            hits = np.flatnonzero(_isin_sorted(longs, table))
            if len(hits):
                per[self.names[b]] = "contaminated"
                if first_hit is None:
                    pos = int(hits[0])
                    item = int(owner[np.searchsorted(table, longs[pos])])
                    first_hit = (b, pos, item)
        if first_hit is not None:
            b, pos, item = first_hit
            return Verdict("contaminated", 0.0, self.names[b], self.item_ids[item], "13-gram",
                           " ".join(words[pos:pos + self.long_n]), per)
        short = np.unique(ngram_hashes(words, self.short_n))
        short = short[~_isin_sorted(short, self.allow_short)]
        if len(short) == 0 or len(self.pair_hash) == 0:
            return Verdict("clean", per_benchmark=per)
        lo = np.searchsorted(self.pair_hash, short, "left")
        hi = np.searchsorted(self.pair_hash, short, "right")
        matched = np.flatnonzero(hi > lo)
        if len(matched) == 0:
            return Verdict("clean", per_benchmark=per)
        owners = np.concatenate([self.pair_item[lo[i]:hi[i]] for i in matched])
        items, shared = np.unique(owners, return_counts=True)
        ratios = shared / np.minimum(len(short), self.item_n[items])
        best_per_bench = np.zeros(len(self.names))
        np.maximum.at(best_per_bench, self.item_bench[items], ratios)
        for b, r in enumerate(best_per_bench):
            per[self.names[b]] = self._classify(r)
        best = int(np.argmax(ratios))
        ratio = float(ratios[best])
        cls = self._classify(ratio)
        if cls == "clean":
            return Verdict("clean", ratio, per_benchmark=per)
        item = int(items[best])
        return Verdict(cls, ratio, self.names[self.item_bench[item]], self.item_ids[item], "7-gram ratio", "", per)

    def check_batch(self, texts: list[str]) -> list[Verdict]:
        """check() of every text, the same verdicts, for a batch at once: the documents that share no n-gram with any
        benchmark are clean (ratio 0); the 13-gram verdicts (`_long_verdicts`) and the 7-gram ratios of the rest
        (`_short_verdicts`) are computed for all documents together, with check()'s arithmetic and tie-breaks."""
        words, w, ends, doc_of, hits, long_at = self._hits(texts)
        verdicts: list[Verdict | None] = [None] * len(texts)
        long_docs = np.unique(hits[self.long_n])
        if len(long_docs):
            self._long_verdicts(hits[self.long_n], *long_at, ends, words, verdicts)
        short_only = np.zeros(len(texts), dtype=bool)
        short_only[hits[self.short_n]] = True
        short_only[long_docs] = False
        for d, v in self._short_verdicts(w, ends, doc_of, short_only).items():
            verdicts[d] = v
        return [v if v is not None else Verdict("clean", per_benchmark=dict.fromkeys(self.names, "clean"))
                for v in verdicts]

    def screen(self, texts: list[str]) -> np.ndarray:
        """bool per text: True if it shares a 13-gram or a (not allow-listed) 7-gram with some benchmark item."""
        suspect = np.zeros(len(texts), dtype=bool)
        for docs in self._hits(texts)[4].values():
            suspect[docs] = True
        return suspect

    def _hits(self, texts: list[str]):
        """(words per document, word hashes of the batch, each document's end in them, the document of each word,
        {n: the document of each n-gram found in the n-gram tables}, (position, hash) of each 13-gram hit). One numpy
        pass over the batch; a 24-bit prefix flag table rejects
        most n-grams before the binary search."""
        words = [_WORD.findall(t.lower()) for t in texts]
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        w = self._word_hashes.get_hashes(list(chain.from_iterable(words)))
        ends = np.cumsum(lengths)
        doc_of = np.repeat(np.arange(len(texts)), lengths)
        hits = {}
        for n, table, bits in ((self.long_n, self._long_any, self._long_bits),
                               (self.short_n, self.pair_hash, self._short_bits)):
            h = _window_hashes(w, n)  # windows across a document boundary are dropped below
            maybe = np.flatnonzero(bits[h >> np.uint64(64 - _PREFIX_BITS)])
            maybe = maybe[_isin_sorted(h[maybe], table)]
            docs = doc_of[maybe]
            valid = maybe + n <= ends[docs]
            hits[n] = docs[valid]
            if n == self.long_n:
                long_at = (maybe[valid], h[maybe[valid]])  # where the 13-gram hits are, and their hashes
        return words, w, ends, doc_of, hits, long_at

    def _long_verdicts(self, docs, pos, hashes, ends, words, verdicts) -> None:
        """check()'s 13-gram verdicts: the first benchmark (in order) with a hit decides, at its first position in
        the document; every benchmark with a hit is contaminated. pos: in the batch's words; words: per document."""
        decided = {}
        per = {d: dict.fromkeys(self.names, "clean") for d in set(docs.tolist())}
        for b, (table, owner) in enumerate(self.long_tables):
            inside = np.flatnonzero(_isin_sorted(hashes, table))
            hit_docs, first = np.unique(docs[inside], return_index=True)  # positions ascend: each document's first
            first = inside[first]
            items = owner[np.searchsorted(table, hashes[first])]
            for d, p, item in zip(hit_docs.tolist(), pos[first].tolist(), items.tolist()):
                per[d][self.names[b]] = "contaminated"
                if d not in decided:
                    decided[d] = (b, p, item)
        for d, (b, p, item) in decided.items():
            at = p - (int(ends[d - 1]) if d else 0)
            verdicts[d] = Verdict("contaminated", 0.0, self.names[b], self.item_ids[item], "13-gram",
                                  " ".join(words[d][at:at + self.long_n]), per[d])

    def _short_verdicts(self, w, ends, doc_of, selected: np.ndarray) -> dict[int, Verdict]:
        """check()'s 7-gram verdicts of the selected documents (no 13-gram hit), all at once: unique 7-grams per
        document less the allow-list, shared counts per (document, item), ratio = shared / min(#doc, #item)."""
        n = self.short_n
        h = _window_hashes(w, n)
        pos = np.flatnonzero(selected[doc_of[:len(h)]])
        docs = doc_of[pos]
        pos, docs = pos[pos + n <= ends[docs]], docs[pos + n <= ends[docs]]
        hs = h[pos]
        keep = ~_isin_sorted(hs, self.allow_short)
        hs, docs = hs[keep], docs[keep]
        order = np.lexsort((hs, docs))
        hs, docs = hs[order], docs[order]
        first = np.ones(len(hs), dtype=bool)
        first[1:] = (hs[1:] != hs[:-1]) | (docs[1:] != docs[:-1])
        hs, docs = hs[first], docs[first]  # unique (document, 7-gram)
        n_short = np.bincount(docs, minlength=len(selected))
        lo = np.searchsorted(self.pair_hash, hs, "left")
        count = np.searchsorted(self.pair_hash, hs, "right") - lo
        m = count > 0
        lo, count, docs = lo[m], count[m], docs[m]
        starts = np.repeat(lo - np.cumsum(count) + count, count)  # expand each match to its items
        items = self.pair_item[starts + np.arange(int(count.sum()))]
        n_items = len(self.item_ids)
        keys, shared = np.unique(np.repeat(docs, count) * n_items + items, return_counts=True)
        pd, pi = keys // n_items, keys % n_items
        ratios = shared / np.minimum(n_short[pd], self.item_n[pi])
        best_per_bench = np.zeros((len(selected), len(self.names)))
        np.maximum.at(best_per_bench, (pd, self.item_bench[pi]), ratios)
        order = np.lexsort((pi, -ratios, pd))  # per document: the highest ratio, then the first item (as argmax)
        lead = order[np.r_[True, pd[order][1:] != pd[order][:-1]]] if len(order) else order
        out = {}
        for j in lead.tolist():
            d, item, ratio = int(pd[j]), int(pi[j]), float(ratios[j])
            per = {name: self._classify(r) for name, r in zip(self.names, best_per_bench[d])}
            cls = self._classify(ratio)
            out[d] = (Verdict("clean", ratio, per_benchmark=per) if cls == "clean" else
                      Verdict(cls, ratio, self.names[self.item_bench[item]], self.item_ids[item], "7-gram ratio", "",
                              per))
        return out

    def _classify(self, ratio: float) -> str:
        if ratio > self.info_threshold:
            return "contaminated" if ratio >= self.contaminated_threshold else "partial"
        return "clean"
