"""Run configuration: typed dataclasses, defaults < YAML file < command-line dot-list overrides.

`load_config(path, overrides)` returns a validated `RunConfig` with derived values filled in; unknown keys and wrong
types fail at load with the key, the file and the valid choices (data/configfile.py, which data/ uses too).
`load_config(..., schema=OtherDataclass)` serves the other entry points (eval, PTS, recipes) with the same rules.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import OmegaConf

from data.config import PROVENANCES, DataConfig
from data.configfile import ConfigError, load_typed, read_yaml
from data.fileio import atomic_write
from data.post_mixture import check_post_config
from model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_PRESET_DIR = REPO_ROOT / "configs" / "model"

STAGES = ("pretrain", "midtrain", "sft", "dpo")
SCHEDULES = ("linear", "cosine", "wsd", "constant")


@dataclass
class TrainConfig:
    seq_len: int = 4096  # tokens per training sequence (the packing window)
    global_batch: int = 5760  # sequences per optimizer step, across all ranks and micro-batches
    micro_batch: int = 1  # sequences per rank per forward/backward; accumulation is derived
    max_steps: int = 0  # 0 = derived from total_tokens
    total_tokens: int = 0  # the stage's token budget; steps = ceil(total_tokens / (global_batch * seq_len))
    save_every: int = 1000  # steps
    keep_last: int = 3  # complete checkpoints kept on disk
    resume: str = "auto"  # auto: continue from the newest complete checkpoint in output_dir | none
    init_from: str = ""  # weights only (fresh optimizer and schedule): a checkpoint dir, a run dir or an HF dir
    log_every: int = 1
    eval_every: int = 0  # steps between held-out evaluations; 0 = only at the end
    eval_batches: int = 4  # micro-batches per source in a held-out evaluation
    eval_config: str = ""  # an EvalConfig YAML (train/eval.py) also run in-loop at each evaluation, on every rank
    seed: int = 1234
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    max_bad_steps_in_row: int = 5  # non-finite loss/grad-norm steps skipped in a row before the run stops
    compile: bool = False  # torch.compile each block
    stop_after_steps: int = 0  # save and exit 75 (resume me) after this many steps in this process; 0 = off
    debug_nan_steps: list[int] = field(default_factory=list)  # fault injection (tests): NaN loss at these steps


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (Phi-4 pretraining)
    weight_decay: float = 0.1  # on >= 2-D weights only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # ASSUMPTION: the paper gives no betas
    eps: float = 1e-8
    grad_clip: float = 1.0  # ASSUMPTION: clipping is not stated in the paper
    schedule: str = "linear"  # linear warmup + linear decay (Phi-4) | cosine | wsd | constant
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # final LR as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU
    offload_params: bool = False  # ZeRO-3 only
    # Communication (DeepSpeed's zero_optimization keys of the same names). 0 (null for overlap_comm) = derived by
    # `zero_comm_settings` below: ZeRO-1/2 as before (200M-element buckets, no overlap); ZeRO-3 from the hidden size.
    allgather_bucket_size: int = 0  # ZeRO-1/2 only (stage 3 gathers by stage3_prefetch_bucket_size)
    reduce_bucket_size: int = 0
    overlap_comm: Optional[bool] = None
    stage3_prefetch_bucket_size: int = 0
    stage3_param_persistence_threshold: int = 0  # 0 = derived; set 1 to partition every parameter
    stage3_max_live_parameters: int = 0
    stage3_max_reuse_distance: int = 0


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "phi4-recipe"
    entity: str = ""
    name: str = ""  # default: the output_dir's last two components
    group: str = ""
    tags: list[str] = field(default_factory=list)
    dir: str = ""  # default: output_dir


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = datasheet bf16 value of the GPU, or the measured CPU GEMM rate


@dataclass
class DPOConfig:
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo (length-averaged log-probs, as TRL) | ipo_sum (summed log-probs)
    beta: float = 0.1  # ASSUMPTION: the paper gives no DPO hyperparameters
    ref_cache: str = ""  # reference log-prob cache file; default <output_dir>/ref_logps.pt
    ref_chunk_pairs: int = 2048  # pairs per resumable chunk of the reference log-prob computation


@dataclass
class RunConfig:
    stage: str = "pretrain"  # pretrain | midtrain | sft | dpo
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


def _resolve_includes(raw: dict, where: str) -> dict:
    """`model: {preset: tiny}` takes configs/model/tiny.yaml as the base of the model section, and
    `data: {mixture: configs/data/x.yaml}` a mixture file as the base of the data section; keys beside them win."""
    for section, key in (("model", "preset"), ("data", "mixture")):
        body = raw.get(section)
        if not isinstance(body, dict) or key not in body:
            continue
        body = dict(body)
        name = str(body.pop(key))
        if section == "model" and not name.endswith(".yaml"):
            path = MODEL_PRESET_DIR / f"{name}.yaml"
        else:
            path = Path(name) if Path(name).is_absolute() else REPO_ROOT / name
        if not path.is_file():
            hint = f"; available presets: {sorted(p.stem for p in MODEL_PRESET_DIR.glob('*.yaml'))}" \
                if section == "model" else ""
            raise ConfigError(f"{where}: {section}.{key}={name!r} not found{hint}")
        raw = {**raw, section: {**read_yaml(path), **body}}
    return raw


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), schema: type = RunConfig):
    """defaults < YAML < dot-list overrides, typed and validated; for RunConfig, `model.preset` / `data.mixture`
    includes are resolved and derived values filled in (see data/configfile.py for the rules of every schema)."""
    if schema is not RunConfig:
        return load_typed(path, overrides, schema)
    cfg = load_typed(path, overrides, schema, resolve=lambda raw, where: _resolve_includes(raw, where))
    return finalize(cfg, str(path) if path else "<defaults>")


def _choice(value, choices, key: str, where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {key}={value!r}; expected one of {list(choices)}")


def finalize(cfg: RunConfig, where: str = "<config>") -> RunConfig:
    """Validate choices and ranges, and derive values that must not be written twice."""
    _choice(cfg.stage, STAGES, "stage", where)
    _choice(cfg.train.resume, ("auto", "none"), "train.resume", where)
    _choice(cfg.train.device, ("auto", "cpu", "cuda"), "train.device", where)
    _choice(cfg.train.precision, ("auto", "bf16", "fp32"), "train.precision", where)
    _choice(cfg.optim.schedule, SCHEDULES, "optim.schedule", where)
    _choice(cfg.deepspeed.zero_stage, (0, 1, 2, 3), "deepspeed.zero_stage", where)
    _choice(cfg.logging.wandb.mode, ("online", "offline", "disabled"), "logging.wandb.mode", where)
    _choice(cfg.dpo.loss, ("sigmoid", "ipo", "ipo_sum"), "dpo.loss", where)
    for src in cfg.data.sources:
        _choice(src.provenance, PROVENANCES, f"data.sources[{src.name}].provenance", where)
    check_post_config(cfg.data, where)  # data.sft_sources / dpo_sources / post_weight_unit
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    t = cfg.train
    for key in ("seq_len", "global_batch", "micro_batch", "save_every", "keep_last", "log_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"{where}: train.{key}={getattr(t, key)} must be > 0")
    if t.global_batch % t.micro_batch:
        raise ConfigError(f"{where}: train.global_batch={t.global_batch} is not divisible by "
                          f"train.micro_batch={t.micro_batch}")
    o = cfg.optim
    ranges = [("optim.lr", o.lr, o.lr > 0, "> 0"), ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
              ("optim.eps", o.eps, o.eps > 0, "> 0"), ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, ">= 0 (0 = off)"),
              ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
              ("optim.warmup_fraction", o.warmup_fraction, 0 <= o.warmup_fraction < 1, "in [0, 1)"),
              ("optim.min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
              ("optim.decay_fraction", o.decay_fraction, 0 < o.decay_fraction <= 1, "in (0, 1]"),
              ("dpo.beta", cfg.dpo.beta, cfg.dpo.beta > 0, "> 0"),
              ("data.held_out_fraction", cfg.data.held_out_fraction, 0 <= cfg.data.held_out_fraction < 1, "in [0, 1)"),
              ("train.max_steps", t.max_steps, t.max_steps >= 0, ">= 0 (0 = derived from train.total_tokens)"),
              ("train.total_tokens", t.total_tokens, t.total_tokens >= 0, ">= 0")]
    for key, value, ok, expected in ranges:
        if not (math.isfinite(value) and ok):  # NaN fails every comparison, inf is no rate
            raise ConfigError(f"{where}: {key}={value}; expected a finite value {expected}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"{where}: optim.betas={cfg.optim.betas}; expected two values in [0, 1)")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ConfigError(f"{where}: deepspeed.offload_params needs deepspeed.zero_stage=3")
    for key in COMM_SIZE_KEYS:
        if getattr(cfg.deepspeed, key) < 0:
            raise ConfigError(f"{where}: deepspeed.{key}={getattr(cfg.deepspeed, key)}; expected >= 0 (0 = derived)")
    # Derived: step count from the token budget, and the model's context from the training window.
    if t.max_steps <= 0:
        if t.total_tokens <= 0:
            raise ConfigError(f"{where}: set train.max_steps or train.total_tokens")
        t.max_steps = math.ceil(t.total_tokens / (t.global_batch * t.seq_len))
    if t.total_tokens <= 0:
        t.total_tokens = t.max_steps * t.global_batch * t.seq_len
    if cfg.data.total_tokens <= 0:
        cfg.data.total_tokens = t.total_tokens
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"{where}: train.seq_len={t.seq_len} is longer than the model's context model.max_seq_len="
                          f"{cfg.model.max_seq_len}. A stage that grows the context says so: set model.max_seq_len "
                          "too (as midtraining does), or lower train.seq_len")
    return cfg


COMM_SIZE_KEYS = ("allgather_bucket_size", "reduce_bucket_size", "stage3_prefetch_bucket_size",
                  "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance")
ZERO12_BUCKET = 200_000_000  # elements: the ZeRO-1/2 reduce and all-gather buckets (DeepSpeed's own default is 5e8)
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters and stage3_max_reuse_distance


def zero_comm_settings(cfg: RunConfig) -> dict:
    """The communication keys of DeepSpeed's zero_optimization section for this run, every one resolved (the
    config's value when set, else derived); {} for ZeRO-0, whose gradient all-reduce DeepSpeed's engine does.

    ZeRO-1/2: 200M-element reduce and all-gather buckets, overlap_comm off (what this trainer always used).
    ZeRO-3, from the hidden size h (model.dim), the values the Hugging Face DeepSpeed integration writes for "auto"
    (transformers/integrations/deepspeed.py, `trainer_config_finalize`): reduce bucket h^2 elements, prefetch bucket
    0.9 h^2, parameters below 10 h elements (norm weights) never partitioned; overlap_comm on (DeepSpeed's own
    default for stage 3), so all-gathers and reduce-scatters run on their own streams beside compute; at most 1e9
    parameters gathered and kept for reuse (DeepSpeed's defaults, written out). allgather_bucket_size is not read by
    stage 3 and is not emitted there."""
    ds, h = cfg.deepspeed, cfg.model.dim
    if ds.zero_stage == 0:
        return {}
    if ds.zero_stage in (1, 2):
        return {"overlap_comm": bool(ds.overlap_comm) if ds.overlap_comm is not None else False,
                "contiguous_gradients": True,
                "reduce_bucket_size": ds.reduce_bucket_size or ZERO12_BUCKET,
                "allgather_bucket_size": ds.allgather_bucket_size or ZERO12_BUCKET}
    return {"overlap_comm": bool(ds.overlap_comm) if ds.overlap_comm is not None else True,
            "contiguous_gradients": True,
            "reduce_bucket_size": ds.reduce_bucket_size or h * h,
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size or int(0.9 * h * h),
            "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold or 10 * h,
            "stage3_max_live_parameters": ds.stage3_max_live_parameters or ZERO3_MAX_LIVE,
            "stage3_max_reuse_distance": ds.stage3_max_reuse_distance or ZERO3_MAX_LIVE}


def grad_accum_steps(cfg: RunConfig, world_size: int) -> int:
    """global batch / (micro batch x world size); an error when it does not divide."""
    per_step = cfg.train.micro_batch * world_size
    if cfg.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by train.micro_batch="
            f"{cfg.train.micro_batch} x world size {world_size} = {per_step}")
    return cfg.train.global_batch // per_step


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, path: str | os.PathLike) -> None:
    atomic_write(path, to_yaml(cfg))


def from_dict(d: dict, schema: type = RunConfig):
    """Rebuild a config saved in a checkpoint (already resolved: no finalize needed)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(d)))
