"""Evaluation as a Slurm array: `python -m train.eval CONFIG --shard I/N` scores items n % N == I of every task and
writes `<output_dir>/shards/of-<N>/shard-<I>.json`; `--merge N` (the job after them, no model) joins the shards' samples
per task in item order and recomputes each task's metrics from them, so results.jsonl holds what one process writes
(times aside). Completions are seeded per item (train.eval.tasks.row_generators), so sampled tasks agree too.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data.fileio import atomic_write
from train.config import to_dict
from train.eval.config import EvalConfig
from train.eval.perplexity import ppl_metrics, provenance_records
from train.eval.recall import recall_metrics


def config_key(cfg: EvalConfig) -> str:
    """What a shard's results depend on (the tasks, the model, the seed), so a stale shard is never merged."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "label", "wandb")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def shard_path(cfg: EvalConfig, i: int, n: int) -> Path:
    return Path(cfg.output_dir) / "shards" / f"of-{n:05d}" / f"shard-{i:05d}.json"


def completed_shard(cfg: EvalConfig, i: int, n: int) -> bool:
    """A shard already written for this very config (a resubmitted array task exits at once)."""
    path = shard_path(cfg, i, n)
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("config_key") == config_key(cfg)
    except json.JSONDecodeError:  # never half-written (atomic), but a hand-edited file is redone
        return False


def write_shard(cfg: EvalConfig, i: int, n: int, records: list[dict], info: dict, label: str) -> Path:
    path = shard_path(cfg, i, n)
    kept = [r for r in records if r["kind"] != "perplexity_by_provenance"]  # derived again by the merge
    atomic_write(path, json.dumps({"config_key": config_key(cfg), "shard": [i, n], "label": label,
                                   "info": {"source": info["source"], "step": info["step"]}, "records": kept}))
    return path


def _metrics(cfg: EvalConfig, sections: dict, kind: str, name: str, samples: list[dict]) -> dict:
    if kind == "perplexity":
        return ppl_metrics(next(s for s in cfg.perplexity if s.name == name), samples)
    if kind == "recall":
        return recall_metrics(cfg.recall, samples)
    task = next(t for t in getattr(cfg, kind) if t.name == name)
    return sections[kind][1](task, samples)


def merge_shards(cfg: EvalConfig, n: int, sections: dict) -> tuple[list[dict], dict, str]:
    """(records as one process makes them, the model info, the label) from the N shard files; ValueError naming the
    missing or stale ones. `sections`: train.eval.run.TASK_SECTIONS (section -> (task function, metrics))."""
    key = config_key(cfg)
    shards, problems = [], []
    for i in range(n):
        path = shard_path(cfg, i, n)
        if not path.exists():
            problems.append(f"{path} is missing")
            continue
        shard = json.loads(path.read_text())
        if shard.get("config_key") != key:
            problems.append(f"{path} was written for another config (model, tasks or seed)")
        shards.append(shard)
    if problems:
        raise ValueError(f"eval merge of {n} shards: " + "; ".join(problems) +
                         f" (rerun those shards: python -m train.eval CONFIG --shard I/{n})")
    records = []
    for j, first in enumerate(shards[0]["records"]):
        parts = [s["records"][j] for s in shards]
        samples = sorted((x for p in parts for x in p.get("samples", [])),
                         key=lambda x: (x["index"], x.get("sample", 0)))
        merged = {**first, "samples": samples, "time_s": sum(p.get("time_s", 0.0) for p in parts),
                  "metrics": _metrics(cfg, sections, first["kind"], first["task"], samples)}
        records.append(merged)
    last_ppl = max((k for k, r in enumerate(records) if r["kind"] == "perplexity"), default=-1)
    records[last_ppl + 1:last_ppl + 1] = provenance_records(records)  # where one process puts them
    return records, shards[0]["info"], shards[0]["label"]
