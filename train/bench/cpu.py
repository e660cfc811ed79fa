"""CPU benchmarks, ours against the peer in the same command: medians of interleaved repeats and their ratio.

    python -m train.bench [--only step memory tokenize loader mfu] [--json out.json] [--repeats N] [--profile]

step      forward + backward + AdamW of our Transformer vs transformers' Phi3ForCausalLM (same shape, same weights,
          same batch, same threads, fp32, SDPA, fused AdamW as HF Trainer's default): tokens/s, ours eager and with
          each block compiled (compile time reported, excluded from the steady state).  Target: ours >= 1.5x HF.
memory    peak resident memory of one training step at 4,096 tokens, each model in a fresh subprocess (Linux VmHWM,
          reset before the step): ours (fused loss + activation checkpointing) vs HF.  Target: <= 0.5x HF.
tokenize  data.prepare (read + tokenize + write shards; N processes) vs raw tiktoken encode_ordinary in N processes.
          Target: >= 0.9x.
loader    MixtureLoader batches/s at 4K and 16K windows, and the data wait as a share of a training step (the tiny
          model's, and the 14B step at 40% MFU on an H100 from the planner's formula).  Target: < 1%.
mfu       achieved FLOP/s of the training step (ModelConfig.flops_per_token x tokens/s) against the best fp32 GEMM
          rate measured in the same run (MKL and oneDNN): the CPU stand-in for MFU.
The GPU counterpart is `python -m train.bench.gpu`.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from data.fileio import atomic_write
from model.config import ModelConfig
from train.bench.data import bench_loader, bench_tokenize
from train.bench.step import bench_memory, bench_mfu, bench_step, memory_child
from train.bench.timing import machine_facts

BENCHES = ("step", "memory", "tokenize", "loader", "mfu")
TARGETS = {"step": 1.5, "memory": 0.5, "tokenize": 0.9, "loader": 0.01}


# ---- report -----------------------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "target met" if ok else "TARGET NOT MET"


def summary(res: dict) -> str:
    m = res["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
             f"transformers {m['transformers']}, load average {m['loadavg']} -> {res.get('loadavg_end')}"]
    if "step" in res:
        s = res["step"]
        lines.append(f"step ({s['batch']}x{s['seq_len']} tokens, fp32, AdamW): ours {s['ours_tokens_per_s']:,.0f} "
                     f"tok/s, HF Phi3 {s['hf_tokens_per_s']:,.0f} tok/s, ratio {s['ratio']:.2f} "
                     f"(CPU-time ratio {s['cpu_ratio']:.2f}; {verdict(s['ratio'] >= TARGETS['step'])}, >= 1.5)")
        if "ratio_compiled" in s:
            lines.append(f"  ours with compiled blocks {s['ours_compiled_tokens_per_s']:,.0f} tok/s, ratio "
                         f"{s['ratio_compiled']:.2f}; compile + first step {s['compile_s']:.1f} s")
        for name, label in (("blas", "onednn_loss=false"), ("plain_loss", "loss_chunk_tokens=0 (full logits)")):
            if f"ratio_{name}" in s:
                lines.append(f"  ours with {label}: {s[f'ours_{name}_tokens_per_s']:,.0f} tok/s, ratio "
                             f"{s[f'ratio_{name}']:.2f}")
    if "memory" in res:
        r = res["memory"]
        g = {k: r[k]["step_growth_bytes"] / 2**20 for k in ("ours", "ours_plain", "hf")}
        lines.append(f"memory ({r['batch']}x{r['seq_len']} tokens, peak RSS growth of a step): "
                     f"ours {g['ours']:,.0f} MiB, ours without AC and fused loss {g['ours_plain']:,.0f} MiB, "
                     f"HF {g['hf']:,.0f} MiB, ratio "
                     f"{r['ratio']:.2f} ({verdict(r['ratio'] <= TARGETS['memory'])}, <= 0.5); whole-process peak "
                     f"ratio {r['ratio_total_peak']:.2f}")
    if "tokenize" in res:
        t = res["tokenize"]
        lines.append(f"tokenize ({t['bytes'] / 1e6:.1f} MB, {t['workers']} processes): data.prepare "
                     f"{t['prepare_tokens_per_s'] / 1e6:.2f} M tok/s, raw tiktoken in as many processes "
                     f"{t['raw_tokens_per_s'] / 1e6:.2f} M tok/s, per-core ratio {t['ratio']:.2f} ("
                     f"{verdict(t['ratio'] >= TARGETS['tokenize'])}, >= 0.9; tokens per CPU-second "
                     f"{t['cpu_ratio']:.2f}); raw tiktoken on one core alone {t['raw_tokens_per_s_core'] / 1e6:.2f} "
                     f"M tok/s")
    if "loader" in res:
        for seq_len, r in res["loader"].items():
            worst = max(r.get("wait_fraction_tiny_cpu", 0.0), r["wait_fraction_14b_h100"])
            tiny = (f", {100 * r['wait_fraction_tiny_cpu']:.3f}% of the tiny CPU step"
                    if "wait_fraction_tiny_cpu" in r else "")
            lines.append(f"loader {seq_len}: {r['batches_per_s']:,.0f} batches/s "
                         f"({r['tokens_per_s'] / 1e6:.1f} M tok/s); "
                         f"data wait {100 * r['wait_fraction_14b_h100']:.3f}% of a 14B H100 step{tiny} "
                         f"({verdict(worst < TARGETS['loader'])}, < 1%)")
    if "mfu" in res:
        f = res["mfu"]
        rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in f["gemm_flops"].items())
        parts = [f"{k} {v['flops'] / 1e9:.0f} GFLOP/s = {100 * v['mfu']:.0f}%" for k, v in f.items()
                 if isinstance(v, dict) and "mfu" in v]
        lines.append(f"MFU (fp32 GEMM {f['gemm_n']}^3: {rates} GFLOP/s): " + "; ".join(parts))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES), metavar="NAME",
                   help=f"benchmarks to run, of {', '.join(BENCHES)} (default: all)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (medians are reported)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunk", type=int, default=ModelConfig.loss_chunk_tokens, help="ours: loss_chunk_tokens")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled-blocks variant")
    p.add_argument("--ablation", action="store_true", help="also time ours without oneDNN, and without the fused loss")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top ops of both steps")
    p.add_argument("--mem-batch", type=int, default=1)
    p.add_argument("--mem-seq", type=int, default=4096)
    p.add_argument("--text-dir", default=os.path.dirname(os.__file__), help="tokenize: folder of .py files")
    p.add_argument("--text-mb", type=float, default=8.0)
    p.add_argument("--loader-tokens", type=int, default=20_000_000, help="loader: size of the synthetic source")
    p.add_argument("--loader-batches", type=int, default=200)
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--memory-child", choices=("ours", "ours_plain", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("repeats", "threads", "batch", "seq", "chunk", "mem_batch", "mem_seq", "loader_batches", "gemm_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.mem_batch, args.mem_seq, args.threads)))
        return 0
    res = {"machine": machine_facts(), "args": vars(args)}
    if "step" in args.only or "mfu" in args.only:
        res["step"] = bench_step(args)
    if "mfu" in args.only:
        res["mfu"] = bench_mfu(args, res["step"])
    if "memory" in args.only:
        res["memory"] = bench_memory(args)
    if "tokenize" in args.only:
        res["tokenize"] = bench_tokenize(args)
    if "loader" in args.only:
        res["loader"] = bench_loader(args, res.get("step"))
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    for name, table in res.get("step", {}).get("profile", {}).items():
        print(f"--- profile: {name} ---\n{table}")
    print(summary(res))
    if args.json:
        atomic_write(args.json, json.dumps(res, indent=2, default=str))
    return 0
