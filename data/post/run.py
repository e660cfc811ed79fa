"""Run the enabled post-training builders and write their files into output_dir:

  sft.judged.jsonl  sft.hallucination.jsonl  sft.safety.jsonl      chat conversations (`messages`) for SFT
  dpo.judge_pairs.jsonl  dpo.safety.jsonl                          text pairs (prompt / chosen / rejected)
  dpo.hallucination.jsonl                                          id pairs cut to 5 tokens (data/pairs.py: as given)
  manifest.json                                                    counts per builder: in / kept / dropped by reason

Each role's requests go through its own log (requests.<role>.jsonl): a rerun sends none of the finished ones. Files
of disabled builders are not written; every file is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

from data.fileio import atomic_path, atomic_write
from data.post.common import make_roles
from data.post.config import ROLES, PostDataConfig
from data.post.hallucination import hallucination_data
from data.post.judged import judge_pairs, judged_sft
from data.post.safety import safety_data
from data.synth.client import Client, RequestLog


def post_outputs(cfg: PostDataConfig) -> list[str]:
    """The files a run of `cfg` writes (the recipe's dry run checks later stages' inputs against them)."""
    names = []
    if "sft" in cfg.make:
        names += ["sft.judged.jsonl"] * cfg.sft.enabled + ["sft.hallucination.jsonl"] * cfg.hallucination.enabled \
            + ["sft.safety.jsonl"] * cfg.safety.enabled
    if "dpo" in cfg.make:
        names += ["dpo.judge_pairs.jsonl"] * cfg.judge_pairs.enabled + \
            ["dpo.hallucination.jsonl"] * cfg.hallucination.enabled + ["dpo.safety.jsonl"] * cfg.safety.enabled
    return names


def _write(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


async def run(cfg: PostDataConfig, backends: dict, tokenizer, make: tuple[str, ...] = ("sft", "dpo"),
              log=print) -> dict:
    """backends: role -> backend object (roles falling back to the generator share its object)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logs, clients = {}, {}
    for role in ROLES:
        b = backends[role]
        if id(b) not in logs:
            logs[id(b)] = RequestLog(out / f"requests.{role}.jsonl")
            clients[id(b)] = Client(b, logs[id(b)], cfg.role(role).concurrency)
    roles = make_roles(cfg, {role: clients[id(backends[role])] for role in ROLES})
    files: dict[str, list[dict]] = {}
    try:
        if "sft" in make and cfg.sft.enabled:
            files["sft.judged.jsonl"] = await judged_sft(roles)
        if "dpo" in make and cfg.judge_pairs.enabled:
            files["dpo.judge_pairs.jsonl"] = await judge_pairs(roles)
        if cfg.hallucination.enabled:
            sft, dpo = await hallucination_data(roles, tokenizer, make)
            files.update({k: v for k, v in (("sft.hallucination.jsonl", sft), ("dpo.hallucination.jsonl", dpo))
                          if k.split(".")[0] in make})
        if cfg.safety.enabled:
            sft, dpo = await safety_data(roles, make)
            files.update({k: v for k, v in (("sft.safety.jsonl", sft), ("dpo.safety.jsonl", dpo))
                          if k.split(".")[0] in make})
    finally:
        for request_log in logs.values():
            request_log.close()
    for name, rows in files.items():
        _write(out / name, rows)
    manifest = {"make": list(make), "steps": roles.tally.steps, "files": {k: len(v) for k, v in files.items()},
                "roles": {role: backends[role].identity() for role in ROLES},
                "requests": {role: {"sent": clients[id(backends[role])].sent,
                                    "from_log": clients[id(backends[role])].from_log} for role in ROLES}}
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log("[post] " + ", ".join(f"{k} {v}" for k, v in manifest["files"].items()))
    return manifest
