"""Planner: memory per GPU and training time of a stage, or of a whole recipe, before any GPU is booked.

    python -m train.plan <stage.yaml> [key=value ...] --gpus N [--gpu h100-80gb] [--mfu 0.40] [--json]
    python -m train.plan <recipe.yaml> [key=value ...] --gpus N      # one row per training stage, and the total

Memory per GPU (bytes; printed in GiB, as DeepSpeed's estimators and nvidia-smi do), Psi = parameters, Nd = GPUs:
- Model states, bf16 mixed precision with Adam, the ZeRO paper's 16 Psi (arXiv 1910.02054 section 3):
  16-bit params 2 Psi (ZeRO-3: / Nd), 16-bit grads 2 Psi (ZeRO-2/3: / Nd), optimizer states 12 Psi / Nd (fp32 master
  + Adam m, v; ZeRO-0: not divided). Hence ZeRO-1 = 4 Psi + 12 Psi/Nd, ZeRO-2 = 2 Psi + 14 Psi/Nd, ZeRO-3 = 16 Psi/Nd.
  DeepSpeed also holds an fp32 copy of its gradient partition for the optimizer step (4 Psi/Nd; ZeRO-0's bf16
  optimizer keeps 4 Psi of fp32 gradient accumulators), and ZeRO-3 gathers the 16-bit params and grads of the
  largest module at once (4 bytes x its params; ours is the embedding or the LM head, V x d). With these two rows
  the totals are DeepSpeed's own estimates: ZeRO-2 = 2 Psi + 18 Psi/Nd exactly (`estimate_zero2_...`); ZeRO-3 =
  20 Psi/Nd + 4 largest, 2 Psi/Nd above `estimate_zero3_...` (18 Psi/Nd), which does not count the fp32 gradient
  copy that stage3.py makes for the optimizer step. Offloading the optimizer moves optimizer states, fp32 grads and
  (ZeRO-2/3) 16-bit grad partitions to CPU; offloading params (ZeRO-3) also moves the 16-bit param partition.
- Activations: what our block keeps for backward, tensor by tensor (`layer_activation_bytes_per_token`; bf16), in
  place of Korthikanti et al.'s GPT-with-dropout 34 s b h. Flash/SDPA attention never stores the a x s x s scores.
  For Phi-4 that is 36.7 s b h per layer with `model.lean_activations` (the default) and 51.7 without;
  tests/test_plan.py measures the tensors autograd really saves and holds the formula to them. With full
  checkpointing: the 2 s b h input of every layer plus one layer's working set recomputed in backward.
- Loss: the fused chunked cross-entropy (model/loss.py) holds one chunk of logits (chunk x V, bf16 product + fp32
  copy = 6 bytes each) plus its gradient buffers: the fp32 LM-head gradient accumulator (4 V d), its 16-bit copy
  saved for backward (2 V d) and dL/dh (2 b s d). The plain path (loss_chunk_tokens=0) holds b s V x 10 bytes
  (bf16 logits, fp32 upcast, fp32 log-softmax saved for backward).
- Communication buckets: DeepSpeed's reduce (and ZeRO-1/2 all-gather) buckets, 2 bytes x bucket elements; ZeRO-3
  prefetch bucket; the values deepspeed_config writes (train/config.py `zero_comm_settings`: h^2 and 0.9 h^2).
- Reserve (--reserve-gib, default 4): CUDA context, NCCL buffers and allocator fragmentation. ASSUMPTION.

Communication time per step (`comm_time`), ring collectives over the Nd data-parallel ranks: an all-gather or a
reduce-scatter of M bytes moves (Nd - 1) / Nd x M bytes through every GPU, an all-reduce twice that; time = bytes /
bus bandwidth. Everything goes in bf16, 2 bytes per element (ASSUMPTION: DeepSpeed communicates in the 16-bit model
dtype, engine.py `communication_data_type`, unless the config sets one; ours sets none).
- ZeRO-3: every micro-step all-gathers the 16-bit params in forward and again in backward, and reduce-scatters the
  gradients in backward (stage3.py reduces each micro-step into the partitioned gradients): 3 x (Nd-1)/Nd x 2 Psi
  bytes per micro-step, x grad accumulation per step (the ZeRO paper's 3 Psi, per micro-step).
- ZeRO-2: reduce-scatter of the gradients every micro-step; once per step the all-gather of the updated params.
- ZeRO-1: gradients reduced once per step, at the accumulation boundary (stage_1_and_2.py), then the param all-gather.
- ZeRO-0: one all-reduce of the gradients per step, at the boundary.
Bandwidth: `INTERCONNECT` (ASSUMPTION, one place): NVLink within a node; a ring over more than one node runs at the
node's InfiniBand bandwidth shared by its GPUs. Overlap: with overlap_comm (ZeRO-3's derived default) communication
runs beside compute and only what exceeds the hideable compute is exposed; hideable = the whole step's compute for
ZeRO-2/3 (their collectives are spread over every micro-step), the last micro-step's backward (2/3 of it) for
ZeRO-0/1. Without overlap_comm all of it is exposed. Step time with communication = compute + exposed; `days` stays
compute-only, `days_with_comm` adds the exposed time.

Time: FLOPs per token F = 6 N_nonemb + 12 L n_heads d_head s (`ModelConfig.flops_per_token`, PaLM App. B; no recompute
counted); tokens/s/GPU = peak x MFU / F; step time = global_batch x seq_len / (tokens/s/GPU x Nd). DPO adds one
reference forward per token (F / 3) for the cached reference log-probs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from train.config import REPO_ROOT, STAGES, ZERO12_BUCKET, ConfigError, RunConfig, load_config, zero_comm_settings
from train.metrics import GPU_PEAK_TFLOPS

GIB = 2**30
# name -> (usable memory in GiB as torch.cuda reports it, dense bf16 peak TFLOP/s)
GPUS = {
    "h100-80gb": (79.2, GPU_PEAK_TFLOPS["H100"]),
    "h200": (139.7, GPU_PEAK_TFLOPS["H200"]),
    "a100-80gb": (79.2, GPU_PEAK_TFLOPS["A100"]),
    "a100-40gb": (39.4, GPU_PEAK_TFLOPS["A100"]),
}
# ASSUMPTION: bus bandwidth per GPU (GB/s, as nccl-tests reports busbw) within a node (NVLink) and, for a ring that
# spans nodes, the node's InfiniBand share per GPU: H100/H200 SXM, NVLink 4 at 450 GB/s per direction, 8 x 400 Gb/s
# NDR per node = 400 GB/s = 50 GB/s per GPU; A100 SXM, NVLink 3 at 300 GB/s, 8 x 200 Gb/s HDR = 25 GB/s per GPU.
INTERCONNECT = {  # gpu -> (GPUs per node, intra-node GB/s per GPU, inter-node GB/s per GPU)
    "h100-80gb": (8, 450.0, 50.0),
    "h200": (8, 450.0, 50.0),
    "a100-80gb": (8, 300.0, 25.0),
    "a100-40gb": (8, 300.0, 25.0),
}
COMM_BYTES_PER_ELEMENT = 2  # bf16 collectives
ACT_BYTES_AC = 2  # x s b h per layer: the checkpointed block input, 16-bit
PHI4_PARAMS = 14_659_507_200
TRAIN_KINDS = ("train",) + STAGES  # recipe stage kinds that run the trainer
PAPER_DAYS, PAPER_GPUS = 21.0, 1920  # HF model card microsoft/phi-4: 1920 H100-80G, 21 days, 9.8T tokens


@dataclass
class Hardware:
    gpu: str
    gpus: int
    mfu: float
    reserve_gib: float

    @property
    def capacity_bytes(self) -> float:
        return GPUS[self.gpu][0] * GIB

    @property
    def peak_flops(self) -> float:
        return GPUS[self.gpu][1] * 1e12


def largest_module_params(cfg) -> int:
    """Params of the largest single module (DeepSpeed's `largest_layer_params`): embedding/LM head or a matrix."""
    m = cfg.model
    kv = m.n_kv_heads * m.head_dim
    return max(m.vocab_size * m.dim, m.dim * (m.dim + 2 * kv), 2 * m.ffn_dim * m.dim)


def model_state_bytes(psi: int, largest: int, zero: int, nd: int, offload_optimizer: bool = False,
                      offload_params: bool = False) -> dict[str, float]:
    """Per-GPU bytes of params, grads, optimizer states, DeepSpeed's fp32 grad copy and ZeRO-3's gathered layer."""
    params = 2 * psi / nd if zero == 3 else 2 * psi
    grads = 2 * psi / nd if zero >= 2 else 2 * psi
    optim = 12 * psi / nd if zero >= 1 else 12 * psi
    fp32_grads = 4 * psi / nd if zero >= 1 else 4 * psi
    if offload_optimizer:
        optim = fp32_grads = 0.0
        if zero >= 2:
            grads = 0.0  # reduced partitions land in pinned CPU memory
    if offload_params:
        params = 0.0
    gathered = 4 * largest if zero == 3 else 0.0  # 16-bit params + grads of the largest module, gathered
    return {"params_16bit": params, "grads_16bit": grads, "optimizer_states": optim,
            "fp32_grad_copy": fp32_grads, "zero3_gathered_layer": gathered}


def layer_activation_bytes_per_token(m) -> float:
    """Bytes one block keeps for backward per token, bf16 activations (h = dim, kv = KV width, f = FFN width):
    RMSNorm x 2: its input (2h) and 1/rms (4), plus the output the next matmul keeps (2h); plain autograd keeps an
    fp32 copy of the input (4h) and the normalised tensor (2h) in place of the input. Attention: the fused QKV output (2(h + 2kv), V is
    a view of it), rotated q (2h) and k (2kv), RoPE cos/sin cast to bf16 (4 x 2 hd), the fp32 log-sum-exp per head
    (4 n_heads), the output projection's input (2h). SwiGLU: gate|up (4f) and the down projection's input (2f);
    plain autograd also keeps silu(gate) (2f)."""
    h, kv, f = m.dim, m.n_kv_heads * m.head_dim, m.ffn_dim
    attention = 2 * (h + 2 * kv) + 2 * h + 2 * kv + 8 * m.head_dim + 4 * m.n_heads + 2 * h
    norm = 2 * h + 4 + 2 * h + (0 if m.lean_activations else 4 * h)
    mlp = 6 * f + (0 if m.lean_activations else 2 * f)
    return attention + 2 * norm + mlp


def activation_bytes(cfg, checkpointing: bool) -> float:
    m, t = cfg.model, cfg.train
    tokens = t.seq_len * t.micro_batch
    one_layer = tokens * layer_activation_bytes_per_token(m)
    if checkpointing:  # checkpointed blocks keep their input; the others everything; plus one block's recompute
        n_ckpt = math.ceil(m.n_layers / m.checkpoint_every)
        return ACT_BYTES_AC * tokens * m.dim * n_ckpt + one_layer * (m.n_layers - n_ckpt) + one_layer
    return one_layer * m.n_layers


def loss_bytes(cfg) -> dict[str, float]:
    m, t = cfg.model, cfg.train
    tokens = t.seq_len * t.micro_batch
    if m.loss_chunk_tokens <= 0:
        return {"logits": 10.0 * tokens * m.vocab_size, "loss_grad_buffers": 0.0}
    chunk = min(m.loss_chunk_tokens, tokens)
    return {"logits": 6.0 * chunk * m.vocab_size,
            "loss_grad_buffers": 6.0 * m.vocab_size * m.dim + 2.0 * tokens * m.dim}


def comm_bytes(cfg) -> float:
    """Bucket memory: 2 bytes x the reduce bucket plus the all-gather (ZeRO-1/2) or prefetch (ZeRO-3) bucket, as
    deepspeed_config sets them (`zero_comm_settings`); ZeRO-0 (the engine's all-reduce): one 200M-element bucket."""
    z = zero_comm_settings(cfg)
    if cfg.deepspeed.zero_stage == 0:
        return 2.0 * ZERO12_BUCKET
    gather = z["allgather_bucket_size"] if cfg.deepspeed.zero_stage in (1, 2) else z["stage3_prefetch_bucket_size"]
    return 2.0 * (z["reduce_bucket_size"] + gather)


def bus_bandwidth(gpu: str, nd: int) -> tuple[float, str]:
    """(bytes/s per GPU, which link) of a ring over nd GPUs: NVLink within one node, else the InfiniBand share."""
    per_node, intra, inter = INTERCONNECT[gpu]
    if nd <= per_node:
        return intra * 1e9, f"NVLink {intra:.0f} GB/s per GPU"
    return inter * 1e9, f"InfiniBand {inter:.0f} GB/s per GPU ({inter * per_node:.0f} GB/s per {per_node}-GPU node)"


def comm_volume(psi: int, zero: int, nd: int, accum: int) -> dict[str, float]:
    """Bytes through each GPU per optimizer step, by collective (ring: (nd-1)/nd of the payload each)."""
    ring = (nd - 1) / nd
    payload = COMM_BYTES_PER_ELEMENT * psi  # the whole model in bf16
    if zero == 3:
        return {"param_all_gather": 2 * accum * ring * payload, "grad_reduce_scatter": accum * ring * payload}
    if zero == 2:
        return {"param_all_gather": ring * payload, "grad_reduce_scatter": accum * ring * payload}
    if zero == 1:
        return {"param_all_gather": ring * payload, "grad_reduce_scatter": ring * payload}
    return {"grad_all_reduce": 2 * ring * payload}


def comm_time(psi: int, zero: int, nd: int, accum: int, gpu: str, compute_s: float, overlap: bool) -> dict:
    """Communication per step: bytes per GPU, seconds at the bus bandwidth, and what overlap leaves exposed."""
    volume = comm_volume(psi, zero, nd, accum)
    bandwidth, link = bus_bandwidth(gpu, nd)
    seconds = sum(volume.values()) / bandwidth if nd > 1 else 0.0
    hideable = compute_s if zero in (2, 3) else compute_s / accum * 2.0 / 3.0
    exposed = max(0.0, seconds - hideable) if overlap else seconds
    return {"bytes_per_gpu": volume, "bandwidth_bytes_per_s": bandwidth, "link": link, "comm_s": seconds,
            "overlap_comm": overlap, "hideable_s": hideable if overlap else 0.0, "exposed_s": exposed}


def usable_gpus(global_batch: int, micro_batch: int, gpus: int) -> int:
    """The most data-parallel ranks <= gpus that the global batch divides into (global = micro x ranks x accum)."""
    sequences = global_batch // micro_batch if global_batch % micro_batch == 0 else 0
    return max((n for n in range(1, min(gpus, sequences) + 1) if sequences % n == 0), default=0)


def plan_stage(cfg: RunConfig, hw: Hardware) -> dict:
    """Every figure of one stage on `hw`, as a plain dict (also the --json output).

    A global batch of G sequences with micro batch b keeps at most G / b ranks busy (and only a count that divides
    it): the stage is planned on that many GPUs, and `gpus_note` says so."""
    m, t, ds = cfg.model, cfg.train, cfg.deepspeed
    nd = usable_gpus(t.global_batch, t.micro_batch, hw.gpus)
    if nd == 0:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}")
    note = "" if nd == hw.gpus else (
        f"uses {nd:,} of {hw.gpus:,} GPUs: global_batch {t.global_batch:,} / micro_batch {t.micro_batch} must be a "
        f"multiple of the data-parallel size")
    psi = m.num_params()
    states = model_state_bytes(psi, largest_module_params(cfg), ds.zero_stage, nd,
                               ds.offload_optimizer, ds.offload_params)
    act = {"activations_no_ac": activation_bytes(cfg, False), "activations_full_ac": activation_bytes(cfg, True)}
    loss = loss_bytes(cfg)
    comm = comm_bytes(cfg)
    reserve = hw.reserve_gib * GIB
    base = sum(states.values()) + sum(loss.values()) + comm + reserve
    total = {k: base + v for k, v in (("no_ac", act["activations_no_ac"]), ("full_ac", act["activations_full_ac"]))}
    configured = "full_ac" if m.activation_checkpointing else "no_ac"

    flops_token = m.flops_per_token(t.seq_len)
    flops_factor = 4.0 / 3.0 if cfg.stage == "dpo" else 1.0  # + reference forward (2N of 6N)
    tokens_per_s_gpu = hw.peak_flops * hw.mfu / (flops_token * flops_factor)
    step_tokens = t.global_batch * t.seq_len
    step_s = step_tokens / (tokens_per_s_gpu * nd)
    accum = t.global_batch // (t.micro_batch * nd)
    overlap = bool(zero_comm_settings(cfg).get("overlap_comm", False))
    comm_t = comm_time(psi, ds.zero_stage, nd, accum, hw.gpu, step_s, overlap)
    step_comm_s = step_s + comm_t["exposed_s"]
    return {
        "stage": cfg.stage, "gpu": hw.gpu, "gpus": hw.gpus, "gpus_used": nd, "gpus_note": note, "mfu": hw.mfu,
        "parameters": psi, "non_embedding_parameters": psi - m.vocab_size * m.dim,
        "flops_per_token": flops_token, "attention_flops_fraction":
            12.0 * m.n_layers * m.n_heads * m.head_dim * t.seq_len / flops_token,
        "seq_len": t.seq_len, "micro_batch": t.micro_batch, "global_batch": t.global_batch,
        "grad_accum_steps": accum,
        "zero_stage": ds.zero_stage, "offload_optimizer": ds.offload_optimizer, "offload_params": ds.offload_params,
        "activation_checkpointing": m.activation_checkpointing,
        "recompute_fraction": (math.ceil(m.n_layers / m.checkpoint_every) / m.n_layers / 3.0
                               if m.activation_checkpointing else 0.0),
        "checkpointing": ("full checkpointing" if m.checkpoint_every == 1
                          else f"checkpointing 1 block in {m.checkpoint_every}"),
        "memory_bytes": {**states, "model_states_total": sum(states.values()), **act, **loss,
                         "comm_buckets": comm, "reserve": reserve},
        "total_bytes": total, "configured": configured, "capacity_bytes": hw.capacity_bytes,
        "fits": {k: v <= hw.capacity_bytes for k, v in total.items()},
        "tokens_per_s_per_gpu": tokens_per_s_gpu, "step_time_s": step_s, "steps": t.max_steps,
        "total_tokens": t.total_tokens, "days": t.max_steps * step_s / 86400.0,
        "comm": comm_t, "step_time_with_comm_s": step_comm_s, "days_with_comm": t.max_steps * step_comm_s / 86400.0,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:8.2f} GiB"


