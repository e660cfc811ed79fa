"""Requests through a backend with bounded concurrency, every answer appended to a per-shard log as it arrives.

The log is jsonl, one line per finished request: {"key", "request", "response"}. Each line is one write(2) on an
O_APPEND descriptor, so a `kill -9` loses only the requests in flight; the file is fsynced every `fsync_every_s` and at
close (a machine crash can lose the last second). On open, a torn last line (a crash mid-write) is cut off, and every
logged key is answered from the log: a rerun sends none of the finished requests again.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from data.synth.backend import Request, Response, request_key


class RequestLog:
    def __init__(self, path: str | os.PathLike, fsync_every_s: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.answers: dict[str, Response] = {}
        self._recover()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.fsync_every_s = fsync_every_s
        self._last_sync = time.monotonic()

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good = 0  # byte offset just past the last complete, valid line
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
                self.answers[entry["key"]] = Response.from_json(entry["response"])
            except (ValueError, KeyError, TypeError):
                if good + len(line) < len(data):  # not the last line: the log is damaged, not torn
                    raise ValueError(f"{self.path}: byte {good}: a damaged line in the middle of the request log; "
                                     "move the file away to regenerate its requests") from None
                break
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def append(self, key: str, request: Request, response: Response) -> None:
        line = json.dumps({"key": key, "request": request.to_json(), "response": response.to_json()},
                          ensure_ascii=False) + "\n"
        os.write(self.fd, line.encode())
        self.answers[key] = response
        if time.monotonic() - self._last_sync >= self.fsync_every_s:
            os.fsync(self.fd)
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


class Client:
    """`await client.run(requests)` -> their responses in order: from the log when finished, else from the backend.

    Counts what it sent and measures the wall time with at least one request in flight (`busy_s`), so the pipeline's
    own overhead is wall time minus busy time."""

    def __init__(self, backend, log: RequestLog, concurrency: int = 32):
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}; expected >= 1")
        self.backend, self.log, self.concurrency = backend, log, concurrency
        self.identity = backend.identity()
        self.sent = 0
        self.from_log = 0
        self.busy_s = 0.0
        self._in_flight = 0
        self._busy_since = 0.0

    def _start(self) -> None:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1

    def _end(self, n: int = 1) -> None:
        self._in_flight -= n
        if self._in_flight == 0:
            self.busy_s += time.perf_counter() - self._busy_since

    async def run(self, requests: list[Request]) -> list[Response]:
        keys = [request_key(r, self.identity) for r in requests]
        todo: dict[str, Request] = {}
        for k, r in zip(keys, requests):
            if k in self.log.answers:
                self.from_log += 1
            elif k not in todo:
                todo[k] = r
        if todo:
            if getattr(self.backend, "batch_size", 0):
                await self._run_batches(todo)
            else:
                await self._run_async(todo)
        return [self.log.answers[k] for k in keys]

    async def _run_async(self, todo: dict[str, Request]) -> None:
        sem = asyncio.Semaphore(self.concurrency)

        async def one(key: str, request: Request) -> None:
            async with sem:
                self._start()
                try:
                    response = await self.backend.complete(request)
                finally:
                    self._end()
                self.sent += 1
                self.log.append(key, request, response)

        tasks = [asyncio.ensure_future(one(k, r)) for k, r in todo.items()]
        try:
            await asyncio.gather(*tasks)
        finally:  # one failure (the server down) cancels the rest; what finished is already logged
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_batches(self, todo: dict[str, Request]) -> None:
        items = list(todo.items())
        size = self.backend.batch_size
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            for _ in chunk:
                self._start()
            try:
                responses = await asyncio.to_thread(self.backend.complete_batch, [r for _, r in chunk])
            finally:
                self._end(len(chunk))
            for (key, request), response in zip(chunk, responses):
                self.sent += 1
                self.log.append(key, request, response)
