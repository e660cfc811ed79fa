"""The generated DeepSpeed config, the model built for a ZeRO stage, the optimizer, the LR schedule, the engine."""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from model import ModelConfig, Transformer
from train.config import RunConfig, grad_accum_steps, zero_comm_settings
from train.distributed import DistState

log = logging.getLogger(__name__)


def deepspeed_config(cfg: RunConfig, world_size: int, precision: str, load_universal: bool = False) -> dict:
    """The whole DeepSpeed config, generated from the run config: nothing is written twice by hand."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage, **zero_comm_settings(cfg)}  # buckets, overlap: see train/config.py
    if ds.zero_stage in (1, 2):
        zero.update(reduce_scatter=True)
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # A client optimizer (our AdamW) also when states are offloaded to CPU.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def build_model(model_cfg: ModelConfig, ds_config: dict, dist_state: DistState) -> Transformer:
    """ZeRO-3 builds under deepspeed.zero.Init so the full model never exists on one rank."""
    import deepspeed

    if ds_config["zero_optimization"]["stage"] != 3:
        dtype = torch.bfloat16 if dist_state.precision == "bf16" else torch.float32
        return Transformer(model_cfg).to(device=dist_state.device, dtype=dtype)
    # No explicit dtype: zero.Init takes it from the config's bf16 switch. (An explicit float32 is mis-parsed as
    # bfloat16 on CPU by DeepSpeed 0.19's `dtype or fp16 if ... else bf16` precedence.)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Transformer(model_cfg)  # parameters are partitioned as they are created
    # Initialise one module at a time on rank 0, in Transformer.init_weights' order (so the same seed gives the
    # same weights as every other ZeRO stage), and let DeepSpeed scatter the result.
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if dist_state.is_main:
                    model.init_module(module)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on >= 2-D weights only (matrices and embeddings), never on norms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # ZeRO-3 partitions parameters to 1-D; ds_shape keeps the real shape.
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update (on every rank) when any gradient is NaN or Inf.

    DeepSpeed calls `step()` on every rank at the same point, so the all-reduce inside is safe; moments and weights
    stay untouched by a bad batch. `last_step_skipped` tells the loop to count it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_step_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.tensor(True)
        ok = finite.to(device=device, dtype=torch.float32).reshape(1)
        if dist.is_initialized():
            if dist.get_backend() == "nccl" and ok.device.type != "cuda":
                ok = ok.cuda()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        self.last_step_skipped = bool(ok.item() < 0.5)
        if self.last_step_skipped:
            return None
        return super().step(closure)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """LR multiplier at optimizer step `step` (0-based): warmup, then linear / cosine / wsd decay / constant."""
    o, total = cfg.optim, cfg.train.max_steps
    warmup = o.warmup_steps or int(round(o.warmup_fraction * total))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    floor = o.min_lr_ratio
    if o.schedule == "wsd":
        decay_steps = max(1, int(round(o.decay_fraction * total)))
        start = total - decay_steps
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / decay_steps)
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if o.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_engine(cfg: RunConfig, model: Transformer, ds_config: dict):
    """deepspeed.initialize with our AdamW and LambdaLR; returns (engine, optimizer, scheduler)."""
    import deepspeed

    o = cfg.optim
    # fused: one kernel for all parameters (CPU and CUDA), not torch's per-tensor loop.
    optimizer = SkipNonFiniteAdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                   fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, ds_scheduler
