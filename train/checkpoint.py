"""Checkpoints: DeepSpeed saves with a completion record, verified before every load, loaded without running code.

Layout of `<output_dir>/checkpoints/`:
  step_00000010/    DeepSpeed's files for that step, then `meta.json`, written by rank 0 after every rank finished:
                    a directory without meta.json is incomplete and never loaded. meta.json lists every file of the
                    step with its size and sha256, each hashed by the rank that wrote it.
  latest            the newest complete tag (DeepSpeed's own pointer format), replaced atomically after meta.json
Integrity: resume, export, init_from, eval and PTS verify a checkpoint's files against meta.json before loading; a
mismatch names the file, and `train.resume=auto` falls back to the newest checkpoint that verifies (saying so).
No code on load: every torch.load made while loading, DeepSpeed's own included, runs with weights_only=True and an
allow-list of the few DeepSpeed classes its optimizer states hold (`safe_loading`); a pickle that would run code is
refused.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from data.fileio import atomic_write, fsync_dir, sha256_file
from train.distributed import barrier, is_zero3

META_FILES_KEY = "files"  # meta.json: {relative path: {"bytes", "sha256"}}
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed names each rank's partition files so

log = logging.getLogger(__name__)

META = "meta.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (incomplete, corrupt, tampered); the message names the file."""


