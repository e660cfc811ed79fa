"""Tokenize raw sources into shards: `python -m data.prepare <config.yaml> [key=value ...]`.

Each source is read in a fixed order (data/sources.py), tokenized with the Phi-4 tokenizer by worker processes
(data/prepare_pool.py: one node's cores; the main process reads and writes), terminated with eod 100257 and written
to `<output_dir>/<name>/` (data/shards.py). An interrupted run resumes from its completed shards; a complete output is
only verified. `python -m data.prepare_bench` measures this path against raw tiktoken on the same text and cores.
`--shard I/N` and `--merge N` split the work over a Slurm array (prepare_shard, merge_shards): the merged output is
byte-identical to a one-process run.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


from data.arrays import split_array_flags
from data.config import PROVENANCES
from data.prepare_pool import TokenizePool
from data.configfile import load_typed
from data.shards import DEFAULT_SHARD_TOKENS, MANIFEST, ShardedSource, ShardError, ShardWriter, read_json
from data.sources import RECORD_SUFFIXES, Record, SourceError, iter_records, list_inputs

CHUNK_CHARS = 1 << 19  # characters of text per task handed to a tokenizer process
INFLIGHT_PER_WORKER = 3  # tasks queued per process: enough to keep them busy while the main process reads and writes
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PrepareError(RuntimeError):
    """A preparation that cannot go on; the message names the source, file or directory."""


@dataclass
class PrepareSource:
    name: str = ""  # output sub-directory and the source's name in manifests and mixtures
    provenance: str = "organic"  # synthetic | organic
    path: str = ""  # a file or folder; `paths` adds more
    paths: list[str] = field(default_factory=list)
    kind: str = "text"  # text: one document per record | chat: a messages list rendered with the chat template
    text_field: str = ""  # record key holding the text (kind text, default "text") or messages (chat, "messages")
    suffixes: list[str] = field(default_factory=lambda: [".txt"])  # files taken from folders, searched recursively
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # a shard is closed at the first document boundary past this many tokens
    on_error: str = "raise"  # raise: stop at the first bad record | skip: count it in the manifest's "skipped"

    def input_paths(self) -> list[str]:
        return ([self.path] if self.path else []) + list(self.paths)

    def field_name(self) -> str:
        return self.text_field or ("messages" if self.kind == "chat" else "text")


@dataclass
class PrepareConfig:
    output_dir: str = "data/prepared"
    sources: list[PrepareSource] = field(default_factory=list)
    num_workers: int = 0  # tokenizer processes (data/prepare_pool.py); 0 = every core this process may use
    tokenizer_path: str = ""  # a .tiktoken file; "" = the bundled cl100k_base (sha256-verified)
    overwrite: bool = False  # rebuild a complete source whose inputs or settings changed (else: an error)
    progress: bool = True  # tqdm bar with tokens/s on stderr

    def validate(self) -> None:
        if not self.sources:
            raise ValueError("sources: at least one source is required")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}; expected >= 0 (0 = all cores)")
        seen = set()
        for i, s in enumerate(self.sources):
            key = f"sources[{i}]"
            if not NAME_RE.match(s.name):
                raise ValueError(f"{key}.name={s.name!r}; expected letters, digits, '_', '.', '-' (a directory name)")
            if s.name in seen:
                raise ValueError(f"{key}.name={s.name!r} is used twice; source names must be unique")
            seen.add(s.name)
            for attr, choices in (("provenance", PROVENANCES), ("kind", ("text", "chat")),
                                  ("on_error", ("raise", "skip"))):
                if getattr(s, attr) not in choices:
                    raise ValueError(f"{key}.{attr}={getattr(s, attr)!r}; expected one of {list(choices)}")
            if not s.input_paths():
                raise ValueError(f"{key} ({s.name}): give `path` or `paths` (files or folders to read)")
            if s.shard_tokens < 1:
                raise ValueError(f"{key}.shard_tokens={s.shard_tokens}; expected >= 1")
            if not s.suffixes:
                raise ValueError(f"{key}.suffixes is empty; expected file name endings such as ['.txt']")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours Slurm/cgroup CPU binding
    except AttributeError:
        return os.cpu_count() or 1


def _input_descriptions(files: list[Path]) -> list[dict]:
    out = []
    for p in files:
        st = p.stat()
        out.append({"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _chunks(records: Iterable[Record], max_chars: int) -> Iterator[list[Record]]:
    chunk, chars = [], 0
    for rec in records:
        chunk.append(rec)
        if isinstance(rec.payload, (str, bytes)):
            chars += len(rec.payload)
        elif rec.payload is not None:
            chars += sum(len(m["content"]) for m in rec.payload)
        if chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys) or "none"


def source_inputs(src: PrepareSource, key: str = "") -> list[Path]:
    """A source's input files, checked before anything is tokenized; `key` ('sources[1]') names it in errors."""
    label = f"{key} ({src.name})" if key else f"source '{src.name}'"
    try:
        files = list_inputs(src.input_paths(), src.suffixes)
    except (FileNotFoundError, ValueError) as e:  # missing, a link loop, a file listed twice
        raise PrepareError(f"{label}: {e}") from None
    if src.kind == "chat":
        plain = [str(p) for p in files if not p.name.endswith(RECORD_SUFFIXES)]
        if plain:
            raise PrepareError(f"{label}: kind chat reads {list(RECORD_SUFFIXES)} files with a messages "
                               f"list per record; these are plain text files: {plain[:3]}")
    return files


