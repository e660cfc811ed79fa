"""Synthetic records and the run's tallies.

A record is a jsonl object data.prepare takes unchanged (`text` for pretraining, `messages` for chat data) plus what
explains it: `id` (a hash of step, parents, template version, model, sampling and sample index: the same inputs give
the same id on every run), `dataset_type`, `provenance`, `scores`, `votes`, `validation`, `decontamination`.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from data.fileio import read_jsonl
from data.sources import list_inputs


def record_id(step: str, parents: list[str], template_version: str, model: dict, sampling: dict,
              sample_index: int) -> str:
    blob = json.dumps({"step": step, "parents": parents, "template": template_version, "model": model,
                       "sampling": sampling, "sample": sample_index}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def jsonl_objects(paths: list[str]) -> Iterator[tuple[Path, int, dict]]:
    """(file, line, object) over the .jsonl files of `paths` (files, or folders searched in order); a line that is
    not a JSON object is an error naming the file and line (data.fileio.read_jsonl)."""
    for path in list_inputs(paths, (".jsonl",)) if paths else []:
        for line_no, obj in read_jsonl(path):
            yield path, line_no, obj


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Tally:
    """Per step: how many went in, were kept, and were dropped by reason; per dataset type: records written."""
    steps: dict = field(default_factory=dict)  # step -> {"in": n, "kept": n, "dropped": {reason: n}}

    def count(self, step: str, kept: int = 0, dropped: Counter | dict | None = None, seen: int | None = None):
        entry = self.steps.setdefault(step, {"in": 0, "kept": 0, "dropped": {}})
        dropped = dict(dropped or {})
        entry["kept"] += kept
        entry["in"] += seen if seen is not None else kept + sum(dropped.values())
        for reason, n in dropped.items():
            if n:
                entry["dropped"][reason] = entry["dropped"].get(reason, 0) + n

    def drop(self, step: str, reason: str, n: int = 1) -> None:
        self.count(step, dropped={reason: n})

    def keep(self, step: str, n: int = 1) -> None:
        self.count(step, kept=n)

    def merge(self, other: dict) -> None:
        for step, e in other.items():
            self.count(step, kept=e["kept"], dropped=e["dropped"], seen=e["in"])