def format_stage(p: dict, title: str = "") -> str:
    mem, gpu_name = p["memory_bytes"], p["gpu"]
    cap = p["capacity_bytes"]
    zero = f"ZeRO-{p['zero_stage']}" + (" + offload optimizer" if p["offload_optimizer"] else "") + \
        (" + offload params" if p["offload_params"] else "")
    lines = [f"== {title or p['stage']}: {p['gpus_used']:,} x {gpu_name}, {zero} ==",
             f"parameters: {p['parameters']:,} (non-embedding {p['non_embedding_parameters']:,})",
             f"FLOPs per token: {p['flops_per_token'] / 1e9:.1f} GFLOP at seq_len {p['seq_len']:,} "
             f"(attention {100 * p['attention_flops_fraction']:.1f}%)",
             f"batch: global {p['global_batch']:,} x {p['seq_len']:,} tokens, micro {p['micro_batch']}, "
             f"grad accumulation {p['grad_accum_steps']}"]
    if p["gpus_note"]:
        lines.append(f"note: {p['gpus_note']}")
    lines.append("memory per GPU:")
    rows = [("params (16-bit)", "params_16bit"), ("grads (16-bit)", "grads_16bit"),
            ("optimizer states (fp32 master, m, v)", "optimizer_states"),
            ("fp32 grad copy (DeepSpeed step)", "fp32_grad_copy"), ("ZeRO-3 gathered layer", "zero3_gathered_layer"),
            ("= model states", "model_states_total"),
            ("activations, no checkpointing", "activations_no_ac"),
            (f"activations, {p['checkpointing']}", "activations_full_ac"),
            ("logits (loss chunk)", "logits"), ("loss gradient buffers", "loss_grad_buffers"),
            ("communication buckets", "comm_buckets"), ("reserve (context, NCCL, fragmentation)", "reserve")]
    for label, key in rows:
        mark = "  <- configured" if key == f"activations_{p['configured']}" else ""
        lines.append(f"  {label:40s} {_gib(mem[key])}{mark}")
    for key, label in (("full_ac", f"with {p['checkpointing']}"), ("no_ac", "without checkpointing")):
        total = p["total_bytes"][key]
        verdict = "fits" if p["fits"][key] else f"DOES NOT FIT (short by {(total - cap) / GIB:.1f} GiB)"
        lines.append(f"  total {label:34s} {_gib(total)} of {cap / GIB:.1f} GiB: {verdict}")
    if not p["fits"][p["configured"]]:
        lines.append(f"does not fit: the configured layout needs {p['total_bytes'][p['configured']] / GIB:.1f} GiB "
                     f"per GPU, {gpu_name} has {cap / GIB:.1f} GiB; try a higher ZeRO stage, more GPUs, "
                     "activation checkpointing or a smaller micro batch")
    lines += [f"throughput at {100 * p['mfu']:.0f}% MFU: {p['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
              f"step {p['step_time_s']:.2f} s"
              + (f" (the GPUs also recompute {100 * p['recompute_fraction']:.0f}% more FLOPs for checkpointing, "
                 "which MFU does not count)" if p["recompute_fraction"] else ""),
              f"budget: {p['total_tokens']:,} tokens = {p['steps']:,} steps = {p['days']:.2f} days (compute only)"]
    c = p["comm"]
    volume = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.1f} GB" for k, v in c["bytes_per_gpu"].items())
    overlap = (f"overlap_comm hides up to {c['hideable_s']:.2f} s of it" if c["overlap_comm"]
               else "overlap_comm off: all of it adds to the step")
    lines += [f"communication per step: {volume} per GPU over {c['link']} = {c['comm_s']:.2f} s; {overlap}; "
              f"exposed {c['exposed_s']:.2f} s",
              f"with communication: step {p['step_time_with_comm_s']:.2f} s, {p['days_with_comm']:.2f} days "
              f"(compute only {p['days']:.2f})"]
    return "\n".join(lines)


