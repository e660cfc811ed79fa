"""The in-process backend: our own model answers the pipeline's requests (model/generate.py), so the smoke recipe
and CPU runs show the whole pipeline with no server.

Chat requests are rendered with the Phi-4 chat template (message text stays text: never special tokens) plus the
assistant header; generation stops at <|im_end|>. Requests of one batch that share temperature, top_p and max_tokens
run in one generate() call, its sampling seeded from their seeds: a request's text depends on the batch it was in,
which is why every answer is persisted in the request log and never regenerated.
"""
from __future__ import annotations

import time

import torch

from data.synth.backend import Request, Response
from data.synth.config import InProcessConfig
from data.tokenizer import Phi4Tokenizer
from train.distributed import DTYPES, resolve_device, resolve_precision


def _load(cfg: InProcessConfig, device: torch.device, dtype: torch.dtype):
    if cfg.model.startswith("init:"):
        from data.configfile import load_typed
        from model import ModelConfig, Transformer

        overrides = [f"max_seq_len={cfg.max_seq_len}"] if cfg.max_seq_len else []
        model_cfg = load_typed(cfg.model.removeprefix("init:"), overrides, ModelConfig)
        torch.manual_seed(cfg.init_seed)
        model = Transformer(model_cfg)
        model.init_weights()
        return model.to(device=device, dtype=dtype).eval(), {"source": cfg.model, "init_seed": cfg.init_seed}
    from train.checkpoint import load_model

    model, info = load_model(cfg.model, device=device, dtype=dtype)
    return model, {"source": info["source"], "step": info["step"]}


class InProcessBackend:
    def __init__(self, cfg: InProcessConfig, tokenizer: Phi4Tokenizer | None = None):
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        self.device = resolve_device(cfg.device)
        dtype = DTYPES[resolve_precision(cfg.precision, self.device)]
        self.tok = tokenizer or Phi4Tokenizer()
        self.model, self.info = _load(cfg, self.device, dtype)
        self.max_len = self.model.cfg.max_seq_len
        self.name = f"inprocess:{self.info['source']}"

    def identity(self) -> dict:
        return {"backend": "inprocess", "model": self.name, **{k: v for k, v in self.info.items() if k != "source"}}

    describe = identity

    def _prompt_ids(self, r: Request) -> list[int]:
        if r.prompt_ids:
            return list(r.prompt_ids)
        if r.kind == "chat":
            return self.tok.apply_chat_template(r.chat_messages(), add_generation_prompt=True)
        return self.tok.encode(r.prompt)

    def complete_batch(self, requests: list[Request]) -> list[Response]:
        from model.generate import generate

        out: list[Response | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int], int]]] = {}
        for i, r in enumerate(requests):
            ids = self._prompt_ids(r)
            room = self.max_len - len(ids)
            if room < 1:
                out[i] = Response(finish_reason="error", model=self.name,
                                  error=f"prompt of {len(ids)} tokens leaves no room in max_seq_len {self.max_len}")
                continue
            new = min(r.max_tokens, room)
            groups.setdefault((r.temperature, r.top_p, new, r.logprobs), []).append((i, ids, r.seed))
        for (temperature, top_p, new, logprobs), rows in groups.items():
            t0 = time.perf_counter()
            gen = torch.Generator(device=self.device)
            gen.manual_seed(hash(tuple(seed for *_, seed in rows)) & 0x7FFFFFFF)
            results = generate(self.model, [ids for _, ids, _ in rows], new, temperature, top_p,
                               eos_ids=(self.tok.eos_id,), generator=gen, return_logprobs=logprobs)
            seconds = (time.perf_counter() - t0) / len(rows)
            for (i, ids, _), g in zip(rows, results):
                tokens = g.tokens[:-1] if g.finished else g.tokens
                text = self.tok.decode(tokens)
                reason = "stop" if g.finished else "length"
                for s in requests[i].stop:
                    if s in text:
                        text, reason = text[:text.index(s)], "stop"
                out[i] = Response(text=text, finish_reason=reason, model=self.name, prompt_tokens=len(ids),
                                  completion_tokens=len(g.tokens), seconds=seconds,
                                  token_ids=list(g.tokens) if logprobs else [], token_logprobs=list(g.logprobs))
        return out
