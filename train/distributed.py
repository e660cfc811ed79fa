"""The distributed state of a process (rank, world size, device, precision), the few collectives the trainer and the
stages share, and the stop signals that every rank agrees on."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DistState:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str  # bf16 | fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when a device is visible, else CPU; cuda without a device is an error."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible")
    return torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on a GPU, fp32 on a CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def init_distributed(device_name: str, precision: str) -> DistState:
    """gloo on CPU, NCCL on GPUs; a single process still gets a (world size 1) group for DeepSpeed."""
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return DistState(dist.get_rank(), dist.get_world_size(), local_rank, device, resolve_precision(precision, device))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- collectives (each a no-op without a process group) ---------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(n: int, device) -> int:
    if not dist.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def from_rank0(value):
    """Rank 0's value on every rank (any picklable Python object of ours: lists, strings, numbers)."""
    if dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def is_zero3(model: torch.nn.Module) -> bool:
    """Parameters partitioned by ZeRO-3 (they carry DeepSpeed's `ds_id`): every rank must run the same forwards."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


# ---- stopping ------------------------------------------------------------------------------------------------------
class StopRequested:
    """Set by SIGTERM / SIGUSR1; every rank agrees on it at the same points (the end of each step)."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, device) -> bool:
        flag = torch.tensor([float(self.signal)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


class StoppedBeforeTraining(Exception):
    """A stop signal arrived during a stage's before-training work; what was done so far is kept for the requeue."""
