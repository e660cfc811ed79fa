"""Rank-0 logging: metrics.jsonl and wandb (grouped names), plus throughput, MFU and the device's peak FLOP/s."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import uuid
from pathlib import Path

import torch

from data.fileio import atomic_write

log = logging.getLogger(__name__)

# Names metrics.jsonl keeps plain (the trainer's documented interface); wandb gets them under a prefix.
PLAIN = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "perf/tokens_per_s",
         "tokens_seen": "train/tokens_seen"}

# Dense bf16 peak per device, TFLOP/s (NVIDIA datasheets).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def gemm_rate(n: int, onednn: bool, repeats: int = 3) -> float:
    """Best fp32 FLOP/s of an n x n x n matmul, through the default BLAS or oneDNN."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = (lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")) if onednn else (lambda: a @ b)
    mm()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measured_cpu_tflops(n: int = 2048) -> float:
    """The faster of the BLAS and oneDNN fp32 GEMM rates of this CPU: the CPU stand-in for a datasheet peak
    (the fused loss runs its big matmuls through oneDNN, which beats MKL by ~2x on some CPUs)."""
    from model.loss import onednn_available

    rates = [gemm_rate(n, onednn=False)] + ([gemm_rate(n, onednn=True)] if onednn_available() else [])
    return max(rates) / 1e12


def peak_tflops(configured: float, device: torch.device) -> float:
    """The configured peak, else the datasheet value for the GPU, else the measured CPU GEMM rate."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value
        log.warning("unknown GPU %r: set logging.peak_tflops for MFU; assuming 989", name)
        return 989.0
    return measured_cpu_tflops()


def git_commit(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class MetricsLogger:
    """metrics.jsonl + wandb on rank 0; a no-op elsewhere. On resume, entries past the resumed step are dropped."""

    def __init__(self, run_dir: Path, wandb_cfg, config_dict: dict, enabled: bool, resume_step: int = 0,
                 commit: str = ""):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        if wandb_cfg.mode != "disabled":
            self.wandb = self._init_wandb(Path(run_dir), wandb_cfg, config_dict, commit)

    def _truncate_after(self, step: int) -> None:
        """Keep metrics of steps <= step: a resumed run neither repeats nor loses a step."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    @staticmethod
    def _init_wandb(run_dir: Path, cfg, config_dict: dict, commit: str):
        import wandb

        id_file = run_dir / "wandb_id"  # the same wandb run continues after a requeue
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        atomic_write(id_file, run_id)
        run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.name or "/".join(run_dir.parts[-2:]),
            group=cfg.group or None, tags=list(cfg.tags) or None, dir=cfg.dir or str(run_dir), mode=cfg.mode,
            id=run_id, resume="allow", config={**config_dict, "git_commit": commit},
        )
        run.define_metric("step")
        for prefix in ("train/*", "perf/*", "data/*", "eval/*"):
            run.define_metric(prefix, step_metric="step")
        return run

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb is not None:
            self.wandb.log({"step": step, **{PLAIN.get(k, k): v for k, v in values.items()}})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self.wandb.finish()


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 1e9
