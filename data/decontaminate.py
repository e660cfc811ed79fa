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
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from data.configfile import load_typed
from data.fileio import atomic_path, atomic_write
from data.sources import JSONL_SUFFIXES, iter_lines, list_inputs

CLASSES = ("clean", "partial", "contaminated")
_MULT = np.uint64(0x100000001B3)  # odd multiplier of the polynomial n-gram hash (FNV prime); wraps mod 2**64


@dataclass
class BenchmarkSpec:
    name: str = ""
    path: str = ""  # jsonl, one test item per line
    fields: list[str] = field(default_factory=lambda: ["question"])  # str, list of str (choices) or messages
    id_field: str = "id"  # item id in the report; the line number when absent


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
    """Benchmark n-gram tables and the per-document check; build once, then `check(text)` per document."""

    def __init__(self, benchmarks: dict[str, list[tuple[str, str]]], allowlist: list[str] = (), long_n: int = 13,
                 short_n: int = 7, contaminated_threshold: float = 0.4, info_threshold: float = 0.2):
        self.long_n, self.short_n = long_n, short_n
        self.contaminated_threshold, self.info_threshold = contaminated_threshold, info_threshold
        self.names = list(benchmarks)
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
                words = normalize(text)
                longs = ngram_hashes(words, long_n)
                long_hash.append(longs)
                long_item.append(np.full(len(longs), index, dtype=np.int64))
                short = np.unique(ngram_hashes(words, short_n))
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


def run(cfg: DecontaminateConfig) -> dict:
    """Check every input document, write the kept ones (or keep-lists) and the report; returns the report."""
    allowlist = list(cfg.allowlist)
    if cfg.allowlist_path:
        allowlist += [ln.strip() for ln in Path(cfg.allowlist_path).read_text().splitlines() if ln.strip()]
    checker = Decontaminator(load_benchmarks(cfg.benchmarks), allowlist, cfg.long_n, cfg.short_n,
                             cfg.contaminated_threshold, cfg.info_threshold)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_bench = {name: {**checker.stats[name], "contaminated": 0, "partial": 0} for name in checker.names}
    totals = {c: 0 for c in CLASSES} | {"documents": 0, "kept": 0, "skipped": 0}
    report = {"thresholds": {"long_n": cfg.long_n, "short_n": cfg.short_n,
                             "contaminated_threshold": cfg.contaminated_threshold,
                             "info_threshold": cfg.info_threshold, "drop_partial": cfg.drop_partial},
              "allowlist_phrases": len(allowlist), "inputs": {}, "benchmarks": per_bench, "totals": totals,
              "examples": []}
    drop = {"contaminated", "partial"} if cfg.drop_partial else {"contaminated"}
    inputs = list_inputs(cfg.inputs, JSONL_SUFFIXES)
    targets = {}
    for path in inputs:
        name = path.name.removesuffix(".gz").removesuffix(".zst")
        target = out_dir / (name if cfg.output == "clean" else f"{name}.keep.txt")
        if target in targets.values():
            raise ValueError(f"inputs {path} and {[p for p, t in targets.items() if t == target][0]} would both "
                             f"write {target}; rename one")
        targets[path] = target
    for input_path, target in targets.items():
        counts = {c: 0 for c in CLASSES} | {"documents": 0, "kept": 0, "skipped": 0}
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            doc = -1
            for line_no, line, record in read_jsonl(input_path):
                text = None if isinstance(record, Exception) else record_text(record, cfg.text_fields)
                if text is None:
                    problem = (f"not valid JSON / UTF-8 ({record})" if isinstance(record, Exception)
                               else f"none of the fields {cfg.text_fields} is present")
                    if cfg.on_error == "raise":
                        raise ValueError(f"{input_path}: line {line_no}: {problem} "
                                         f"(set on_error: skip to count and skip such lines)")
                    counts["skipped"] += 1
                    continue
                doc += 1
                verdict = checker.check(text)
                counts["documents"] += 1
                counts[verdict.cls] += 1
                for bench, cls in verdict.per_benchmark.items():
                    if cls != "clean":
                        per_bench[bench][cls] += 1
                if verdict.cls != "clean" and len(report["examples"]) < cfg.max_examples:
                    report["examples"].append({"input": str(input_path), "doc": doc, "line": line_no,
                                               "class": verdict.cls, "benchmark": verdict.benchmark,
                                               "item": verdict.item, "reason": verdict.reason,
                                               "ratio": round(verdict.ratio, 4), "ngram": verdict.ngram})
                if verdict.cls in drop:
                    continue
                counts["kept"] += 1
                out.write(line + b"\n" if cfg.output == "clean" else f"{doc}\n".encode())
        report["inputs"][str(input_path)] = {**counts, "output": str(target)}
        for k, v in counts.items():
            totals[k] += v
    atomic_write(out_dir / "decontamination_report.json", json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m data.decontaminate <config.yaml> [key=value ...]\n\n" + __doc__)
        return 0 if argv else 2
    cfg = load_typed(argv[0], argv[1:], schema=DecontaminateConfig)
    report = run(cfg)
    t = report["totals"]
    print(f"{t['documents']} documents: {t['clean']} clean, {t['partial']} partial, {t['contaminated']} "
          f"contaminated; kept {t['kept']}; skipped {t['skipped']} malformed lines")
    for name, b in report["benchmarks"].items():
        print(f"  {name}: {b['items']} items, {b['contaminated']} contaminated docs, {b['partial']} partial docs")
    print(f"report: {Path(cfg.output_dir) / 'decontamination_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