def prepare_source(src: PrepareSource, output_dir: str | Path, tok, num_workers: int = 0, overwrite: bool = False,
                   progress: bool = True, log=print, files: list[Path] | None = None,
                   allow_empty: bool = False, stats: dict | None = None) -> dict:
    """Tokenize one source into `<output_dir>/<name>/`; returns its manifest. Resumes; a complete output is verified.

    files: the source's inputs as `source_inputs` listed them (listed here when None). allow_empty: a source with no
    usable document gets a manifest of 0 documents instead of an error (one input file of a --shard task). stats:
    gets worker_cpu_s, the CPU seconds of the tokenizer processes (for the benchmark)."""
    out_dir = Path(output_dir) / src.name
    files = source_inputs(src) if files is None else files
    inputs = _input_descriptions(files)
    field_name = src.field_name()
    extra = {"name": src.name, "provenance": src.provenance, "kind": src.kind, "text_field": field_name,
             "eod": tok.eod_id}
    settings = ShardWriter.full_settings(tok.fingerprint, src.shard_tokens, inputs, extra)
    if (out_dir / MANIFEST).exists():
        old = read_json(out_dir / MANIFEST)
        if old.get("settings") == settings:
            try:
                ShardedSource(out_dir, verify="checksum", expect_tokenizer=tok.fingerprint)
                log(f"{src.name}: complete and verified ({old['num_docs']} documents, {old['num_tokens']} tokens)")
                return old
            except ShardError as e:
                log(f"{src.name}: {e}; rebuilding")
        elif not overwrite:
            raise PrepareError(f"{out_dir}: already prepared from other inputs or settings (differs in: "
                               f"{_settings_diff(old.get('settings') or {}, settings)}); set overwrite=true to "
                               f"rebuild it, or choose another output_dir")
    writer = ShardWriter(out_dir, src.name, src.provenance, tok.fingerprint, shard_tokens=src.shard_tokens,
                         inputs=inputs, settings=extra, resume=True)
    cursor = writer.resume_cursor
    skipped = Counter(cursor["skipped"]) if cursor else Counter()
    start = (cursor["file"], cursor["pos"]) if cursor else None
    done_tokens = sum(s["num_tokens"] for s in writer.shards)
    if cursor:
        log(f"{src.name}: resuming after {len(writer.shards)} complete shards ({done_tokens} tokens)")
    workers = num_workers or available_cores()
    bar = _progress_bar(src.name, done_tokens, progress)
    try:
        with TokenizePool(tok, src.kind, workers, INFLIGHT_PER_WORKER, field_name) as pool:
            chunks = _chunks(iter_records(files, src.kind, field_name, start, raw_jsonl=True), CHUNK_CHARS)
            for chunk, result in pool.encode(chunks, _payload_of):
                _write_chunk(writer, src, chunk, result, skipped, bar)
        if stats is not None:
            stats["worker_cpu_s"] = pool.worker_cpu_s
    except BaseException:
        writer.abort()  # completed shards and progress.json stay for the next run; the open shard goes
        raise
    finally:
        if bar is not None:
            bar.close()
    if writer.num_docs == 0 and not allow_empty:
        writer.abort()
        raise PrepareError(f"source '{src.name}': no usable document in {src.input_paths()} "
                           f"(skipped: {dict(skipped) or 'none'})")
    manifest = writer.close(skipped=dict(sorted(skipped.items())))
    log(f"{src.name}: {manifest['num_docs']} documents, {manifest['num_tokens']} tokens, "
        f"{len(manifest['shards'])} shards" + (f", skipped {manifest['skipped']}" if skipped else ""))
    return manifest