def _deepspeed_safe_globals() -> list:
    """What DeepSpeed's optimizer states pickle besides tensors and containers: plain records, no code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def safe_loading():
    """Every torch.load inside (DeepSpeed's own, which asks for weights_only=False, included) runs with
    weights_only=True and DeepSpeed's allow-list: a pickle that would construct anything else is refused."""
    original = torch.load
    allowed = _deepspeed_safe_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _owner(name: str, world_size: int) -> int:
    """The rank that hashes a file of a step: the rank in its name, else rank 0 (its non-partitioned files)."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) % world_size if m else 0


def _hash_files(tag_dir: Path, rank: int, world_size: int) -> dict[str, dict]:
    out = {}
    for f in sorted(tag_dir.rglob("*")):
        rel = str(f.relative_to(tag_dir))
        if f.is_file() and rel != META and _owner(f.name, world_size) == rank:
            out[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def verify(tag_dir: Path, meta: dict, rank: int = 0, world_size: int = 1) -> None:
    """Raise CheckpointError naming the first file that is missing, has another size or hash, or is not recorded.

    With world_size > 1 each rank checks the files it owns. A checkpoint written before files were recorded has
    nothing to check against: it is accepted with a warning."""
    files = meta.get(META_FILES_KEY)
    if files is None:
        log.warning("checkpoint %s has no file record (written by an older version): not verified", tag_dir)
        return
    for rel, want in sorted(files.items()):
        if _owner(Path(rel).name, world_size) != rank:
            continue
        f = tag_dir / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {tag_dir}: {rel} is missing (recorded {want['bytes']} bytes)")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"checkpoint {tag_dir}: {rel} has {f.stat().st_size} bytes, {want['bytes']} "
                                  "recorded: truncated or replaced")
        if sha256_file(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {tag_dir}: {rel} does not match its recorded sha256: corrupt or "
                                  "modified")
    if rank == 0:
        extra = sorted(str(f.relative_to(tag_dir)) for f in tag_dir.rglob("*")
                       if f.is_file() and str(f.relative_to(tag_dir)) not in files and f.name != META)
        if extra:
            raise CheckpointError(f"checkpoint {tag_dir}: {extra[0]} is not among the files its ranks wrote "
                                  f"({len(extra)} unrecorded file(s))")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)


def save(engine, output_dir, step: int, client_state: dict, meta: dict, keep_last: int, is_main: bool,
         local_main: bool = True) -> Path:
    """Every rank calls this. The `latest` pointer moves only after every rank has finished writing."""
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    root, tag = checkpoint_root(output_dir), tag_for(step)
    tag_dir = root / tag
    if is_main and (tag_dir / META).exists():
        (tag_dir / META).unlink()  # re-saving a step: it is incomplete until rewritten
    barrier()
    # universal_checkpoint_info lets ds_to_universal convert this checkpoint for another world size.
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if local_main:
        _fsync_tree(tag_dir)
    barrier()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    files = _hash_files(tag_dir, rank, world)  # each rank hashes what it wrote, in parallel
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, files)
        files = {k: v for part in gathered for k, v in part.items()}
    if is_main:
        atomic_write(tag_dir / META, json.dumps({**meta, "step": step, "tag": tag, META_FILES_KEY: files}, indent=2))
        atomic_write(root / LATEST, tag)
        _prune(root, keep_last)
    barrier()
    return tag_dir


def _complete_tags(root: Path) -> list[tuple[int, Path]]:
    out = []
    for d in root.glob("step_*"):
        if d.is_dir() and not d.name.endswith("_universal") and (d / META).is_file():
            try:
                out.append((int(json.loads((d / META).read_text())["step"]), d))
            except (ValueError, KeyError, json.JSONDecodeError):
                log.warning("ignoring checkpoint %s: unreadable %s", d, META)
    return sorted(out)


def _prune(root: Path, keep_last: int) -> None:
    complete = _complete_tags(root)
    for _, d in complete[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(root / f"{d.name}_universal", ignore_errors=True)


def find_latest(output_dir) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of a run (the `latest` pointer, else a scan), or None."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        tag_dir = root / pointer.read_text().strip()
        if (tag_dir / META).is_file():
            return tag_dir, json.loads((tag_dir / META).read_text())
    complete = _complete_tags(root)
    if not complete:
        return None
    tag_dir = complete[-1][1]
    return tag_dir, json.loads((tag_dir / META).read_text())


def resolve_checkpoint_dir(path: str | os.PathLike, verify_files: bool = True) -> tuple[Path, dict]:
    """A checkpoint tag dir, or a run dir (its newest complete checkpoint), verified against its file record
    (verify_files=False: only located, for callers that read no tensor of it)."""
    path = Path(path)
    if (path / META).is_file():
        found = path, json.loads((path / META).read_text())
    else:
        found = find_latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a step_* directory with {META}) found")
    if verify_files:
        verify(*found)
    return found


def find_resumable(output_dir, rank: int = 0, world_size: int = 1, device="cpu") -> tuple[Path, dict] | None:
    """The newest complete checkpoint that verifies on every rank; a failing one is skipped with a warning."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    for _, tag_dir in reversed(_complete_tags(root)):
        meta = json.loads((tag_dir / META).read_text())
        try:
            verify(tag_dir, meta, rank, world_size)
            problem = ""
        except CheckpointError as e:
            problem = str(e)
        ok = torch.tensor([0.0 if problem else 1.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() > 0.5:
            return tag_dir, meta
        log.warning("not resuming from %s: %s; trying the previous checkpoint", tag_dir,
                    problem or "a file owned by another rank failed verification")
    return None


def to_universal(tag_dir: Path, is_main: bool) -> Path:
    """Convert a ZeRO checkpoint for loading on another world size (DeepSpeed universal checkpoint)."""
    out = tag_dir.parent / f"{tag_dir.name}_universal"
    if is_main and not (out / "complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "train.checkpoint", "--to-universal", "--input_folder", str(tag_dir),
               "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed for {tag_dir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        atomic_write(out / "complete", "ok")
    barrier()
    return out


def load(engine, tag_dir: Path, universal: bool = False) -> dict:
    """Load weights, optimizer, scheduler and return the client state."""
    load_dir = to_universal(tag_dir, engine.global_rank == 0) if universal else tag_dir
    with safe_loading():
        path, client_state = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}")
    return client_state


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights (our parameter names) from a checkpoint of any ZeRO stage, on CPU."""
    meta = json.loads((tag_dir / META).read_text())
    if meta.get("zero_stage", 0) == 0:
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loading():
        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.float() for k, v in sd.items()}


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = torch.float32):
    """Our Transformer, in eval mode, from a Hugging Face directory, a checkpoint step dir or a run dir (its newest
    complete checkpoint, verified); and {source, step, meta} (meta: the checkpoint's meta.json, None for an HF
    directory). dtype None: as stored (an HF export's dtype; a checkpoint's consolidated fp32)."""
    from model import ModelConfig, Transformer
    from train.config import from_dict

    path = Path(path)
    if (path / "config.json").is_file():
        from train.export.hf import from_hf

        return from_hf(path, dtype=dtype, device=device).eval(), {"source": str(path), "step": None, "meta": None}
    tag_dir, meta = resolve_checkpoint_dir(path)
    if "model" not in meta.get("config", {}):
        raise ValueError(f"{tag_dir}/{META}: no config.model; cannot rebuild the model")
    with torch.device("meta"):
        model = Transformer(from_dict(meta["config"]["model"], schema=ModelConfig))  # tensors assigned below
    model.load_state_dict(consolidated_state_dict(tag_dir), strict=True, assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval(), {"source": str(tag_dir),
                                                                          "step": meta.get("step"), "meta": meta}


def init_weights_from(model: torch.nn.Module, source: str, is_main: bool) -> str:
    """Weights only (fresh optimizer and schedule): a checkpoint dir, a run dir, or a Hugging Face directory."""
    path = Path(source)
    if (path / "config.json").is_file():
        from train.export.hf import from_hf

        state = from_hf(path).state_dict() if is_main or not is_zero3(model) else None
        described = f"Hugging Face directory {path}"
    else:
        tag_dir, _ = resolve_checkpoint_dir(path)
        state = consolidated_state_dict(tag_dir) if is_main or not is_zero3(model) else None
        described = f"checkpoint {tag_dir}"
    if is_zero3(model):
        _load_zero3(model, state, is_main)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"init_from {described}: missing keys {missing}, unexpected keys {unexpected}")
    return described


def _load_zero3(model: torch.nn.Module, state: dict | None, is_main: bool) -> None:
    """Gather one parameter at a time so the full model never sits on one rank; rank 0 writes it."""
    import deepspeed

    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if is_main:
                if name not in state:
                    raise RuntimeError(f"init_from: parameter {name} missing from the source weights")
                p.data.copy_(state[name].to(p.dtype))


if __name__ == "__main__":
    # `python -m train.checkpoint --to-universal <ds_to_universal args>`: DeepSpeed's converter under safe_loading.
    if sys.argv[1:2] != ["--to-universal"]:
        sys.exit("usage: python -m train.checkpoint --to-universal --input_folder IN --output_folder OUT [...]")
    import runpy

    sys.argv = ["ds_to_universal", *sys.argv[2:]]
    with safe_loading():
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")
