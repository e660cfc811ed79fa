"""CPU benchmarks, ours against the peer in the same command: medians of interleaved repeats and their ratio.

    python -m train.bench [--only step memory tokenize loader mfu] [--json out.json] [--repeats N] [--profile]

step      forward + backward + AdamW of our Transformer vs transformers' Phi3ForCausalLM (same shape, same weights,
          same batch, same threads, fp32, SDPA, fused AdamW as HF Trainer's default): tokens/s, ours eager and with
          each block compiled (compile time reported, excluded from the steady state).  Target: ours >= 1.5x HF.
memory    peak resident memory of one training step at 4,096 tokens, each model in a fresh subprocess (Linux VmHWM,
          reset before the step): ours (fused loss + activation checkpointing) vs HF.  Target: <= 0.5x HF.
tokenize  data.prepare (read + tokenize + write shards) vs raw tiktoken encode_ordinary_batch, same text and threads.
          Target: >= 0.9x.
loader    MixtureLoader batches/s at 4K and 16K windows, and the data wait as a share of a training step (the tiny
          model's, and the 14B step at 40% MFU on an H100 from the planner's formula).  Target: < 1%.
mfu       achieved FLOP/s of the training step (ModelConfig.flops_per_token x tokens/s) against the best fp32 GEMM
          rate measured in the same run (MKL and oneDNN): the CPU stand-in for MFU.
The GPU counterpart is `python -m train.bench.gpu`.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from data.fileio import atomic_write
from model.config import ModelConfig
from model.transformer import Transformer
from train.metrics import gemm_rate

BENCHES = ("step", "memory", "tokenize", "loader", "mfu")
# Phi-4 ratios at toy size (perf-reliability.md A5): head_dim 32, 4 query heads per KV head, FFN 3.5 d, full vocab.
TINY = dict(vocab_size=100_352, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=896)
TARGETS = {"step": 1.5, "memory": 0.5, "tokenize": 0.9, "loader": 0.01}
H100_BF16_FLOPS, PLAN_MFU = 989e12, 0.40  # perf-reliability.md A2; the planner's default MFU


# ---- machine facts and timing ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict:
    import transformers

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def interleaved(fns: dict, repeats: int) -> dict[str, dict]:
    """Wall and CPU seconds of each callable, run in turn `repeats` times (ABAB...) so drift hits all alike."""
    runs = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            runs[name]["wall_s"].append(time.perf_counter() - w0)
            runs[name]["cpu_s"].append(time.process_time() - c0)
    for r in runs.values():
        r["median_wall_s"] = statistics.median(r["wall_s"])
        r["median_cpu_s"] = statistics.median(r["cpu_s"])
    return runs


# ---- the models ---------------------------------------------------------------------------------------------

def tiny_config(seq_len: int, **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, "max_seq_len": seq_len, "doc_masking": False, **overrides})


def hf_twin(model: Transformer):
    """transformers' Phi3ForCausalLM of the same shape holding the same weights (SDPA attention, fp32)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from train.export.hf import hf_key_map

    c = model.cfg
    hf_cfg = Phi3Config(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len,
                        original_max_position_embeddings=c.max_seq_len, rope_theta=c.rope_theta,
                        tie_word_embeddings=False, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    hf = Phi3ForCausalLM(hf_cfg)
    ours = model.state_dict()
    hf.load_state_dict({hf_name: ours[our_name].clone() for hf_name, our_name in hf_key_map(c.n_layers).items()})
    return hf


def make_batch(cfg: ModelConfig, batch: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g)
    labels = x.roll(-1, dims=1)  # ours takes shifted labels; HF shifts `input_ids` itself
    labels[:, -1] = -100
    return x, labels


def train_step_fn(model, x, labels, hf: bool):
    """One optimizer step; returns a closure giving the loss (python float)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)  # HF Trainer's default

    def step() -> float:
        loss = model(input_ids=x, labels=x).loss if hf else model(x, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


# ---- 1. training step vs Hugging Face -----------------------------------------------------------------------

def bench_step(args) -> dict:
    torch.manual_seed(0)
    ours = Transformer(tiny_config(args.seq, loss_chunk_tokens=args.chunk)).train()
    hf = hf_twin(ours).train()
    x, labels = make_batch(ours.cfg, args.batch, args.seq)
    with torch.no_grad():  # same weights, same data: the same loss, or the comparison is void
        loss_ours, loss_hf = ours(x, labels=labels).item(), hf(input_ids=x, labels=x).loss.item()
    if abs(loss_ours - loss_hf) > 1e-3:
        raise RuntimeError(f"ours and HF disagree before training: loss {loss_ours:.5f} vs {loss_hf:.5f}")
    fns = {"ours": train_step_fn(ours, x, labels, hf=False), "hf": train_step_fn(hf, x, labels, hf=True)}
    if args.ablation:  # what each switch buys: the loss matmuls through BLAS, then no fused loss at all
        for name, overrides in (("ours_blas", dict(onednn_loss=False)), ("ours_plain_loss", dict(loss_chunk_tokens=0))):
            twin = Transformer(tiny_config(args.seq, **{"loss_chunk_tokens": args.chunk, **overrides})).train()
            twin.load_state_dict(ours.state_dict())
            fns[name] = train_step_fn(twin, x, labels, hf=False)
    compile_s = None
    if args.compile:
        compiled = copy.deepcopy(ours)
        for layer in compiled.layers:  # as train.compile does
            layer.compile()
        fns["ours_compiled"] = train_step_fn(compiled, x, labels, hf=False)
        t0 = time.perf_counter()
        fns["ours_compiled"]()
        compile_s = time.perf_counter() - t0
    for fn in fns.values():
        fn()  # warm-up: optimizer states, allocator, compiled graphs
    runs = interleaved(fns, args.repeats)
    tokens = args.batch * args.seq
    out = {"batch": args.batch, "seq_len": args.seq, "tokens_per_step": tokens, "loss_chunk_tokens": args.chunk,
           "initial_loss": {"ours": loss_ours, "hf": loss_hf}, "compile_s": compile_s, "runs": runs}
    for name, r in runs.items():
        out[f"{name}_tokens_per_s"] = tokens / r["median_wall_s"]
    out["ratio"] = out["ours_tokens_per_s"] / out["hf_tokens_per_s"]
    out["cpu_ratio"] = runs["hf"]["median_cpu_s"] / runs["ours"]["median_cpu_s"]
    for name in runs:
        if name not in ("ours", "hf"):
            out[f"ratio_{name.removeprefix('ours_')}"] = out[f"{name}_tokens_per_s"] / out["hf_tokens_per_s"]
    if args.profile:
        out["profile"] = {name: profile_table(fns[name]) for name in ("ours", "hf")}
    return out


def profile_table(step, rows: int = 15) -> str:
    """torch.profiler's top ops of one step, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows,
                                                              max_name_column_width=40, max_shapes_column_width=60)


