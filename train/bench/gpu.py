"""One-GPU benchmark: tokens/s, TFLOP/s, MFU and peak memory of a bf16 training step, against the planner.

    python -m train.bench.gpu [--models 1b proxy14b] [--seqs 4096 16384] [--ac off on 2] [--doc-len 0 2048] [--json out.json]

Models: `1b` (configs/model/1b.yaml), `proxy14b` (the Phi-4 14B shape with 4 of its 40 layers: hidden 5120, 40/10
heads, FFN 17,920, full vocabulary; per-layer cost and the LM head are those of the real model), or a path to a model
YAML. Each row is one (model, sequence length, activation checkpointing) layout: bf16 weights and gradients, an fp32
master copy with fused AdamW and an fp32 gradient copy (the model states of DeepSpeed's bf16 optimizer on one GPU:
2 + 2 + 12 + 4 bytes per parameter), the fused chunked loss, flash-attn when installed (else PyTorch SDPA).
--doc-len L packs documents of L tokens into each row (the last one cut at the row's end) with document masking, as
the trainer does: flash-attn varlen, else PyTorch's own varlen kernel, else SDPA with a block-diagonal mask; the
`attn` column names the kernel that ran. FLOPs count attention over the whole window either way (the trainer's
convention), so a packed row's MFU is comparable with the unpacked one at the same window.
MFU = flops_per_token x tokens/s / the dense bf16 peak of the GPU (NVIDIA datasheet; --peak-tflops overrides).
Peak memory is torch.cuda.max_memory_allocated over the timed steps, next to the planner's prediction
(train/plan.py: ZeRO-0 model states + activations + loss buffers; its reserve and buckets are not allocations).
Targets on an H100: MFU >= 45% at 4K and >= 40% at 16K (llm-foundry's 13B: 41.6% and 35.6%).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from data.fileio import atomic_write
from model.config import ModelConfig
from model import transformer as transformer_module
from model.transformer import Transformer
from train.config import REPO_ROOT, RunConfig, load_config

GIB = 2**30
MFU_TARGETS = {4096: 0.45, 16384: 0.40}  # H100 targets (llm-foundry 13B reached 41.6% / 35.6% at 4K / 16K)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_config(name: str, seq_len: int, doc_len: int = 0) -> ModelConfig:
    """A named preset or a model YAML, with max_seq_len set to the benchmark's sequence length."""
    if name == "proxy14b":
        cfg = ModelConfig(n_layers=4)
    else:
        path = REPO_ROOT / "configs" / "model" / f"{name}.yaml" if name == "1b" else Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--models {name}: no such preset or model YAML ({path})")
        cfg = load_config(path, schema=ModelConfig)
    cfg.max_seq_len = seq_len
    cfg.doc_masking = 0 < doc_len < seq_len  # else one document per row: plain causal attention
    return cfg


