"""Benchmarks of the data path on CPU: data.prepare vs raw tiktoken, and the loader's data wait as a share of a
training step. Run through `python -m train.bench`."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from model.config import ModelConfig
from train.metrics import GPU_PEAK_TFLOPS


H100_BF16_FLOPS, PLAN_MFU = GPU_PEAK_TFLOPS["H100"] * 1e12, 0.40  # the planner's default MFU


# ---- 3. tokenization ------------------------------------------------------------------------------------------

def bench_texts(folder: str, max_bytes: int) -> list[str]:
    """Real text of a fixed size: the .py files of a folder (default: the Python standard library), sorted."""
    texts, total = [], 0
    for path in sorted(Path(folder).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():  # data.prepare rejects empty documents
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if not texts:
        raise FileNotFoundError(f"--text-dir {folder}: no readable .py files")
    return texts


def bench_tokenize(args) -> dict:
    from data.prepare_bench import measure_throughput

    texts = bench_texts(args.text_dir, int(args.text_mb * 1e6))
    r = measure_throughput(texts, num_workers=args.threads, repeats=args.repeats)
    r["text_dir"] = args.text_dir
    return r


# ---- 4. loader ------------------------------------------------------------------------------------------------

def synthetic_source(out_dir: Path, n_tokens: int, seed: int = 0) -> Path:
    """A prepared shard directory of random documents (lengths 100..20,000 tokens), written by the real ShardWriter."""
    from data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir, "bench", "organic", "bench-tokenizer", shard_tokens=4_000_000)
    written = 0
    while written < n_tokens:
        n = int(rng.integers(100, 20_000))
        doc = rng.integers(0, 100_256, n, dtype=np.uint32)
        doc[-1] = 100_257  # eod
        writer.add(doc)
        written += n
    writer.close()
    return out_dir


def bench_loader(args, step: dict | None) -> dict:
    from data.config import DataConfig, SourceConfig
    from data.loader import MixtureLoader, measure_throughput

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_source(Path(tmp) / "bench", args.loader_tokens)
        cfg = DataConfig(sources=[SourceConfig(name="bench", provenance="organic", path=str(path), weight=1.0)])
        for seq_len in (4096, 16384):
            loader = MixtureLoader(cfg, seq_len=seq_len, micro_batch=1, global_batch=1, doc_masking=True)
            r = measure_throughput(loader, n_batches=args.loader_batches)
            # The 14B step on one H100 at the planner's 40% MFU, for this micro-batch.
            step_14b_s = seq_len * ModelConfig().flops_per_token(seq_len) / (H100_BF16_FLOPS * PLAN_MFU)
            r["wait_fraction_14b_h100"] = (r["ms_per_batch"] / 1000) / step_14b_s
            if step is not None:  # the tiny model's step, per token, on this CPU
                r["wait_fraction_tiny_cpu"] = step["ours_tokens_per_s"] / r["tokens_per_s"]
            out[str(seq_len)] = r
    return out
