"""Read raw documents from the formats people have: .jsonl, .jsonl.gz, .jsonl.zst, .parquet, folders of text files.

`iter_records` yields a `Record` per input record, in a fixed order (files sorted, then line/row order): its text
(kind "text") or its `messages` list (kind "chat"), or the `SourceError` that makes it unusable. `iter_documents`
applies the on_error policy: "raise" stops at the first bad record, "skip" counts it per reason and goes on.
Every error names the file and the line (jsonl), row or row group (parquet) or file (text files) and what was
expected. A file reached twice through `list_inputs` is refused: its documents would count twice.
"""
from __future__ import annotations

import codecs
import errno
import gzip
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import zstandard

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
RECORD_SUFFIXES = JSONL_SUFFIXES + (".parquet",)
READ_CHUNK_BYTES = 1 << 22
PARQUET_BATCH_ROWS = 1024
CHAT_ROLES = ("system", "user", "assistant")
# Reasons a record is unusable; the keys of a manifest's "skipped" counts.
REASONS = ("malformed_json", "missing_field", "bad_messages", "invalid_utf8", "empty_file", "empty_document",
           "truncated_stream", "corrupt_file")


class SourceError(ValueError):
    """An input record or file that cannot be used; `reason` is one of REASONS."""

    def __init__(self, location: str, reason: str, message: str):
        super().__init__(f"{location}: {message}")
        self.location, self.reason, self.message = location, reason, message


@dataclass
class Record:
    file_index: int  # position of the file in list_inputs order
    pos: int  # 1-based line (jsonl), 0-based row (parquet), 0 (a whole text file)
    location: str  # "file: line N" for messages
    payload: str | list | bytes | None  # text, or the messages list of a chat record; None when error is set
    error: SourceError | None = None
    raw: bool = False  # payload is the jsonl line's bytes, still to be parsed (parse_jsonl_line)


def _unusable(path: Path) -> FileNotFoundError:
    """Why `path` is neither a file nor a folder, in words: missing, a dangling or looping link, unreadable."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return FileNotFoundError(f"{path}: symbolic link loop ({e.strerror}): the links never reach a file; "
                                     f"point it at a real file or folder")
        if path.is_symlink():
            return FileNotFoundError(f"{path}: symbolic link to {os.readlink(path)!r}, which does not exist")
        if e.errno == errno.ENOENT:
            return FileNotFoundError(f"{path}: input not found")
        return FileNotFoundError(f"{path}: cannot be read ({e.strerror})")
    return FileNotFoundError(f"{path}: neither a regular file nor a folder")


def list_inputs(paths: Sequence[str], suffixes: Sequence[str] = (".txt",)) -> list[Path]:
    """Files to read, in a fixed order: given files as they are, folders searched recursively for `suffixes`.

    A file reached twice (listed twice, through two links, or inside a listed folder) is an error: its documents
    would be counted twice."""
    files: list[Path] = []
    first_seen: dict[tuple[int, int], tuple[Path, int]] = {}  # (device, inode) -> (file as reached, index in paths)
    for i, p in enumerate(paths):
        path = Path(p)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = []
            for f in sorted(path.rglob("*")):
                if not f.name.endswith(tuple(suffixes)):
                    continue
                if f.is_file():
                    found.append(f)
                elif f.is_symlink() and not f.exists():  # a dangling link would silently drop its file
                    raise _unusable(f)
            if not found:
                raise FileNotFoundError(f"{path}: folder holds no file ending in {list(suffixes)}")
        else:
            raise _unusable(path)
        for f in found:
            st = f.stat()  # the inode, so links (symbolic or hard) to one file are caught too
            real = (st.st_dev, st.st_ino)
            if real in first_seen:
                other, j = first_seen[real]
                what = (f"{str(p)!r} is listed twice" if str(p) == str(paths[j]) else
                        f"{f} (from {str(p)!r}) is the same file as {other} (from {str(paths[j])!r})")
                raise ValueError(f"{what}: each file may be read once, or its documents would count twice")
            first_seen[real] = (f, i)
        files.extend(found)
    return files


def _decompressed_chunks(path: Path) -> Iterator[bytes]:
    """Raw bytes of the file, decompressed; raises SourceError(truncated_stream|corrupt_file) at a bad end."""
    name = path.name
    if name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                # read1, not read: read(n) discards the bytes it decompressed when the stream ends early, so a
                # truncated file would lose every line before the damage; read1 hands them out as they come.
                while chunk := f.read1(READ_CHUNK_BYTES):
                    yield chunk
        except EOFError:
            raise SourceError(f"{path}", "truncated_stream", "gzip stream ends before its end marker "
                              "(the file is truncated)") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise SourceError(f"{path}", "corrupt_file", f"not a valid gzip stream ({e})") from None
    elif name.endswith(".zst"):
        with open(path, "rb") as f:
            dobj = zstandard.ZstdDecompressor().decompressobj()
            pending = False  # compressed bytes fed to an unfinished frame
            try:
                while raw := f.read(READ_CHUNK_BYTES):
                    while raw:
                        out = dobj.decompress(raw)
                        pending = not dobj.eof
                        raw = dobj.unused_data if dobj.eof else b""
                        if dobj.eof:  # a file may hold several frames back to back
                            dobj = zstandard.ZstdDecompressor().decompressobj()
                        if out:
                            yield out
            except zstandard.ZstdError as e:
                raise SourceError(f"{path}", "corrupt_file", f"not a valid zstd stream ({e})") from None
            if pending:
                raise SourceError(f"{path}", "truncated_stream", "zstd stream ends inside a frame "
                                  "(the file is truncated)")
    else:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                yield chunk


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline); a partial last line of a truncated stream is dropped."""
    n, pending = 0, []  # pending: pieces of a line not yet ended (a long line spans many chunks)
    try:
        for chunk in _decompressed_chunks(path):
            if b"\n" not in chunk:
                pending.append(chunk)
                continue
            lines = b"".join(pending + [chunk]).split(b"\n")
            pending = [lines.pop()]
            for line in lines:
                n += 1
                if n == 1 and line.startswith(codecs.BOM_UTF8):  # editors on Windows write one
                    line = line[len(codecs.BOM_UTF8):]
                yield n, line
    except SourceError as e:
        raise SourceError(f"{path}: line {n + 1}", e.reason, f"{e.message}; "
                          f"{n} complete lines were read before it") from None
    rest = b"".join(pending)
    if rest:
        yield n + 1, rest[len(codecs.BOM_UTF8):] if n == 0 and rest.startswith(codecs.BOM_UTF8) else rest


