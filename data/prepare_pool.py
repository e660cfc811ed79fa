"""Tokenizer worker processes for `data.prepare`: one node's cores encode in parallel, the main process reads and writes.

A thread pool cannot use a node: tiktoken releases the GIL only inside its BPE merge loop, so the Python around it
(JSON decoding, list building, the chat template) serialises the threads. Here each worker is a process with its own
tokenizer (built from the same BPE file, its fingerprint checked against the main process's), fed chunks of records
(jsonl lines still unparsed, so JSON decoding runs in parallel too) and returning their ids as one flat uint32 buffer
and the lengths, which is cheap to send back. Chunks are collected in submission order, so the shards are
byte-identical to an in-process run.

Workers are forked from a fork server (never from the main process, whose threads, such as tqdm's monitor, must not
be copied mid-lock) that imported this module and built the bundled tokenizer once (data/prepare_preload.py); it is
started as a pool is made, while the first chunks are read. Worker processes start only when a source has more than
one chunk and num_workers > 1: a small source (a test, a smoke run) is encoded in process. Called from a script rather
than `python -m data.prepare`, the script needs the usual `if __name__ == "__main__":` guard (multiprocessing workers
import the main module). A worker that dies (killed for memory) raises BrokenProcessPool, the writer is aborted and
the next run resumes from the last complete shard.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import time
from array import array
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

import numpy as np

from data.sources import SourceError, parse_jsonl_line

ERROR = -1  # a length for a record that carries a reader error (no ids)

_worker_tok = None


def _init_worker(bpe_path: str | None, fingerprint: str) -> None:
    global _worker_tok
    from data.tokenizer import Phi4Tokenizer

    tok = None
    if bpe_path is None:  # the bundled BPE: built once in the fork server (data/prepare_preload.py), inherited
        import sys

        preload = sys.modules.get("data.prepare_preload")
        tok = preload.BUNDLED if preload is not None else None
    tok = tok or Phi4Tokenizer(bpe_path)
    if tok.fingerprint != fingerprint:
        raise RuntimeError(f"tokenizer worker: BPE {bpe_path or 'bundled cl100k_base'} gives fingerprint "
                           f"{tok.fingerprint}, the main process has {fingerprint}")
    _worker_tok = tok


def encode_payloads(tok, kind: str, payloads: list, field: str = "") -> dict:
    """{"ids": every payload's ids + eod as one uint32 buffer, "lengths" (ERROR for a payload without ids),
    "errors": [(i, reason, message)] for raw jsonl lines (payload (line bytes, location)) that do not parse,
    "fatal": (i, message) for the first payload the tokenizer rejects, else None}."""
    flat = array("I")
    lengths = np.empty(len(payloads), dtype=np.int64)
    errors, eod = [], tok.eod_id
    for i, payload in enumerate(payloads):
        if isinstance(payload, tuple):  # a raw jsonl line: parsed here, in parallel, by the rules of data/sources.py
            try:
                payload = parse_jsonl_line(payload[0], kind, field, payload[1])
            except SourceError as e:
                errors.append((i, e.reason, e.message))
                payload = None
        if payload is None:
            lengths[i] = ERROR
            continue
        try:
            ids = tok.encode(payload) if kind == "text" else tok.apply_chat_template(payload)
        except Exception as e:  # the reader validated the record, so this is unexpected; the caller names where
            return {"fatal": (i, f"{type(e).__name__}: {e}")}
        n = len(flat)
        flat.extend(ids)  # array('I') converts a list of ints ~3x faster than np.array
        flat.append(eod)
        lengths[i] = len(flat) - n
    return {"ids": flat.tobytes(), "lengths": lengths, "errors": errors, "fatal": None}


def _encode_in_worker(kind: str, field: str, payloads: list):
    c0 = time.process_time()
    result = encode_payloads(_worker_tok, kind, payloads, field)
    return result, time.process_time() - c0  # workers are the forkserver's children: their CPU is counted here


def split_ids(result: dict) -> dict:
    """encode_payloads' result with "arrays": one array per payload (None where it has no ids), views of one
    buffer."""
    if result["fatal"]:
        return result
    flat = np.frombuffer(result["ids"], dtype=np.uint32)
    out, offset = [], 0
    for n in result["lengths"].tolist():
        if n == ERROR:
            out.append(None)
        else:
            out.append(flat[offset:offset + n])
            offset += n
    return {**result, "arrays": out}


class TokenizePool:
    """`encode(chunks, payload_of)` yields (chunk, split_ids' result) in order; `workers` processes at most."""

    def __init__(self, tok, kind: str, workers: int, inflight_per_worker: int = 3, field: str = ""):
        from data.tokenizer import default_bpe_path

        self.tok, self.kind, self.field, self.workers = tok, kind, field, max(1, workers)
        self.inflight = inflight_per_worker * self.workers
        default = tok.bpe_path.resolve() == default_bpe_path().resolve()
        self._initargs = (None if default else str(tok.bpe_path), tok.fingerprint)
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 1:  # the fork server starts (imports, builds the tokenizer) while the first chunks are read
            _context()
            multiprocessing.forkserver.ensure_running()
        self.worker_cpu_s = 0.0  # CPU seconds the workers spent encoding (for the benchmark's CPU ratio)

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=_context(), initializer=_init_worker,
                                   initargs=self._initargs)

    def _submit(self, payloads: list) -> Future:
        if self._pool is None:
            self._pool = self._start()
        return self._pool.submit(_encode_in_worker, self.kind, self.field, payloads)

    def encode(self, chunks: Iterable[list], payload_of) -> Iterator[tuple[list, dict]]:
        """(chunk, split_ids result) per chunk, in order. chunks: lists of records; payload_of(record) -> its
        payload (text, messages, or (jsonl line bytes, location) to parse), or None for a record not to encode."""
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            return
        second = next(it, None)
        if second is None or self.workers == 1:  # one chunk, or one worker: encoded here, no processes started
            for chunk in ([first] if second is None else _chain(first, second, it)):
                yield chunk, split_ids(encode_payloads(self.tok, self.kind, [payload_of(r) for r in chunk],
                                                       self.field))
            return
        pending: deque = deque()
        try:
            for chunk in _chain(first, second, it):
                pending.append((chunk, self._submit([payload_of(r) for r in chunk])))
                if len(pending) >= self.inflight:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            for _, fut in pending:
                fut.cancel()

    def _collect(self, chunk: list, fut: Future):
        try:
            result, cpu_s = fut.result()
        except BrokenProcessPool as e:
            raise BrokenProcessPool(
                f"a tokenizer worker process died ({e}). Killed for memory? Or, when data.prepare is called from a "
                "script, the script lacks `if __name__ == '__main__':` (workers re-import the main module); "
                "num_workers=1 encodes in the calling process") from e
        self.worker_cpu_s += cpu_s
        return chunk, split_ids(result)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "TokenizePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data.prepare_pool", "data.prepare_preload"])  # imported once, in the fork server
    return ctx


def _chain(first: list, second: list, rest: Iterator[list]) -> Iterator[list]:
    yield first
    yield second
    yield from rest
