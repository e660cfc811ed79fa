"""Benchmarks of a training step on CPU: ours vs transformers' Phi3ForCausalLM (tokens/s, peak memory, MFU against
the measured GEMM rate). Run through `python -m train.bench`."""
from __future__ import annotations

import copy
import gc
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from train.bench.timing import interleaved
from train.config import REPO_ROOT
from train.metrics import gemm_rate

# Phi-4 ratios at toy size: head_dim 32, 4 query heads per KV head, FFN 3.5 d, full vocab.
TINY = dict(vocab_size=100_352, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=896)


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
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {which} failed:\n{proc.stderr[-2000:]}")
        out[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["ours"]["step_growth_bytes"] / out["hf"]["step_growth_bytes"]
    out["ratio_total_peak"] = out["ours"]["peak_rss_bytes"] / out["hf"]["peak_rss_bytes"]
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
