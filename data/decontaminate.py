"""Benchmark decontamination, the hybrid 13-gram / 7-gram check (Phi-4 report App. B.1): `python -m data.decontaminate <cfg>`.

Per training document, after normalisation (lowercase, punctuation -> spaces: "1.8 kg" -> "1 8 kg"):
  1. any 13-gram shared with a benchmark and not allow-listed -> contaminated;
  2. otherwise ratio = shared 7-grams / min(#7-grams of the document, #7-grams of the item), maximised over the
     benchmark items: ratio >= contaminated_threshold -> contaminated, > info_threshold -> partial, else clean.
Allow-listed phrases (multiple-choice boilerplate such as "a i only b ii only c iii only d ii and iii") are removed
from both n-gram sizes, on both sides. N-grams are 64-bit hashes (a polynomial over blake2b word hashes, computed
with numpy), so memory grows with the benchmarks' n-grams and the corpus streams through line by line.
Outputs under output_dir: the kept documents per input (original lines, or a keep-list of document indices), and
decontamination_report.json with counts per input, per benchmark and per class, plus a few examples.

Speed: documents are checked in batches (`Decontaminator.check_batch`): one regex pass per document, cached word
hashes mapped in one C loop, and one numpy pass over the batch's n-grams against the tables (behind a 24-bit prefix
flag table) clears the documents that share nothing with any benchmark; only the rest go through the per-document
`check`, so verdicts are check()'s. `python -m train.bench.decontam` measures MB/s per core.
On a cluster: `--shard I/N` checks every N-th document (non-blank line over the sorted inputs, from the I-th) and
writes a part and a completion marker under output_dir/parts/of-<N>/; `--merge N` then writes the outputs and report
of a one-process run, byte for byte (slurm/submit_decontaminate.sh queues both).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np

from data.benchmarks import SOURCES as BENCHMARK_SOURCES
from data.benchmarks import load_benchmark
from data.arrays import split_array_flags
from data.configfile import load_typed
from data.fileio import atomic_path, atomic_write
from data.sources import JSONL_SUFFIXES, iter_lines, list_inputs

CLASSES = ("clean", "partial", "contaminated")
_BATCH_CHARS = 1 << 22  # documents are checked in batches of about this much text (check_batch)
_MULT = np.uint64(0x100000001B3)  # odd multiplier of the polynomial n-gram hash (FNV prime); wraps mod 2**64


@dataclass
class BenchmarkSpec:
    name: str = ""
    path: str = ""  # jsonl, one test item per line; or the benchmark's own directory (source below)
    fields: list[str] = field(default_factory=lambda: ["question"])  # str, list of str (choices) or messages
    id_field: str = "id"  # item id in the report; the line number when absent
    # jsonl: `path` is the file above | a published layout read by data/benchmarks.py (mmlu_hf, arc_hf, gsm8k_hf,
    # math_hf, triviaqa_hf, mbpp_hf, humaneval_hf): `path` is the dataset's directory, as the evaluator reads it
    source: str = "jsonl"
    split: str = "test"


@dataclass
class DecontaminateConfig:
    inputs: list[str] = field(default_factory=list)  # .jsonl(.gz/.zst) files or folders of them (searched, sorted)
    text_fields: list[str] = field(default_factory=lambda: ["text"])  # plus messages/prompt/chosen/... for chat data
    output_dir: str = ""
    # clean: the kept lines of each input, as they were | keep_list: <input>.keep.txt, one kept document index per
    # line (0-based over the input's documents: non-blank lines, minus malformed ones skipped under on_error: skip)
    output: str = "clean"
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)
    allowlist: list[str] = field(default_factory=list)  # phrases whose n-grams never count
    allowlist_path: str = ""  # text file, one phrase per line
    long_n: int = 13
    short_n: int = 7
    # ASSUMPTION: the paper gives no thresholds. Without a shared 13-gram, a document at least as long as an item
    # shares at most 6 of every 13 of its 7-grams (ratio <= ~0.46), so a paraphrase can only be caught below that;
    # the paper's one example was flagged at 0.395 (with a 13-gram hit as well).
    contaminated_threshold: float = 0.4
    info_threshold: float = 0.2  # ASSUMPTION
    drop_partial: bool = False  # partial documents are reported and kept unless this is set
    on_error: str = "raise"  # raise | skip: a malformed line (bad JSON, missing text field) stops the run or is counted
    max_examples: int = 20

    def validate(self) -> None:
        where = "decontamination config"
        if not self.inputs:
            raise ValueError(f"{where}: 'inputs' is empty; expected a list of jsonl files")
        if not self.output_dir:
            raise ValueError(f"{where}: 'output_dir' is required")
        if not self.benchmarks:
            raise ValueError(f"{where}: 'benchmarks' is empty; expected entries with name, path, fields")
        names = [b.name for b in self.benchmarks]
        for i, b in enumerate(self.benchmarks):
            if not b.name or not b.path or not b.fields:
                raise ValueError(f"{where}: benchmarks[{i}] needs name, path and fields (got {b})")
            if b.source not in BENCHMARK_SOURCES:
                raise ValueError(f"{where}: benchmarks[{i}].source={b.source!r}; expected one of "
                                 f"{list(BENCHMARK_SOURCES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: benchmark names must be unique, got {names}")
        if self.output not in ("clean", "keep_list"):
            raise ValueError(f"{where}: output={self.output!r}; expected 'clean' or 'keep_list'")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"{where}: on_error={self.on_error!r}; expected 'raise' or 'skip'")
        if not 1 <= self.short_n <= self.long_n:
            raise ValueError(f"{where}: need 1 <= short_n ({self.short_n}) <= long_n ({self.long_n})")
        if not 0 <= self.info_threshold <= self.contaminated_threshold <= 1:
            raise ValueError(f"{where}: need 0 <= info_threshold ({self.info_threshold}) <= contaminated_threshold "
                             f"({self.contaminated_threshold}) <= 1")


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


def read_jsonl(path: str | Path):
    """Yield (line number, raw line bytes, parsed record or the decoding error) for every non-blank line of a
    .jsonl / .jsonl.gz / .jsonl.zst file; a truncated or corrupt stream raises SourceError naming file and line."""
    for line_no, raw in iter_lines(Path(path)):
        if not raw.strip():
            continue  # blank lines are not documents (as in data.sources)
        try:
            yield line_no, raw, json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            yield line_no, raw, e


def load_benchmarks(specs: list[BenchmarkSpec]) -> dict[str, list[tuple[str, str]]]:
    out = {}
    for spec in specs:
        if spec.source != "jsonl":  # the evaluator's items of the published files: question, choices, solution
            rows = load_benchmark(spec.source, spec.path, spec.split)
            items = [(str(r.get("id", n)), record_text(r, spec.fields)) for n, r in enumerate(rows)]
            if any(text is None for _, text in items):
                raise ValueError(f"benchmark {spec.name!r} ({spec.source} {spec.path}): none of the fields "
                                 f"{spec.fields} in its items; they hold {sorted(rows[0])}")
            if not items:
                raise ValueError(f"{spec.path}: benchmark {spec.name!r} has no items")
            out[spec.name] = items
            continue
        items = []
        for line_no, _, record in read_jsonl(spec.path):
            if isinstance(record, Exception):
                raise ValueError(f"{spec.path}: line {line_no}: not valid JSON / UTF-8 ({record})")
            text = record_text(record, spec.fields)
            if text is None:
                raise ValueError(f"{spec.path}: line {line_no}: none of the fields {spec.fields} is present")
            items.append((str(record.get(spec.id_field, line_no)), text))
        if not items:
            raise ValueError(f"{spec.path}: benchmark {spec.name!r} has no items")
        out[spec.name] = items
    return out


def _allowlist(cfg: DecontaminateConfig) -> list[str]:
    allowlist = list(cfg.allowlist)
    if cfg.allowlist_path:
        allowlist += [ln.strip() for ln in Path(cfg.allowlist_path).read_text().splitlines() if ln.strip()]
    return allowlist


def _targets(cfg: DecontaminateConfig) -> dict[Path, Path]:
    """input file -> its output file, inputs in their fixed (sorted) order."""
    out_dir, targets = Path(cfg.output_dir), {}
    for path in list_inputs(cfg.inputs, JSONL_SUFFIXES):
        name = path.name.removesuffix(".gz").removesuffix(".zst")
        target = out_dir / (name if cfg.output == "clean" else f"{name}.keep.txt")
        if target in targets.values():
            raise ValueError(f"inputs {path} and {[p for p, t in targets.items() if t == target][0]} would both "
                             f"write {target}; rename one")
        targets[path] = target
    return targets


def _dropped(cfg: DecontaminateConfig) -> set[str]:
    return {"contaminated", "partial"} if cfg.drop_partial else {"contaminated"}


def _lines(cfg: DecontaminateConfig, targets: dict[Path, Path], shard: tuple[int, int] = (0, 1)):
    """(input index, line number, line, text or None when malformed and skipped) of every document, in order; with
    shard (i, n) only the non-blank lines whose ordinal over all inputs is i mod n (the others are not parsed)."""
    i, n = shard
    ordinal = -1
    for k, input_path in enumerate(targets):
        for line_no, raw in iter_lines(input_path):
            if not raw.strip():
                continue  # blank lines are not documents (as in data.sources)
            ordinal += 1
            if ordinal % n != i:
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                record = e
            text = None if isinstance(record, Exception) else record_text(record, cfg.text_fields)
            if text is None:
                problem = (f"not valid JSON / UTF-8 ({record})" if isinstance(record, Exception)
                           else f"none of the fields {cfg.text_fields} is present")
                if cfg.on_error == "raise":
                    raise ValueError(f"{input_path}: line {line_no}: {problem} "
                                     f"(set on_error: skip to count and skip such lines)")
            yield k, line_no, raw, text


def _checked(checker: Decontaminator, lines):
    """(input index, line number, line, Verdict or None when skipped), the texts checked in batches."""
    pending, chars = [], 0
    for item in lines:
        pending.append(item)
        chars += len(item[3] or "")
        if chars >= _BATCH_CHARS:
            yield from _check_pending(checker, pending)
            pending, chars = [], 0
    yield from _check_pending(checker, pending)


def _check_pending(checker, pending):
    verdicts = iter(checker.check_batch([t for *_, t in pending if t is not None]))
    for k, line_no, line, text in pending:
        yield k, line_no, line, None if text is None else next(verdicts)


class _Outputs:
    """The kept documents of every input and the report, written from (input index, line number, line, verdict)
    in input order. A one-process run and the merge of shards both write through this, so their bytes agree."""

    def __init__(self, cfg: DecontaminateConfig, targets: dict[Path, Path], stats: dict, allowlist_phrases: int,
                 files: ExitStack):
        self.cfg, self.targets, self.files, self.drop = cfg, list(targets.items()), files, _dropped(cfg)
        self.per_bench = {name: {**s, "contaminated": 0, "partial": 0} for name, s in stats.items()}
        self.totals = {c: 0 for c in CLASSES} | {"documents": 0, "kept": 0, "skipped": 0}
        self.report = {"thresholds": {"long_n": cfg.long_n, "short_n": cfg.short_n,
                                      "contaminated_threshold": cfg.contaminated_threshold,
                                      "info_threshold": cfg.info_threshold, "drop_partial": cfg.drop_partial},
                       "allowlist_phrases": allowlist_phrases, "inputs": {}, "benchmarks": self.per_bench,
                       "totals": self.totals, "examples": []}
        self.current, self.out, self.counts, self.doc = -1, None, None, -1
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)

    def _open_until(self, k: int) -> None:
        while self.current < k:
            if self.out is not None:
                self._close_current()
            self.current += 1
            if self.current < len(self.targets):
                tmp = self.files.enter_context(atomic_path(self.targets[self.current][1]))
                self.out = self.files.enter_context(open(tmp, "wb"))  # closed before the rename (last in, first out)
                self.counts, self.doc = {c: 0 for c in CLASSES} | {"documents": 0, "kept": 0, "skipped": 0}, -1

    def _close_current(self) -> None:
        self.files.close()  # closes and renames the finished output into place
        input_path, target = self.targets[self.current]
        self.report["inputs"][str(input_path)] = {**self.counts, "output": str(target)}
        for key, v in self.counts.items():
            self.totals[key] += v
        self.out = None

    def add(self, k: int, line_no: int, line: bytes | None, verdict: Verdict | None) -> None:
        """line may be None where it is not kept."""
        self._open_until(k)
        counts = self.counts
        if verdict is None:
            counts["skipped"] += 1
            return
        self.doc += 1
        counts["documents"] += 1
        counts[verdict.cls] += 1
        for bench, cls in verdict.per_benchmark.items():
            if cls != "clean":
                self.per_bench[bench][cls] += 1
        if verdict.cls != "clean" and len(self.report["examples"]) < self.cfg.max_examples:
            self.report["examples"].append({"input": str(self.targets[k][0]), "doc": self.doc, "line": line_no,
                                            "class": verdict.cls, "benchmark": verdict.benchmark,
                                            "item": verdict.item, "reason": verdict.reason,
                                            "ratio": round(verdict.ratio, 4), "ngram": verdict.ngram})
        if verdict.cls in self.drop:
            return
        counts["kept"] += 1
        self.out.write(line + b"\n" if self.cfg.output == "clean" else f"{self.doc}\n".encode())

    def finish(self) -> dict:
        self._open_until(len(self.targets))
        atomic_write(Path(self.cfg.output_dir) / "decontamination_report.json",
                     json.dumps(self.report, indent=2) + "\n")
        return self.report


def _checker(cfg: DecontaminateConfig, allowlist: list[str]) -> Decontaminator:
    return Decontaminator(load_benchmarks(cfg.benchmarks), allowlist, cfg.long_n, cfg.short_n,
                          cfg.contaminated_threshold, cfg.info_threshold)


def run(cfg: DecontaminateConfig) -> dict:
    """Check every input document, write the kept ones (or keep-lists) and the report; returns the report."""
    allowlist = _allowlist(cfg)
    checker = _checker(cfg, allowlist)
    targets = _targets(cfg)
    with ExitStack() as files:
        outputs = _Outputs(cfg, targets, checker.stats, len(allowlist), files)
        for item in _checked(checker, _lines(cfg, targets)):
            outputs.add(*item)
        return outputs.finish()


# ---- sharded runs: `--shard I/N` checks every N-th document (non-blank line) of the sorted inputs, from the I-th, and
# writes one part and a completion marker under output_dir/parts/; `--merge N` writes what one run would have, byte for
# byte (both go through _Outputs) ------------------------------------------------------------------------------------

def part_paths(cfg: DecontaminateConfig, i: int, n: int) -> tuple[Path, Path, Path]:
    """(records, kept lines, completion marker) of shard i of n."""
    stem = Path(cfg.output_dir) / "parts" / f"of-{n:05d}" / f"part-{i:05d}"
    return stem.with_suffix(".records.jsonl"), stem.with_suffix(".kept"), stem.with_suffix(".done.json")


def _fingerprint(cfg: DecontaminateConfig, targets: dict[Path, Path]) -> dict:
    return {"config": asdict(cfg), "inputs": [str(p) for p in targets]}


def run_shard(cfg: DecontaminateConfig, i: int, n: int) -> dict:
    """Check the documents of shard i of n (every n-th non-blank line of the sorted inputs, from the i-th) and write
    its part: one record per line ([input, line] when clean, [input, line, null] when skipped, the verdict
    otherwise), its kept lines, then the completion marker. A shard whose marker matches the config is not redone."""
    if not 0 <= i < n:
        raise ValueError(f"--shard {i}/{n}: expected 0 <= I < N")
    targets = _targets(cfg)
    records_path, kept_path, marker_path = part_paths(cfg, i, n)
    fingerprint = _fingerprint(cfg, targets)
    if marker_path.is_file():
        marker = json.loads(marker_path.read_text())
        if marker["fingerprint"] == fingerprint:
            return marker
    allowlist = _allowlist(cfg)
    checker = _checker(cfg, allowlist)
    drop, keep_lines, lines = _dropped(cfg), cfg.output == "clean", 0
    with atomic_path(records_path) as tmp_r, atomic_path(kept_path) as tmp_k, \
            open(tmp_r, "w", encoding="utf-8", newline="\n") as records, open(tmp_k, "wb") as kept:
        for k, line_no, line, v in _checked(checker, _lines(cfg, targets, (i, n))):
            lines += 1
            if v is None:
                row = [k, line_no, None]
            elif v.cls == "clean" and all(c == "clean" for c in v.per_benchmark.values()):
                row = [k, line_no]
            else:
                row = [k, line_no, v.cls, v.ratio, v.benchmark, v.item, v.reason, v.ngram,
                       {b: c for b, c in v.per_benchmark.items() if c != "clean"}]
            records.write(json.dumps(row, ensure_ascii=False) + "\n")
            if v is not None and v.cls not in drop and keep_lines:
                kept.write(line + b"\n")
    marker = {"shard": i, "shards": n, "lines": lines, "stats": checker.stats, "allowlist_phrases": len(allowlist),
              "fingerprint": fingerprint}
    atomic_write(marker_path, json.dumps(marker, indent=2) + "\n")
    return marker


def merge(cfg: DecontaminateConfig, n: int) -> dict:
    """Write the outputs and report of a one-process run from the n completed parts of `--shard I/N`."""
    targets = _targets(cfg)
    fingerprint = _fingerprint(cfg, targets)
    parts = [part_paths(cfg, i, n) for i in range(n)]
    missing = [str(m) for _, _, m in parts if not m.is_file()]
    if missing:
        raise FileNotFoundError(f"merge of {n} shards: {len(missing)} not complete (no marker): {missing[:5]}; "
                                f"run `python -m data.decontaminate CONFIG --shard I/{n}` for them first")
    markers = [json.loads(m.read_text()) for _, _, m in parts]
    for (_, _, m), marker in zip(parts, markers):
        if marker["fingerprint"] != fingerprint:
            raise ValueError(f"{m}: written with another config or other inputs than this merge's; rerun the shard")
    drop, keep_lines = _dropped(cfg), cfg.output == "clean"
    with ExitStack() as files:
        records = [files.enter_context(open(r, encoding="utf-8", newline="\n")) for r, _, _ in parts]
        kept = [files.enter_context(open(k, "rb")) for _, k, _ in parts]
        with ExitStack() as out_files:
            outputs = _Outputs(cfg, targets, markers[0]["stats"], markers[0]["allowlist_phrases"], out_files)
            ordinal = 0
            while row := records[ordinal % n].readline():  # round robin: line ordinal j is in part j mod n
                row = json.loads(row)
                if len(row) == 2:
                    v = Verdict("clean", per_benchmark={})
                elif row[2] is None:
                    v = None
                else:
                    v = Verdict(row[2], row[3], row[4], row[5], row[6], row[7], row[8])
                line = kept[ordinal % n].readline()[:-1] if v is not None and v.cls not in drop and keep_lines else None
                outputs.add(row[0], row[1], line, v)
                ordinal += 1
            short = [i for i in range(n) if records[i].readline() or kept[i].readline()]
            if short or ordinal != sum(m["lines"] for m in markers):
                raise ValueError(f"merge of {n} shards: parts {short} hold more lines than the round robin takes; "
                                 f"rerun them")
            return outputs.finish()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m data.decontaminate <config.yaml> [key=value ...] [--shard I/N | --merge N]\n\n"
              + __doc__)
        return 0 if argv else 2
    try:
        rest, shard, merge_n = split_array_flags(argv[1:])
    except ValueError as e:
        raise SystemExit(str(e)) from None
    argv = argv[:1] + rest
    cfg = load_typed(argv[0], argv[1:], schema=DecontaminateConfig)
    if shard:
        marker = run_shard(cfg, *shard)
        print(f"shard {shard[0]}/{shard[1]}: {marker['lines']} lines; part {part_paths(cfg, *shard)[2]}")
        return 0
    report = merge(cfg, merge_n) if merge_n else run(cfg)
    t = report["totals"]
    print(f"{t['documents']} documents: {t['clean']} clean, {t['partial']} partial, {t['contaminated']} "
          f"contaminated; kept {t['kept']}; skipped {t['skipped']} malformed lines")
    for name, b in report["benchmarks"].items():
        print(f"  {name}: {b['items']} items, {b['contaminated']} contaminated docs, {b['partial']} partial docs")
    print(f"report: {Path(cfg.output_dir) / 'decontamination_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