def _check_text(text, field: str, location: str) -> str:
    if not isinstance(text, str):
        raise SourceError(location, "missing_field", f"key '{field}' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise SourceError(location, "empty_document", f"key '{field}' is an empty document")
    return text


def _check_messages(messages, field: str, location: str) -> list:
    if not isinstance(messages, list):
        raise SourceError(location, "bad_messages", f"key '{field}' must be a list of {{role, content}} objects, "
                          f"got {type(messages).__name__}")
    if not messages:
        raise SourceError(location, "empty_document", f"key '{field}' is an empty conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
            raise SourceError(location, "bad_messages", f"{field}[{i}] must be an object with 'role' in "
                              f"{list(CHAT_ROLES)} and a string 'content', got {str(m)[:80]}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SourceError(location, "empty_document", f"key '{field}' has no non-empty assistant message")
    return messages


def _payload(obj, kind: str, field: str, location: str):
    if not isinstance(obj, dict):
        raise SourceError(location, "missing_field", f"expected a JSON object with key '{field}', "
                          f"got {type(obj).__name__}")
    if field not in obj:
        raise SourceError(location, "missing_field", f"no key '{field}' (keys present: {sorted(obj)[:10]})")
    if obj[field] is None:
        expected = "a list of {role, content} objects" if kind == "chat" else "a string"
        raise SourceError(location, "missing_field", f"key '{field}' is null; expected {expected}")
    if kind == "chat":
        return _check_messages(obj[field], field, location)
    return _check_text(obj[field], field, location)


def parse_jsonl_line(line: bytes, kind: str, field: str, location: str):
    """The payload of one jsonl line (text, or a chat's messages), or SourceError naming what is wrong with it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(location, "invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(location, "malformed_json", f"not valid JSON ({e.msg} at column {e.colno}); "
                          f"expected one JSON object per line") from None
    payload = _payload(obj, kind, field, location)
    if b"\\u" in line and kind == "text":  # JSON escapes can smuggle in lone surrogates
        try:
            payload.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SourceError(location, "invalid_utf8", f"key '{field}' holds an unpaired surrogate "
                              f"escape at character {e.start}") from None
    return payload


def _jsonl_records(path: Path, fi: int, kind: str, field: str, start_pos: int, raw: bool = False) -> Iterator[Record]:
    empty = True
    try:
        for n, line in iter_lines(path):
            if n <= start_pos:
                empty = False
                continue
            if not line.strip():
                continue  # blank lines separate nothing; they are not documents
            empty = False
            location = f"{path}: line {n}"
            if raw:  # parsed later, by whoever consumes it (data/prepare_pool.py: the tokenizer workers)
                yield Record(fi, n, location, line, raw=True)
                continue
            try:
                yield Record(fi, n, location, parse_jsonl_line(line, kind, field, location))
            except SourceError as e:
                yield Record(fi, n, location, None, e)
    except SourceError as e:  # the stream itself ended badly
        yield Record(fi, 1 << 62, e.location, None, e)
        return
    if empty:
        yield Record(fi, 0, f"{path}", None, SourceError(f"{path}", "empty_file", "file has no "
                                                         "lines; expected one JSON object per line"))


def _parquet_records(path: Path, fi: int, kind: str, field: str, start_pos: int) -> Iterator[Record]:
    import pyarrow as pa  # only parquet users pay for the import
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)  # checks the pages that carry a CRC
    except Exception as e:  # pyarrow raises several types for a file that is not parquet or is cut short
        yield Record(fi, 0, f"{path}", None, SourceError(f"{path}", "corrupt_file", f"not a readable parquet file "
                                                         f"({str(e).splitlines()[0]})"))
        return
    if field not in pf.schema_arrow.names:
        err = SourceError(f"{path}", "missing_field", f"no column '{field}' (columns: {pf.schema_arrow.names[:10]})")
        yield Record(fi, 0, f"{path}", None, err)
        return
    if pf.metadata.num_rows == 0:
        yield Record(fi, 0, f"{path}", None, SourceError(f"{path}", "empty_file", "parquet file has no rows"))
        return
    row = 0
    for group in range(pf.metadata.num_row_groups):
        first, group_rows = row, pf.metadata.row_group(group).num_rows
        if first + group_rows <= start_pos:  # resuming: this group was consumed (or counted as lost) before
            row += group_rows
            continue
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[field]):
                for value in _column_values(batch.column(0)):
                    if row >= start_pos:
                        yield _parquet_record(value, fi, row, f"{path}: row {row}", kind, field)
                    row += 1
        except MemoryError:
            raise
        except (OSError, pa.ArrowException) as e:  # the footer was fine, a page of this group is not
            where = f"{path}: row group {group} (rows {first}..{first + group_rows - 1})"
            detail = " ".join(str(e).split())[:300]
            err = SourceError(where, "corrupt_file", f"rows {row}..{first + group_rows - 1} cannot be read: a data "
                              f"page is damaged (pyarrow: {detail}); {row - first} rows of the group came before it")
            yield Record(fi, row, where, None, err)
            row = first + group_rows  # the next row group is read on its own


def _column_values(column) -> list:
    """Python values of a batch column; a value that is not valid UTF-8 comes back as its UnicodeDecodeError."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # pyarrow does not check UTF-8 on read: find the bad rows one by one
        values = []
        for k in range(len(column)):
            try:
                values.append(column[k].as_py())
            except UnicodeDecodeError as e:
                values.append(e)
        return values


def _parquet_record(value, fi: int, row: int, location: str, kind: str, field: str) -> Record:
    try:
        if isinstance(value, UnicodeDecodeError):
            raise SourceError(location, "invalid_utf8", f"column '{field}' holds invalid UTF-8 (byte {value.start} "
                              f"of a string)")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(location, "invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
        return Record(fi, row, location, _payload({field: value}, kind, field, location))
    except SourceError as e:
        return Record(fi, row, location, None, e)


def _text_file_record(path: Path, fi: int) -> Record:
    data = path.read_bytes()
    location = f"{path}"
    try:
        if not data:
            raise SourceError(location, "empty_file", "file is empty; expected a text document")
        try:
            text = data.decode("utf-8-sig")  # a leading byte-order mark is not part of the text
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise SourceError(f"{path}: line {line}", "invalid_utf8", f"invalid UTF-8 at byte {e.start} of the "
                              f"file") from None
        return Record(fi, 0, location, _check_text(text, "text", location))
    except SourceError as e:
        return Record(fi, 0, location, None, e)


def iter_records(files: Sequence[Path], kind: str = "text", text_field: str = "text",
                 start: tuple[int, int] | None = None, raw_jsonl: bool = False) -> Iterator[Record]:
    """Every record of `files` in order, errors included; `start` = (file_index, pos) of the last record already
    consumed: reading continues after it. raw_jsonl: jsonl lines come unparsed (Record.raw; the caller parses them
    with parse_jsonl_line, e.g. in parallel)."""
    if kind not in ("text", "chat"):
        raise ValueError(f"kind must be 'text' or 'chat', got {kind!r}")
    start_file, start_pos = start if start is not None else (0, -1)
    for fi, path in enumerate(files):
        if fi < start_file:
            continue
        after = start_pos if fi == start_file else -1
        name = path.name
        if name.endswith(JSONL_SUFFIXES):
            yield from _jsonl_records(path, fi, kind, text_field, after, raw_jsonl)
        elif name.endswith(".parquet"):
            yield from _parquet_records(path, fi, kind, text_field, after + 1)
        elif kind == "chat":
            raise ValueError(f"{path}: chat sources must be .jsonl(.gz/.zst) or .parquet with a '{text_field}' list")
        elif after < 0:
            yield _text_file_record(path, fi)


def iter_documents(files: Sequence[Path], kind: str = "text", text_field: str = "text", on_error: str = "raise",
                   skipped: Counter | None = None) -> Iterator[Record]:
    """Usable records only: a bad one raises its SourceError (on_error="raise") or is counted in `skipped`."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    for rec in iter_records(files, kind, text_field):
        if rec.error is None:
            yield rec
        elif on_error == "raise":
            raise rec.error
        elif skipped is not None:
            skipped[rec.error.reason] += 1
