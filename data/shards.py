"""Token shards on disk: flat uint32 token files, uint64 document offsets, and a manifest written last.

One directory per source:
- `shard_NNNNN.bin`: little-endian uint32 tokens; every document ends with eod 100257 (counted in its length).
- `shard_NNNNN.idx`: little-endian uint64 token offsets of the documents within the shard, num_docs + 1 of them.
- `manifest.json`: names the shards with their sizes and sha256; a directory without it is incomplete.

While a source is being written, `progress.json` lists the shards completed so far (and where in the input the
writer stood after each) so that an interrupted run resumes from them; it is removed once the manifest exists.
Shards are cut at document boundaries as soon as a shard holds >= shard_tokens tokens, so the same input always
gives the same shards.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from data.config import PROVENANCES
from data.fileio import atomic_path, atomic_write, fsync_dir, sha256_file

FORMAT = 1
DTYPE = "uint32"
TOKEN_BYTES = 4
OFFSET_BYTES = 8
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOCK = ".writer.lock"
DEFAULT_SHARD_TOKENS = 1 << 28  # 256 Mi tokens = 1 GiB per token file
HASH_CHUNK_BYTES = 1 << 24


class ShardError(RuntimeError):
    """A shard directory that cannot be used as it is; the message names the file."""


def shard_names(i: int) -> tuple[str, str]:
    return f"shard_{i:05d}.bin", f"shard_{i:05d}.idx"


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_shard_files(directory: Path, entry: dict, verify: str) -> None:
    """Raise ShardError unless the shard's files exist with the manifest's sizes (and checksums)."""
    for kind, unit, count in (("tokens", TOKEN_BYTES, entry["num_tokens"]),
                              ("index", OFFSET_BYTES, entry["num_docs"] + 1)):
        path = directory / entry[kind]
        if not path.is_file():
            raise ShardError(f"{path}: missing shard file listed in {directory / MANIFEST}")
        size = path.stat().st_size
        if size != unit * count:
            raise ShardError(f"{path}: size {size} bytes disagrees with the manifest ({unit * count} bytes expected); "
                             f"the shard is truncated or corrupt: prepare this source again")
        if verify == "checksum":
            digest = sha256_file(path, HASH_CHUNK_BYTES)
            if digest != entry[f"{kind}_sha256"]:
                raise ShardError(f"{path}: sha256 {digest} disagrees with the manifest ({entry[f'{kind}_sha256']}); "
                                 f"the shard is corrupt: prepare this source again")


def remove_temp_files(directory: Path) -> list[str]:
    """Delete the temporary files a killed writer left behind (never complete; never read)."""
    removed = []
    for p in directory.glob(".*.tmp"):
        p.unlink()
        removed.append(p.name)
    return removed


class ShardWriter:
    """Append documents (token lists ending with eod) to shards; `close()` writes the manifest and returns it.

    With `resume=True` the shards listed in an existing progress.json (with the same `settings`) are verified by
    checksum and kept; `resume_cursor` is then the `cursor` given with the last document of the last kept shard
    (None when starting fresh), and the caller continues its input from there. Every other shard file is deleted.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, provenance: str, tokenizer_fingerprint: str,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, inputs: list | None = None,
                 settings: dict | None = None, resume: bool = False):
        if provenance not in PROVENANCES:
            raise ValueError(f"source '{name}': provenance must be one of {PROVENANCES}, got {provenance!r}")
        if shard_tokens < 1:
            raise ValueError(f"source '{name}': shard_tokens must be >= 1, got {shard_tokens}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name, self.provenance = name, provenance
        self.tokenizer = tokenizer_fingerprint
        self.shard_tokens = shard_tokens
        self.inputs = list(inputs or [])
        self.settings = self.full_settings(tokenizer_fingerprint, shard_tokens, self.inputs, settings)
        self.shards: list[dict] = []
        self.resume_cursor: Any = None
        self._stack: ExitStack | None = None  # holds the atomic_path of the open shard
        self._file = None
        self._hash = None
        self._offsets: list[int] = [0]
        self._cursor: Any = None
        self._closed = False
        # One writer per directory: a second prepare on the same source would delete this one's temporary files.
        self._lock = open(self.dir / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ShardError(f"{self.dir}: another process is writing this source (it holds {LOCK})") from None
        remove_temp_files(self.dir)
        if (self.dir / MANIFEST).exists():
            (self.dir / MANIFEST).unlink()  # we are rewriting this source; a stale manifest must not survive
        if resume:
            self._load_progress()
        self._remove_unlisted_shards()

    @staticmethod
    def full_settings(tokenizer_fingerprint: str, shard_tokens: int, inputs: list, settings: dict | None) -> dict:
        """Everything that determines the shards' content, as stored in progress.json and the manifest ("settings");
        a resume with different settings starts over."""
        full = {"tokenizer": tokenizer_fingerprint, "shard_tokens": shard_tokens, "inputs": list(inputs),
                **(settings or {})}
        return json.loads(json.dumps(full))  # JSON-normal form (tuples -> lists) so that == compares what is stored

    def _load_progress(self) -> None:
        path = self.dir / PROGRESS
        if not path.exists():
            return
        progress = read_json(path)
        if progress.get("settings") != self.settings:
            return  # different inputs or settings: the old shards are not ours to continue
        kept = []
        for entry in progress.get("shards", []):
            try:
                check_shard_files(self.dir, entry, verify="checksum")
            except ShardError:
                break  # this one and everything after it are rewritten
            kept.append(entry)
        self.shards = kept
        self.resume_cursor = kept[-1]["cursor"] if kept else None

    def _remove_unlisted_shards(self) -> None:
        keep = {e[k] for e in self.shards for k in ("tokens", "index")}
        for p in list(self.dir.glob("shard_*.bin")) + list(self.dir.glob("shard_*.idx")):
            if p.name not in keep:
                p.unlink()
        self._write_progress()

    def _write_progress(self) -> None:
        atomic_write(self.dir / PROGRESS, json.dumps({"settings": self.settings, "shards": self.shards}, indent=1))

    @property
    def num_docs(self) -> int:
        """Documents added so far (complete shards and the open one)."""
        return sum(s["num_docs"] for s in self.shards) + len(self._offsets) - 1

    def add(self, doc_tokens, cursor: Any = None) -> None:
        """Append one document (ids ending with eod). `cursor`: JSON-able input position after this document."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for '{self.name}' is closed")
        arr = np.asarray(doc_tokens, dtype="<u4")
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"source '{self.name}': a document must be a non-empty 1-D token list ending with eod")
        if self._file is None:
            self._open_shard()
        data = arr.tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._offsets.append(self._offsets[-1] + arr.size)
        self._cursor = cursor
        if self._offsets[-1] >= self.shard_tokens:
            self._finish_shard()

    def _open_shard(self) -> None:
        bin_name, _ = shard_names(len(self.shards))
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.dir / bin_name))
        self._file = self._stack.enter_context(open(tmp, "wb", buffering=1 << 22))
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def _finish_shard(self) -> None:
        bin_name, idx_name = shard_names(len(self.shards))
        self._stack.close()  # flush, fsync, rename the token file
        index = np.asarray(self._offsets, dtype="<u8").tobytes()
        atomic_write(self.dir / idx_name, index)
        self.shards.append({"tokens": bin_name, "index": idx_name, "num_docs": len(self._offsets) - 1,
                            "num_tokens": self._offsets[-1], "tokens_sha256": self._hash.hexdigest(),
                            "index_sha256": hashlib.sha256(index).hexdigest(),
                            "cursor": json.loads(json.dumps(self._cursor))})  # a snapshot: callers may mutate theirs
        self._write_progress()  # the shard counts as complete only from here on
        self._stack = self._file = self._hash = None
        self._offsets = [0]

    def close(self, skipped: dict | None = None) -> dict:
        """Complete the open shard, write manifest.json atomically, return it."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for '{self.name}' is already closed")
        if self._file is not None:
            self._finish_shard()
        self._closed = True
        manifest = {"format": FORMAT, "name": self.name, "provenance": self.provenance, "tokenizer": self.tokenizer,
                    "dtype": DTYPE, "num_docs": sum(s["num_docs"] for s in self.shards),
                    "num_tokens": sum(s["num_tokens"] for s in self.shards),
                    "shards": [{k: v for k, v in s.items() if k != "cursor"} for s in self.shards],
                    "skipped": dict(skipped or {}), "inputs": self.inputs, "settings": self.settings}
        atomic_write(self.dir / MANIFEST, json.dumps(manifest, indent=1))
        (self.dir / PROGRESS).unlink(missing_ok=True)
        fsync_dir(self.dir)
        self._lock.close()  # releases the flock
        return manifest

    def abort(self) -> None:
        """Drop the open (incomplete) shard; completed shards and progress.json stay for a resume."""
        if self._stack is not None:
            # Exit as a failure: atomic_path deletes the temporary file instead of renaming it.
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
        self._stack = self._file = self._hash = None
        self._closed = True
        self._lock.close()


_REQUIRED = {"format": int, "name": str, "provenance": str, "tokenizer": str, "dtype": str, "num_docs": int,
             "num_tokens": int, "shards": list}
_REQUIRED_SHARD = {"tokens": str, "index": str, "num_docs": int, "num_tokens": int, "tokens_sha256": str,
                   "index_sha256": str}


class ShardedSource:
    """Read-only view of a prepared source: document lengths and documents, memory-mapped.

    verify="size" checks every shard's file sizes against the manifest at load (cheap); "checksum" also hashes them.
    `expect_tokenizer`: the tokenizer fingerprint the caller will train with; a different one is refused.
    """

    def __init__(self, directory: str | os.PathLike, verify: str = "size", expect_tokenizer: str | None = None):
        if verify not in ("size", "checksum"):
            raise ValueError(f"verify must be 'size' or 'checksum', got {verify!r}")
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise ShardError(f"{path}: missing; {self.dir} is not a completely prepared source "
                             f"(run `python -m data.prepare` on it)")
        m = read_json(path)
        for key, typ in _REQUIRED.items():
            if not isinstance(m.get(key), typ):
                raise ShardError(f"{path}: key '{key}' missing or not a {typ.__name__}")
        if m["format"] != FORMAT:
            raise ShardError(f"{path}: format {m['format']} is not supported (expected {FORMAT})")
        if m["dtype"] != DTYPE:
            raise ShardError(f"{path}: dtype {m['dtype']!r} is not supported (expected {DTYPE!r})")
        if m["provenance"] not in PROVENANCES:
            raise ShardError(f"{path}: provenance {m['provenance']!r} is not one of {PROVENANCES}")
        if expect_tokenizer is not None and m["tokenizer"] != expect_tokenizer:
            raise ShardError(f"{path}: prepared with tokenizer {m['tokenizer'][:16]}..., but this run uses "
                             f"{expect_tokenizer[:16]}...; prepare the source again with the run's tokenizer")
        for i, e in enumerate(m["shards"]):
            for key, typ in _REQUIRED_SHARD.items():
                if not isinstance(e.get(key), typ):
                    raise ShardError(f"{path}: shards[{i}].{key} missing or not a {typ.__name__}")
            check_shard_files(self.dir, e, verify)
        if sum(e["num_docs"] for e in m["shards"]) != m["num_docs"] or \
                sum(e["num_tokens"] for e in m["shards"]) != m["num_tokens"]:
            raise ShardError(f"{path}: num_docs/num_tokens disagree with the sum over its shards")
        self.manifest = m
        self.name: str = m["name"]
        self.provenance: str = m["provenance"]
        self.tokenizer: str = m["tokenizer"]
        self.num_docs: int = m["num_docs"]
        self.num_tokens: int = m["num_tokens"]
        self._shards = m["shards"]
        # first global document index of each shard, plus the total: (num_shards + 1,)
        self._doc_starts = np.cumsum([0] + [e["num_docs"] for e in self._shards], dtype=np.int64)
        self._tokens: list[np.ndarray | None] = [None] * len(self._shards)
        self._index: list[np.ndarray] = [self._load_index(e) for e in self._shards]  # memory-mapped <u8

    def _load_index(self, e: dict) -> np.ndarray:
        """The shard's offsets, memory-mapped (a large source's index need not fit in RAM), checked in chunks."""
        path = self.dir / e["index"]
        idx = np.memmap(path, dtype="<u8", mode="r")
        ok = int(idx[0]) == 0 and int(idx[-1]) == e["num_tokens"]
        step = 1 << 22
        for start in range(0, len(idx) - 1, step):
            part = idx[start: start + step + 1]  # overlapping by one offset, so every neighbour pair is compared
            ok = ok and bool(np.all(part[1:] > part[:-1]))
        if not ok:
            raise ShardError(f"{path}: offsets must start at 0, increase strictly and end at the shard's "
                             f"{e['num_tokens']} tokens")
        return idx

    def _shard_tokens(self, s: int) -> np.ndarray:
        if self._tokens[s] is None:
            self._tokens[s] = np.memmap(self.dir / self._shards[s]["tokens"], dtype="<u4", mode="r")
        return self._tokens[s]

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document (eod included), in global document order: (num_docs,) int64."""
        if not self._index:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(idx).astype(np.int64) for idx in self._index])

    def doc(self, i: int) -> np.ndarray:
        """Global document i's tokens (ending with eod), a read-only memory-mapped uint32 view."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for source '{self.name}' with {self.num_docs} documents")
        s = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        j = i - int(self._doc_starts[s])
        start, end = int(self._index[s][j]), int(self._index[s][j + 1])
        return self._shard_tokens(s)[start:end]

    def __len__(self) -> int:
        return self.num_docs

    def __getstate__(self):  # picklable for DataLoader workers: memmaps are reopened lazily
        state = self.__dict__.copy()
        state["_tokens"] = [None] * len(self._shards)
        state["_index"] = [None] * len(self._shards)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._index = [np.memmap(self.dir / e["index"], dtype="<u8", mode="r") for e in self._shards]
