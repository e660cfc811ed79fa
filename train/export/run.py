"""`python -m train.export <checkpoint_dir> <out_dir>`: a checkpoint (any ZeRO stage) as a Hugging Face directory.

<checkpoint_dir> is a `step_*` directory or a run directory (its newest complete checkpoint). The ZeRO shards are
consolidated to fp32, loaded into our Transformer with the checkpoint's own model config, and written by
`train.export.hf.to_hf` (config.json, safetensors shards, tokenizer files). Load the result with
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)`.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from data.tokenizer import Phi4Tokenizer
from model import ModelConfig, Transformer
from train.export.hf import to_hf
from train.checkpoint import consolidated_state_dict, resolve_checkpoint_dir

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def load_checkpoint_model(checkpoint: str) -> tuple[Transformer, dict]:
    """Our model with a checkpoint's consolidated weights, on CPU in fp32; and the checkpoint's meta."""
    tag_dir, meta = resolve_checkpoint_dir(checkpoint)
    model_cfg = ModelConfig(**meta["config"]["model"])
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.load_state_dict(consolidated_state_dict(tag_dir), assign=True, strict=True)
    return model, {**meta, "tag_dir": str(tag_dir)}


def export(checkpoint: str, out_dir: str, dtype: str = "bf16", overwrite: bool = False) -> dict:
    model, meta = load_checkpoint_model(checkpoint)
    to_hf(model, out_dir, tokenizer=Phi4Tokenizer(), dtype=DTYPES[dtype], overwrite=overwrite)
    return {"checkpoint": meta["tag_dir"], "step": meta["step"], "out_dir": out_dir, "dtype": dtype}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoints/step_* directory or a run directory")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights dtype (released phi-4: bf16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty out_dir")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(export(args.checkpoint, args.out_dir, args.dtype, args.overwrite)))
    except (FileNotFoundError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    return 0
