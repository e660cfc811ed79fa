"""Shared by the trainer tests: tiny prepared sources, run configs, and launching real (torchrun) processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from data.tokenizer import EOD_ID as EOD
from tests.helpers.models import TINY

REPO = Path(__file__).resolve().parents[2]

# A model small enough for many multi-process runs on 2 cores, with the real vocabulary: the TINY shape on the tiny
# preset (which adds its context, TINY_RUN_CONTEXT tokens).
TEST_MODEL = {"preset": "tiny", **TINY}


def make_sources(root: Path, docs_per_source: int = 300, seed: int = 0) -> dict[str, Path]:
    """Two prepared sources (synthetic, organic) of short learnable documents (arithmetic progressions)."""
    from data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    out = {}
    for name, provenance in (("syn", "synthetic"), ("org", "organic")):
        path = root / name
        if not (path / "manifest.json").exists():
            writer = ShardWriter(path, name, provenance, "test-tokenizer", shard_tokens=8000)
            for _ in range(docs_per_source):
                n, start, step = int(rng.integers(10, 120)), int(rng.integers(0, 2000)), int(rng.integers(1, 4))
                writer.add([(start + step * j) % 3000 for j in range(n)] + [EOD])
            writer.close()
        out[name] = path
    return out


def write_run_config(path: Path, sources: dict[str, Path], output_dir: Path, **sections) -> Path:
    cfg = {
        "stage": "pretrain",
        "output_dir": str(output_dir),
        "model": dict(TEST_MODEL),
        "data": {"held_out_fraction": 0.05, "sources": [
            {"name": "syn", "provenance": "synthetic", "path": str(sources["syn"]), "weight": 0.6},
            {"name": "org", "provenance": "organic", "path": str(sources["org"]), "weight": 0.4}]},
        "train": {"seq_len": 64, "global_batch": 4, "micro_batch": 1, "max_steps": 6, "save_every": 3,
                  "log_every": 1},
        "optim": {"lr": 2e-2, "warmup_steps": 1},
        "deepspeed": {"zero_stage": 0},
        "logging": {"wandb": {"mode": "disabled"}},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, overrides: list[str] = (), nproc: int = 1, timeout: float = 600,
              module: str = "train", env: dict | None = None) -> subprocess.CompletedProcess:
    """A real run: `python -m train` for one process, `torchrun --standalone` for several."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, str(config), *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (eval records carry no 'loss' key)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def exit_status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "exit_status.json").read_text())


def check(proc: subprocess.CompletedProcess, expected: int = 0) -> None:
    assert proc.returncode == expected, (
        f"exit {proc.returncode} (expected {expected})\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