# ---- 2. peak memory of a step, one fresh process per model ---------------------------------------------------

def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakRSS:
    """Peak resident set size over a block: Linux VmHWM reset through /proc/self/clear_refs, else 1 ms sampling."""

    def __enter__(self):
        gc.collect()  # garbage freed inside the block would hide growth below the starting point
        self.base = _status_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.sampler = None
        except OSError:
            self.peak, self.stop = self.base, threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)

    def __exit__(self, *exc):
        if self.sampler is None:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self.stop.set()
            self.sampler.join()
        self.growth = self.peak - self.base


def memory_child(which: str, batch: int, seq_len: int, threads: int) -> dict:
    """Runs inside the subprocess: build one model, warm up one step, then measure the next step's peak RSS."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = which == "ours"  # "ours_plain": no checkpointing and full fp32 logits, to show what the switches save
    chunk = ModelConfig.loss_chunk_tokens if ours else 0
    model = Transformer(tiny_config(seq_len, activation_checkpointing=ours, loss_chunk_tokens=chunk))
    if which == "hf":
        model = hf_twin(model)  # our copy is dropped here: only HF's weights stay resident
    model.train()
    x, labels = make_batch(tiny_config(seq_len), batch, seq_len)
    step = train_step_fn(model, x, labels, hf=which == "hf")
    step()  # optimizer states exist from here on
    with PeakRSS() as peak:
        step()
    return {"model": which, "tokens": batch * seq_len, "base_rss_bytes": peak.base, "peak_rss_bytes": peak.peak,
            "step_growth_bytes": peak.growth}


def bench_memory(args) -> dict:
    out = {"batch": args.mem_batch, "seq_len": args.mem_seq}
    for which in ("ours", "ours_plain", "hf"):
        cmd = [sys.executable, "-m", "train.bench", "--memory-child", which, "--mem-batch", str(args.mem_batch),
               "--mem-seq", str(args.mem_seq), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {which} failed:\n{proc.stderr[-2000:]}")
        out[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["ours"]["step_growth_bytes"] / out["hf"]["step_growth_bytes"]
    out["ratio_total_peak"] = out["ours"]["peak_rss_bytes"] / out["hf"]["peak_rss_bytes"]
    return out


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
    from data.prepare import measure_throughput

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


# ---- 5. MFU on CPU --------------------------------------------------------------------------------------------

def bench_mfu(args, step: dict) -> dict:
    from model.loss import onednn_available

    rates = {"mkl_blas": gemm_rate(args.gemm_n, False)}
    if onednn_available():
        rates["onednn"] = gemm_rate(args.gemm_n, True)
    peak = max(rates.values())
    flops_token = tiny_config(args.seq).flops_per_token(args.seq)
    out = {"gemm_n": args.gemm_n, "gemm_flops": rates, "peak_flops": peak, "flops_per_token": flops_token}
    for key in [k for k in step if k.endswith("_tokens_per_s")]:  # ours, hf, and any variant timed
        achieved = flops_token * step[key]
        out[key.removesuffix("_tokens_per_s")] = {"flops": achieved, "mfu": achieved / peak}
    return out


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
        lines.append(f"tokenize ({t['bytes'] / 1e6:.1f} MB, {t['workers']} threads): data.prepare "
                     f"{t['prepare_tokens_per_s'] / 1e6:.2f} M tok/s, raw tiktoken {t['raw_tokens_per_s'] / 1e6:.2f} "
                     f"M tok/s, ratio {t['ratio']:.2f} (CPU-time ratio {t['cpu_ratio']:.2f}; "
                     f"{verdict(t['ratio'] >= TARGETS['tokenize'])}, >= 0.9)")
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