def _payload_of(rec: Record):
    if rec.error is not None:
        return None
    return (rec.payload, rec.location) if rec.raw else rec.payload


def _write_chunk(writer: ShardWriter, src: PrepareSource, chunk: list[Record], result: dict, skipped: Counter,
                 bar) -> None:
    """Append a chunk's documents (prepare_pool.split_ids' result) in order; a record's reader error raises or is
    counted by on_error, as is a jsonl line the workers could not parse."""
    if result["fatal"]:  # (i, message): the tokenizer rejected record i
        i, message = result["fatal"]
        raise PrepareError(f"{chunk[i].location}: cannot tokenize this record: {message}")
    for i, reason, message in result["errors"]:
        chunk[i].error = SourceError(chunk[i].location, reason, message)
    tokens = 0
    for rec, arr in zip(chunk, result["arrays"]):
        if rec.error is not None:
            if src.on_error == "raise":
                raise PrepareError(f"source '{src.name}': {rec.error} (set on_error: skip to skip and count such "
                                   f"records)") from rec.error
            skipped[rec.error.reason] += 1
            continue
        writer.add(arr, cursor={"file": rec.file_index, "pos": rec.pos, "skipped": skipped})
        tokens += arr.size
    if bar is not None:
        bar.update(tokens)


def _progress_bar(name: str, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # On a terminal refresh often; in a log file (Slurm) print a line every half minute rather than thousands.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(desc=name, unit="tok", unit_scale=True, initial=initial, mininterval=interval, file=sys.stderr)


def prepare(cfg: PrepareConfig, log=print) -> dict[str, dict]:
    """Prepare every source of `cfg`; returns {name: manifest}."""
    from data.tokenizer import Phi4Tokenizer

    # Every source's inputs are listed first, so a missing or doubled file stops the run before any tokenizing.
    files = [source_inputs(s, f"sources[{i}]") for i, s in enumerate(cfg.sources)]
    tok = Phi4Tokenizer(cfg.tokenizer_path or None)
    return {s.name: prepare_source(s, cfg.output_dir, tok, cfg.num_workers, cfg.overwrite, cfg.progress, log, f)
            for s, f in zip(cfg.sources, files, strict=True)}


# ---- a Slurm array: one task per slice of the input files, then one merge ----------------------------------------

def _part_dir(cfg: PrepareConfig, src: PrepareSource, k: int) -> Path:
    return Path(cfg.output_dir) / ".parts" / src.name / f"{src.name}.{k:06d}"


def prepare_shard(cfg: PrepareConfig, shard: int, num_shards: int, log=print) -> None:
    """Array task `shard` of `num_shards`: every input file g (numbered over all sources in config order) with
    g % num_shards == shard, each tokenized into its own part `<output_dir>/.parts/<source>/<source>.<k>/` (its
    manifest is the part's completion marker: a rerun verifies finished parts and does the rest)."""
    from data.tokenizer import Phi4Tokenizer

    files = [source_inputs(s, f"sources[{i}]") for i, s in enumerate(cfg.sources)]
    tok = Phi4Tokenizer(cfg.tokenizer_path or None)
    g = 0
    for src, src_files in zip(cfg.sources, files):
        for k, path in enumerate(src_files):
            if g % num_shards == shard:
                part = PrepareSource(**{**src.__dict__, "name": _part_dir(cfg, src, k).name, "path": str(path),
                                        "paths": []})
                prepare_source(part, _part_dir(cfg, src, k).parent, tok, cfg.num_workers, True, cfg.progress, log,
                               [path], allow_empty=True)
            g += 1


def merge_shards(cfg: PrepareConfig, num_shards: int, log=print) -> dict[str, dict]:
    """Every source's parts replayed in input order into `<output_dir>/<source>/`: the same documents into the same
    ShardWriter, so the shards and manifest are byte for byte those of one process. A missing part is named."""
    from data.tokenizer import Phi4Tokenizer

    files = [source_inputs(s, f"sources[{i}]") for i, s in enumerate(cfg.sources)]
    missing = [str(_part_dir(cfg, s, k)) for s, fs in zip(cfg.sources, files) for k in range(len(fs))
               if not (_part_dir(cfg, s, k) / MANIFEST).is_file()]
    if missing:
        raise PrepareError(f"--merge {num_shards}: {len(missing)} input file(s) not prepared yet, e.g. {missing[:3]}; "
                           "rerun their --shard tasks")
    tok = Phi4Tokenizer(cfg.tokenizer_path or None)
    out = {}
    for src, src_files in zip(cfg.sources, files):
        extra = {"name": src.name, "provenance": src.provenance, "kind": src.kind, "text_field": src.field_name(),
                 "eod": tok.eod_id}
        writer = ShardWriter(Path(cfg.output_dir) / src.name, src.name, src.provenance, tok.fingerprint,
                             shard_tokens=src.shard_tokens, inputs=_input_descriptions(src_files), settings=extra)
        skipped: Counter = Counter()
        try:
            for k in range(len(src_files)):
                part = _part_dir(cfg, src, k)
                manifest = read_json(part / MANIFEST)
                skipped.update(manifest.get("skipped", {}))
                if manifest["num_docs"]:
                    docs = ShardedSource(part, verify="checksum", expect_tokenizer=tok.fingerprint)
                    for i in range(len(docs)):
                        writer.add(docs.doc(i))
        except BaseException:
            writer.abort()
            raise
        if writer.num_docs == 0:
            writer.abort()
            raise PrepareError(f"source '{src.name}': no usable document in {src.input_paths()} "
                               f"(skipped: {dict(skipped) or 'none'})")
        out[src.name] = writer.close(skipped=dict(sorted(skipped.items())))
        log(f"{src.name}: merged {len(src_files)} part(s): {out[src.name]['num_docs']} documents, "
            f"{out[src.name]['num_tokens']} tokens")
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__ + "\nusage: python -m data.prepare <config.yaml> [key=value ...] [--shard I/N | --merge N]\n"
              "benchmark: python -m data.prepare_bench <folder-or-jsonl> [workers=N] [mb=20] [repeats=3]")
        return 0 if args else 2
    try:
        if args[0] == "--bench":
            raise ValueError("the benchmark is its own command: python -m data.prepare_bench <folder-or-jsonl> "
                             "[workers=N] [mb=20] [repeats=3]")
        rest, shard, merge_n = split_array_flags(args[1:])
        cfg = load_typed(args[0], rest, schema=PrepareConfig)
        if shard:
            prepare_shard(cfg, *shard)
        elif merge_n:
            merge_shards(cfg, merge_n)
        else:
            prepare(cfg)
    except (PrepareError, SourceError, ShardError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
