"""Test doubles and fixtures for the synthetic-data engine.

`ScriptedBackend` is a TEST DOUBLE, not an LLM: it answers each request by a rule the test writes, so the pipeline's
kept/dropped decisions can be asserted exactly. The same pipelines also run against a real OpenAI-compatible server
(tests/data/synth/test_real_server.py) and our own model (the in-process backend).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from data.synth.backend import Request, Response
from data.synth.config import SynthConfig
from data.post.prompts import POST_TEMPLATES, SAFE_SYSTEM
from data.synth.prompts import TEMPLATES


def template_of(request: Request) -> str:
    """Which prompt template a request was made from (by its system prompt and text); "chat" for a prompt's own
    conversation sent as is, "safe_chat" for one under the safety system prompt."""
    system = dict(request.messages).get("system", "")
    if system == SAFE_SYSTEM:
        return "safe_chat"
    user = request.messages[-1][1]
    for templates in (TEMPLATES, POST_TEMPLATES):
        for name, (_, sys_prompt, text) in templates.items():
            head = text.split("{", 1)[0]
            if sys_prompt == system and user.startswith(head):
                return name
    return "chat"


def user_text(request: Request) -> str:
    return dict(request.messages)["user"]


class ScriptedBackend:
    """TEST DOUBLE. `rule(template, user_text, k) -> str | Response` answers, k = how many earlier requests had the
    same user text (the sample index, as requests arrive in order). Batch mode keeps arrival order exact."""

    def __init__(self, rule, fail_after: int | None = None, batch_size: int = 1000):
        self.rule = rule
        self.batch_size = batch_size
        self.calls: list[Request] = []
        self.seen: Counter = Counter()
        self.fail_after = fail_after  # raise after this many answered requests (a crash mid-shard)

    def identity(self) -> dict:
        return {"backend": "scripted-test-double", "model": "rules"}

    describe = identity

    def complete_batch(self, requests: list[Request]) -> list[Response]:
        out = []
        for r in requests:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise RuntimeError(f"scripted crash after {self.fail_after} requests")
            text = user_text(r)
            k = self.seen[text]
            self.seen[text] += 1
            self.calls.append(r)
            answer = self.rule(template_of(r), text, k)
            out.append(answer if isinstance(answer, Response) else Response(text=answer, finish_reason="stop",
                                                                            model="rules"))
        # the client logs a batch only after it returns: a crash loses the batch in flight, like a real one
        return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_config(out: Path, **sections) -> SynthConfig:
    """A config with every step off; turn on the ones a test needs."""
    cfg = SynthConfig(output_dir=str(out))
    cfg.backend.kind = "inprocess"
    cfg.backend.inprocess.model = "unused: the test passes its own backend"
    cfg.rewrite.enabled = cfg.revision.enabled = cfg.questions.enabled = cfg.reversal.enabled = False
    cfg.seeds.score = "none"
    for name, values in sections.items():
        section = getattr(cfg, name)
        for k, v in values.items():
            setattr(section, k, v)
    cfg.validate()
    return cfg


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