def _is_recipe(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "stages" in raw


def _has_stage_key(path: Path) -> bool:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return True  # load_config's own message already says what is wrong with the file
    return isinstance(raw, dict) and "stage" in raw


def plan_recipe(path: Path, overrides: list[str], hw: Hardware) -> dict:
    """Each training stage of a recipe (kind `train`, or a stage name) planned on the same cluster; the others
    (data, prepare, pts, export, eval) are listed as skipped."""
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw.get("stages"), list):
        raise ConfigError(f"{path}: 'stages' must be a list of {{name, kind, config, overrides}}")
    stages, skipped, order = [], [], []
    for i, st in enumerate(raw["stages"]):
        if not isinstance(st, dict) or "name" not in st:
            raise ConfigError(f"{path}: stages[{i}] must be a mapping with at least 'name'")
        config, kind = st.get("config"), st.get("kind", "train")
        if not config or kind not in TRAIN_KINDS:
            reason = "no training config" if not config else f"kind={kind}: not a training stage"
            skipped.append({"name": st["name"], "kind": kind, "reason": reason})
            order.append(("skipped", len(skipped) - 1))
            continue
        config_path = Path(config)
        if not config_path.is_absolute() and not config_path.exists():
            config_path = REPO_ROOT / config
        stage_overrides = [str(o) for o in st.get("overrides", []) or []] + list(overrides)
        try:
            cfg = load_config(config_path, stage_overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: stage '{st['name']}': {e}") from None
        stages.append({"name": st["name"], "config": str(config), **plan_stage(cfg, hw)})
        order.append(("stages", len(stages) - 1))
    total_days = sum(s["days"] for s in stages)
    return {"recipe": str(path), "stages": stages, "skipped": skipped, "order": order, "total_days": total_days,
            "total_days_with_comm": sum(s["days_with_comm"] for s in stages),
            "total_tokens": sum(s["total_tokens"] for s in stages),
            "paper": {"days": PAPER_DAYS, "gpus": PAPER_GPUS, "gpu": "h100-80gb"}}


def format_recipe(r: dict) -> str:
    lines = [format_stage(s, s["name"]) + "\n" for s in r["stages"]]
    lines.append(f"{'stage':12s} {'GPUs':>6s} {'tokens':>20s} {'steps':>9s} {'tok/s/GPU':>10s} {'step s':>8s} "
                 f"{'days':>7s} {'+comm':>7s}  memory (configured)")
    for kind, i in r["order"]:
        s = r[kind][i]
        if kind == "skipped":
            lines.append(f"{s['name']:12s} skipped: {s['reason']}")
            continue
        need = s["total_bytes"][s["configured"]]
        fit = "fits" if s["fits"][s["configured"]] else "DOES NOT FIT"
        lines.append(f"{s['name']:12s} {s['gpus_used']:6,d} {s['total_tokens']:20,d} {s['steps']:9,d} "
                     f"{s['tokens_per_s_per_gpu']:10,.0f} {s['step_time_s']:8.2f} {s['days']:7.2f} "
                     f"{s['days_with_comm']:7.2f}  "
                     f"{need / GIB:.1f} GiB {fit}")
    lines.append(f"{'total':12s} {'':6s} {r['total_tokens']:20,d} {'':9s} {'':10s} {'':8s} {r['total_days']:7.2f} "
                 f"{r['total_days_with_comm']:7.2f}")
    if any(s["parameters"] == PHI4_PARAMS for s in r["stages"]):  # the paper's figure is for the 14B model
        s0 = r["stages"][0]
        lines.append(f"paper: {PAPER_DAYS:.0f} days on {PAPER_GPUS:,} H100-80G for everything (model card); this plan: "
                     f"{r['total_days']:.1f} days ({r['total_days_with_comm']:.1f} with exposed communication) "
                     f"on up to {s0['gpus']:,} x {s0['gpu']} at {100 * s0['mfu']:.0f}% MFU, "
                     f"with no restarts, evaluation or data-pipeline stalls; {PAPER_DAYS:.0f} days at this layout "
                     f"means {100 * s0['mfu'] * r['total_days'] / PAPER_DAYS:.1f}% MFU sustained")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a stage run config, or a recipe YAML with a 'stages' list")
    parser.add_argument("overrides", nargs="*", help="key=value dot-list overrides (applied to every stage)")
    parser.add_argument("--gpus", type=int, required=True, help="data-parallel GPUs (Nd)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for time")
    parser.add_argument("--reserve-gib", type=float, default=4.0, help="per-GPU allowance for context/NCCL/slack")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        parser.error(f"--gpus must be >= 1 and --mfu in (0, 1]; got {args.gpus}, {args.mfu}")
    hw = Hardware(args.gpu, args.gpus, args.mfu, args.reserve_gib)
    path = Path(args.config)
    try:
        if _is_recipe(path):
            result = plan_recipe(path, args.overrides, hw)
            text = format_recipe(result)
        else:
            cfg = load_config(path, args.overrides)
            result = plan_stage(cfg, hw)
            text = format_stage(result, path.stem)
            if cfg.data.sources:  # the stage's mixture: tokens drawn and epochs per source over its token budget
                from data.mixture import format_manifest, mixture_manifest

                rows = mixture_manifest(cfg.data, cfg.train.total_tokens)
                result["mixture"] = {"total_tokens": cfg.train.total_tokens, "sources": rows}
                text += "\n" + format_manifest(rows, cfg.train.total_tokens, str(path))
    except (ConfigError, ValueError) as e:  # ValueError: a mixture the data layer refuses, with its names
        hint = "" if _has_stage_key(path) or _is_recipe(path) else (" (a stage run config has a 'stage' key; a recipe has a 'stages' "
                                                 "list)")
        print(f"configuration error: {e}{hint}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
