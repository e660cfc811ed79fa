"""`python -m train.export <source> <out>`: a checkpoint as a Hugging Face directory or a GGUF file (llama.cpp, Ollama).

<source> is a `step_*` directory, a run directory (its newest complete checkpoint), or an HF export (a directory with
config.json, e.g. an earlier `python -m train.export` output). Checkpoint shards (any ZeRO stage) are consolidated to
fp32 and loaded into our Transformer with the checkpoint's own model config, then written by `train.export.hf.to_hf`
(load the result with `transformers.AutoModelForCausalLM.from_pretrained(out)`) or `train.export.gguf.to_gguf`
(`<out>` ends in .gguf; an Ollama Modelfile is written beside it). `--gguf PATH` writes both from one load.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from data.tokenizer import Phi4Tokenizer
from train.checkpoint import load_model
from train.export.gguf import GGUF_TYPES, to_gguf
from train.export.hf import to_hf

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def export(source: str, out: str, dtype: str = "bf16", overwrite: bool = False, fmt: str = "hf",
           gguf_path: str | None = None, gguf_type: str = "q8_0") -> dict:
    """Write `source` as `out` (HF directory or GGUF file) and, with gguf_path, also as that GGUF file."""
    if fmt == "gguf" and gguf_path is not None:
        raise ValueError("--gguf adds a GGUF file to an HF export; with --format gguf the output is already one")
    model, where = load_model(source, dtype=None)  # an HF export keeps its dtype
    tokenizer = Phi4Tokenizer()
    record = {"checkpoint": where["source"], "step": where["step"], "out": out, "format": fmt}
    if fmt == "gguf":
        record.update(to_gguf(model, out, gguf_type, tokenizer=tokenizer, overwrite=overwrite))
        return record
    to_hf(model, out, tokenizer=tokenizer, dtype=DTYPES[dtype], overwrite=overwrite)
    record["dtype"] = dtype
    if gguf_path is not None:
        # From the weights as loaded (fp32 for a checkpoint), not from the possibly rounded HF copy.
        record.update(to_gguf(model, gguf_path, gguf_type, tokenizer=tokenizer, overwrite=overwrite))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a checkpoints/step_* directory, a run directory, or an HF export directory")
    parser.add_argument("out", help="the HF directory to write, or with --format gguf the .gguf file")
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf", dest="fmt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="HF weights dtype (released phi-4: bf16)")
    parser.add_argument("--gguf", metavar="PATH", dest="gguf_path",
                        help="with --format hf: also write this .gguf file (and a Modelfile beside it)")
    parser.add_argument("--gguf-type", choices=sorted(GGUF_TYPES), default="q8_0",
                        help="GGUF weight type; norm weights stay f32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(export(args.source, args.out, args.dtype, args.overwrite, args.fmt, args.gguf_path,
                                args.gguf_type)))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    return 0
