"""Benchmark decontamination over files, the hybrid 13-gram / 7-gram check (Phi-4 report App. B.1; the check itself:
data/contamination.py): `python -m data.decontaminate <cfg>`.

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
of a one-process run, byte for byte (slurm/submit_data_array.sh queues both).
"""
from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data.benchmarks import SOURCES as BENCHMARK_SOURCES
from data.arrays import split_array_flags
from data.benchmarks import load_benchmark
from data.configfile import load_typed
from data.fileio import atomic_path, atomic_write
from data.contamination import Decontaminator, Verdict, record_text
from data.sources import JSONL_SUFFIXES, iter_lines, list_inputs

CLASSES = ("clean", "partial", "contaminated")
_BATCH_CHARS = 1 << 22  # documents are checked in batches of about this much text (check_batch)


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
