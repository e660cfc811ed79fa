"""Rollouts for Pivotal Token Search through the synthetic-data engine's backends (`sampler: backend`).

At scale the rollouts belong on a serving engine: a vLLM server per node (backend kind openai) or vLLM in process
(kind vllm), where every rollout of a prefix reuses the prefix's KV blocks (prefix caching), instead of our
static-batch decoder. A rollout is a completion of token ids (the chat prompt + the solution prefix) returning its
sampled ids and their log-probs, one request per rollout with its own seed (derived from the question's seed, the
prefix and the rollout's number, so a rerun asks the same questions). The in-process backend (our model) serves the
same requests on a CPU.
"""
from __future__ import annotations

import asyncio
import zlib

from data.synth.backend import Request, Response, ServerUnavailable
from model.generate import Generation
from train.pts.config import PTSConfig


class BackendSampler:
    """sample(prompt_ids, n, max_new_tokens) -> list[Generation], what search_question calls, over a backend."""

    def __init__(self, backend, cfg: PTSConfig):
        self.backend, self.cfg = backend, cfg
        self.eos = set(cfg.eos_ids)
        self.loop = asyncio.new_event_loop()  # one loop for the async client's connections, for the whole run
        self.question_seed = 0

    def for_question(self, seed: int) -> "BackendSampler":
        self.question_seed = seed
        return self

    def requests(self, prompt_ids: list[int], n: int, max_new_tokens: int) -> list[Request]:
        base = zlib.crc32(repr((self.question_seed, len(prompt_ids), prompt_ids[-64:])).encode())
        return [Request(kind="completion", prompt_ids=tuple(prompt_ids), temperature=self.cfg.temperature,
                        top_p=self.cfg.top_p, max_tokens=max_new_tokens, seed=(base + i) & 0x7FFFFFFF, logprobs=True)
                for i in range(n)]

    def __call__(self, prompt_ids: list[int], n: int, max_new_tokens: int) -> list[Generation]:
        responses = self._complete(self.requests(prompt_ids, n, max_new_tokens))
        return [self._generation(r) for r in responses]

    def _complete(self, requests: list[Request]) -> list[Response]:
        if getattr(self.backend, "batch_size", 0):
            out = []
            for start in range(0, len(requests), self.backend.batch_size):
                out += self.backend.complete_batch(requests[start:start + self.backend.batch_size])
            return out

        async def run_all():  # at most backend.concurrency requests in flight
            sem = asyncio.Semaphore(self.cfg.backend.concurrency)

            async def one(r):
                async with sem:
                    return await self.backend.complete(r)
            return await asyncio.gather(*(one(r) for r in requests))

        return self.loop.run_until_complete(run_all())

    def _generation(self, r: Response) -> Generation:
        if r.error or not r.token_ids:
            raise ServerUnavailable(f"PTS rollout failed: {r.error or 'the backend returned no token ids'} (rollouts "
                                    "need an engine that takes token-id prompts and returns the sampled ids with "
                                    "their log-probs: vLLM's server, vLLM in process, or the inprocess backend)")
        ids, logps = list(r.token_ids), list(r.token_logprobs)
        finished = r.finish_reason == "stop"
        if finished and ids[-1] not in self.eos:  # engines may leave the stop token out of the ids: put it back,
            ids.append(self.cfg.eos_ids[0])      # a complete response ends with an eos id for the oracle and search
            logps.append(0.0)
        return Generation(ids, logps, finished)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            self.loop.run_until_complete(close())
        self.loop.close()