def packed_cu_seqlens(batch: int, seq_len: int, doc_len: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Document starts over the flattened batch for rows of doc_len-token documents (the last cut at the row end)."""
    starts = [r * seq_len + s for r in range(batch) for s in range(0, seq_len, doc_len)] + [batch * seq_len]
    return torch.tensor(starts, dtype=torch.int32, device=device), min(doc_len, seq_len)


def planned_bytes(cfg: ModelConfig, seq_len: int, micro_batch: int, checkpointing: bool) -> dict:
    """The planner's per-GPU prediction for this layout on one GPU (ZeRO-0), without its reserve and buckets."""
    from train import plan

    run = RunConfig()
    run.model = cfg
    run.train.seq_len, run.train.micro_batch = seq_len, micro_batch
    states = plan.model_state_bytes(cfg.num_params(), plan.largest_module_params(run), zero=0, nd=1)
    out = {"model_states": sum(states.values()), "activations": plan.activation_bytes(run, checkpointing),
           "loss": sum(plan.loss_bytes(run).values())}
    out["total"] = sum(out.values())
    return out


class MixedPrecisionAdamW:
    """bf16 model, fp32 master weights + AdamW states + gradient copy: DeepSpeed's bf16 optimizer on one GPU."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-4):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        fused = all(p.device.type in ("cuda", "cpu") for p in self.master)
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)

    def step(self) -> None:
        for m, p in zip(self.master, self.params):
            m.grad = p.grad.float()  # the fp32 gradient copy
            p.grad = None
        self.opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)  # fp32 -> bf16
        for m in self.master:
            m.grad = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_layout(name: str, seq_len: int, doc_len: int, ac: str, args, device: torch.device,
               peak_flops: float) -> dict:
    """Build, warm up and time one layout; returns one table row (a dict of plain values).
    ac: off | on (every block) | N (every N-th block)."""
    cfg = model_config(name, seq_len, doc_len)
    checkpointing = ac != "off"
    cfg.activation_checkpointing, cfg.checkpoint_every = checkpointing, int(ac) if ac.isdigit() else 1
    cfg.attn_backend = args.attn
    micro_batch = args.micro_batch or max(1, args.tokens_per_step // seq_len)
    tokens = micro_batch * seq_len
    row = {"model": Path(name).stem, "seq_len": seq_len, "micro_batch": micro_batch, "ac": checkpointing,
           "ac_every": cfg.checkpoint_every, "doc_len": doc_len if cfg.doc_masking else 0,
           "attn": transformer_module.attention_kernel(args.attn, device, DTYPES[args.dtype], cfg.doc_masking),
           "params": cfg.num_params(), "flops_per_token": cfg.flops_per_token(seq_len),
           "planned_bytes": planned_bytes(cfg, seq_len, micro_batch, checkpointing)}
    model = optimizer = None
    try:
        torch.manual_seed(0)
        with device:  # built and initialised on the GPU: seconds, not minutes of CPU init for billions of weights
            model = Transformer(cfg)
        model = model.to(dtype=DTYPES[args.dtype]).train()
        if args.compile:
            for layer in model.layers:
                layer.compile()
        optimizer = MixedPrecisionAdamW(model)
        x = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len), device=device)
        labels = torch.roll(x, -1, dims=1)
        labels[:, -1] = -100
        packing = {}
        if cfg.doc_masking:
            cu, longest = packed_cu_seqlens(micro_batch, seq_len, doc_len, device)
            packing = {"cu_seqlens": cu, "max_seqlen": longest}
            labels.view(-1)[cu[1:-1].long() - 1] = -100  # no loss across a document boundary

        def step() -> float:
            loss = model(x, labels=labels, **packing)
            loss.backward()
            optimizer.step()
            return loss

        for _ in range(args.warmup):
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        seconds = (time.perf_counter() - t0) / args.steps
        row.update(status="ok", step_s=seconds, loss=float(loss.detach()), tokens_per_s=tokens / seconds)
        row["tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
        row["mfu"] = row["tflops"] * 1e12 / peak_flops
        if device.type == "cuda":
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            row["peak_vs_plan"] = row["peak_bytes"] / row["planned_bytes"]["total"]
    except torch.OutOfMemoryError as e:
        row.update(status="OOM", error=str(e).splitlines()[0])
    finally:
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def target_verdict(row: dict, gpu_name: str) -> str:
    target = MFU_TARGETS.get(row["seq_len"])
    if (row.get("status") != "ok" or target is None or "H100" not in gpu_name or row["model"] != "proxy14b"
            or row.get("doc_len")):  # the targets are for one document per row, as llm-foundry measures
        return ""
    return f">= {100 * target:.0f}%: " + ("met" if row["mfu"] >= target else "NOT MET")


def format_table(rows: list[dict], gpu_name: str, peak_flops: float) -> str:
    head = (f"{'model':10s} {'seq':>6s} {'doc':>6s} {'mb':>3s} {'AC':>4s} {'attn':>6s} {'tok/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
            f"{'peak GiB':>9s} {'plan GiB':>9s} {'meas/plan':>9s}  target")
    lines = [f"device: {gpu_name}, peak {peak_flops / 1e12:.3g} TFLOP/s (MFU denominator)", head, "-" * len(head)]
    for r in rows:
        plan_gib = r["planned_bytes"]["total"] / GIB
        doc = str(r.get("doc_len") or "-")
        every = r.get("ac_every", 1)
        ac = "off" if not r["ac"] else ("on" if every == 1 else f"1/{every}")
        lead = (f"{r['model']:10s} {r['seq_len']:6d} {doc:>6s} {r['micro_batch']:3d} {ac:>4s} "
                f"{r['attn']:>6s} ")
        if r.get("status") != "ok":
            lines.append(lead + f"{r.get('status', '?'):>9s} {'':8s} {'':6s} {'':9s} {plan_gib:9.1f}")
            continue
        peak = f"{r['peak_bytes'] / GIB:9.1f}" if "peak_bytes" in r else f"{'-':>9s}"
        ratio = f"{r['peak_vs_plan']:9.2f}" if "peak_vs_plan" in r else f"{'-':>9s}"
        lines.append(lead + f"{r['tokens_per_s']:9,.0f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {peak} "
                     f"{plan_gib:9.1f} {ratio}  {target_verdict(r, gpu_name)}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["1b", "proxy14b"], help="1b | proxy14b | path to a model YAML")
    p.add_argument("--seqs", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--ac", nargs="+", default=["off", "on"],
                   help="activation checkpointing: off | on (every block) | N (every N-th block, N >= 2)")
    p.add_argument("--doc-len", nargs="+", type=int, default=[0],
                   help="pack documents of this many tokens per row, with document masking (0: one per row)")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="micro batch = this / seq_len (at least 1)")
    p.add_argument("--micro-batch", type=int, default=0, help="fixed micro batch (overrides --tokens-per-step)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attn", choices=("flash", "sdpa"), default="flash", help="flash falls back to SDPA if missing")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (as train.compile)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak (default: datasheet)")
    p.add_argument("--device", default="cuda", help="cuda (default) | cuda:N | cpu (plumbing check only)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    bad_ac = [a for a in args.ac if a not in ("off", "on") and not (a.isdigit() and int(a) >= 2)]
    if bad_ac:
        p.error(f"--ac takes off, on or an integer N >= 2 (every N-th block), got {bad_ac}")
    if any(d < 0 for d in args.doc_len):
        p.error(f"--doc-len must be >= 0, got {args.doc_len}")
    for name in ("tokens_per_step", "steps", "warmup", "micro_batch"):
        if getattr(args, name) < (0 if name in ("warmup", "micro_batch") else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(s < 2 for s in args.seqs):
        p.error(f"--seqs must be >= 2, got {args.seqs}")
    return args


def main(argv=None) -> int:
    from train.metrics import peak_tflops

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible (this benchmark needs one GPU; --device cpu checks the plumbing only)",
              file=sys.stderr)
        return 2
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = peak_tflops(args.peak_tflops, device) * 1e12
    rows = []
    for name in args.models:
        for seq_len in args.seqs:
            for doc_len in args.doc_len:
                for ac in args.ac:
                    rows.append(run_layout(name, seq_len, doc_len, ac, args, device, peak_flops))
                    progress = {k: v for k, v in rows[-1].items() if k != "planned_bytes"}
                    print(json.dumps(progress), file=sys.stderr, flush=True)  # stdout keeps the one table
    print(format_table(rows, gpu_name, peak_flops))
    if args.json:
        atomic_write(args.json, json.dumps({"device": gpu_name, "peak_flops": peak_flops, "torch": torch.__version__,
                                            "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
