"""Checkpoints: DeepSpeed saves with a completion marker, resume from the newest complete one, weights-only hand-off.

Layout of `<output_dir>/checkpoints/`:
  step_00000010/    DeepSpeed's files for that step, then `meta.json`, written by rank 0 after every rank finished:
                    a directory without meta.json is incomplete and never loaded
  latest            the newest complete tag (DeepSpeed's own pointer format), replaced atomically after meta.json
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from data.fileio import atomic_write, fsync_dir
from train.distributed import barrier, is_zero3

log = logging.getLogger(__name__)

META = "meta.json"
LATEST = "latest"


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
    if is_main:
        atomic_write(tag_dir / META, json.dumps({**meta, "step": step, "tag": tag}, indent=2))
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


def resolve_checkpoint_dir(path: str | os.PathLike) -> tuple[Path, dict]:
    """Accept a checkpoint tag dir or a run dir (its newest complete checkpoint)."""
    path = Path(path)
    if (path / META).is_file():
        return path, json.loads((path / META).read_text())
    found = find_latest(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a step_* directory with {META}) found")
    return found


def to_universal(tag_dir: Path, is_main: bool) -> Path:
    """Convert a ZeRO checkpoint for loading on another world size (DeepSpeed universal checkpoint)."""
    out = tag_dir.parent / f"{tag_dir.name}_universal"
    if is_main and not (out / "complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
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

    sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.float() for k, v in sd.items()}


def load_model(path: str | os.PathLike, device="cpu", dtype: torch.dtype = torch.float32):
    """Our Transformer, in eval mode, from a Hugging Face directory, a checkpoint step dir or a run dir (its newest
    complete checkpoint); and {source, step, meta} (meta: the checkpoint's meta.json, None for an HF directory)."""
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
    return model.to(device=device, dtype=dtype).eval(), {"source": str(tag_dir), "step": meta.get("step"),
                                                         "meta": meta}


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
