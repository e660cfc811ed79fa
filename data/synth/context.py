"""What every step shares: the config, the client, the shard, the tallies, and how requests and records are made."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from data.synth.backend import Request, chat
from data.synth.client import Client
from data.synth.config import SynthConfig
from data.synth.prompts import render
from data.synth.records import Tally, record_id


@dataclass
class Context:
    cfg: SynthConfig  # or any config with `seed` and `sampling` (data/post/config.py)
    client: Client
    shard: int = 0
    num_shards: int = 1
    tally: Tally = field(default_factory=Tally)
    templates: dict | None = None  # prompt templates; None = data/synth/prompts.py's

    @property
    def model(self) -> dict:
        return self.client.identity

    def request_seed(self, purpose: str, parent: str, sample: int) -> int:
        """A seed per (run seed, purpose, parent, sample): N samples of one prompt get N different seeds."""
        h = hashlib.sha256(f"{self.cfg.seed}:{purpose}:{parent}:{sample}".encode()).digest()
        return int.from_bytes(h[:4], "little") & 0x7FFFFFFF

    def request(self, template: str, parent: str, sample: int = 0, *, temperature: float | None = None,
                max_tokens: int | None = None, json_output: bool = False, **fields) -> tuple[Request, str]:
        """The chat request of `template` filled with `fields`, and the template's version."""
        version, system, user = render(template, self.templates, **fields)
        s = self.cfg.sampling
        req = chat(user, system, temperature=s.temperature if temperature is None else temperature,
                   top_p=s.top_p, max_tokens=max_tokens or s.max_tokens,
                   seed=self.request_seed(template, parent, sample), json_output=json_output)
        return req, version

    def make_record(self, step: str, dataset_type: str, text: str, parents: list[str], template: str,
                    version: str, request: Request, sample: int, **extra) -> dict:
        rid = record_id(step, parents, version, self.model, request.sampling(), sample)
        provenance = {"step": step, "parents": parents, "template": {"name": template, "version": version},
                      "backend": self.client.backend.describe(), "sampling": request.sampling(),
                      "sample_index": sample, "run_seed": self.cfg.seed}
        provenance.update(extra.pop("provenance", {}))
        return {"id": rid, "dataset_type": dataset_type, "text": text, "provenance": provenance, **extra}
