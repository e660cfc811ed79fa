"""Hugging Face interop: load a `Phi3ForCausalLM` safetensors checkpoint into our Transformer, and export ours.

Our parameter layout already matches HF's fused projections (qkv_proj rows Q|K|V, gate_up_proj rows gate|up), so the
conversion is a key rename. Safetensors only: no pickle is ever read or written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.fileio import fsync_dir
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from model.config import ModelConfig
from model.transformer import Transformer

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Per-layer HF name -> our name; `{i}` is the layer index.
_LAYER_KEYS = {
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight": "layers.{i}.attention.wqkv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "layers.{i}.feed_forward.w13.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
}
_GLOBAL_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_key_map(n_layers: int) -> dict[str, str]:
    """HF parameter name -> our parameter name, for every weight of an n_layers model."""
    keys = dict(_GLOBAL_KEYS)
    for i in range(n_layers):
        keys.update({hf.format(i=i): ours.format(i=i) for hf, ours in _LAYER_KEYS.items()})
    return keys


def _rope_theta(hf: dict, where: str) -> float:
    """RoPE base from a 4.x config (`rope_theta`, `rope_scaling`) or a 5.x one (`rope_parameters`)."""
    if hf.get("rope_scaling") is not None:
        raise ValueError(f"{where}: rope_scaling={hf['rope_scaling']!r} is not supported (expected null: plain RoPE)")
    params = hf.get("rope_parameters")
    theta = hf.get("rope_theta")
    partial = hf.get("partial_rotary_factor", 1.0)
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"{where}: rope_parameters must be a dict, got {params!r}")
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"{where}: rope_parameters.rope_type={params['rope_type']!r} is not supported "
                             "(expected 'default': no long-context scaling)")
        extra = sorted(set(params) - {"rope_type", "rope_theta", "partial_rotary_factor"})
        if extra:
            raise ValueError(f"{where}: rope_parameters keys {extra} are not supported (plain RoPE only)")
        partial = params.get("partial_rotary_factor", partial)
        if "rope_theta" in params:
            if theta is not None and float(theta) != float(params["rope_theta"]):
                raise ValueError(f"{where}: rope_theta={theta} disagrees with rope_parameters.rope_theta="
                                 f"{params['rope_theta']}")
            theta = params["rope_theta"]
    if float(partial) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported (expected 1.0: RoPE over the full "
                         "head dim)")
    if theta is None:
        raise ValueError(f"{where}: no RoPE base: expected `rope_theta` (transformers 4.x) or "
                         "`rope_parameters.rope_theta` (5.x)")
    return float(theta)


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from an HF Phi-3 config dict; refuses, naming the key, what our model does not implement."""
    if hf.get("model_type") != "phi3":
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}; expected 'phi3' (Phi3ForCausalLM)")
    refusals = [
        ("sliding_window", hf.get("sliding_window") is not None, "null (full causal attention)"),
        ("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False)), "false (untied LM head)"),
        ("attention_bias", bool(hf.get("attention_bias", False)), "false (no biases)"),
        ("hidden_act", hf.get("hidden_act", "silu") != "silu", "'silu' (SwiGLU)"),
    ]
    for key, bad, expected in refusals:
        if bad:
            raise ValueError(f"{where}: {key}={hf.get(key)!r} is not supported; expected {expected}")
    for key in ("attention_dropout", "embd_pdrop", "resid_pdrop"):
        if hf.get(key, 0.0):
            log.warning("%s: %s=%s ignored: this model has no dropout", where, key, hf[key])
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        cfg = dict(
            vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), ffn_dim=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=_rope_theta(hf, where),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)), init_std=float(hf.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}") from None
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{where}: head_dim={hf['head_dim']} is not supported; expected hidden_size / "
                         f"num_attention_heads = {dim // n_heads}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig override(s) {unknown}; expected fields of ModelConfig: {sorted(fields)}")
    cfg.update(overrides)
    model_cfg = ModelConfig(**cfg)
    model_cfg.validate()
    return model_cfg


def _checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: one file, or the shards named by the index."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {pickled}: pickle checkpoints are not read; convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"{path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards{hint}")


def from_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            **cfg_overrides) -> Transformer:
    """Our Transformer with the weights of an HF Phi3ForCausalLM directory; tensors keep their stored dtype unless
    `dtype` is given. `cfg_overrides` set ModelConfig fields not in the HF config (attn_backend, doc_masking...)."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist (expected an HF checkpoint directory)")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON ({e})") from None
    cfg = config_from_hf(hf_cfg, str(config_path), **cfg_overrides)
    key_map = hf_key_map(cfg.n_layers)

    with torch.device("meta"):
        model = Transformer(cfg)  # no memory until the checkpoint tensors are assigned
    expected = {name: p.shape for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for hf_key in f.keys():
                ours = key_map.get(hf_key)
                if ours is None:
                    raise ValueError(f"{file}: unexpected tensor {hf_key!r} for a {cfg.n_layers}-layer Phi-3 model")
                t = f.get_tensor(hf_key)
                if t.shape != expected[ours]:
                    raise ValueError(f"{file}: {hf_key} has shape {tuple(t.shape)}, expected "
                                     f"{tuple(expected[ours])} from {config_path}")
                state[ours] = t.to(dtype) if dtype is not None else t
    missing = sorted(hf for hf, ours in key_map.items() if ours not in state)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _special_ids(cfg: ModelConfig) -> dict:
    """Phi-4 bos/eos/pad (the microsoft/phi-4 tokenizer files); null for a toy vocab that lacks them (HF rejects out-of-range ids)."""
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    return {k: (v if v < cfg.vocab_size else None) for k, v in ids.items()}


def _hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for Phi3ForCausalLM, readable by transformers 4.x (rope_theta) and 5.x (rope_parameters)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
        "max_position_embeddings": cfg.max_seq_len,
        "original_max_position_embeddings": cfg.max_seq_len,
        "sliding_window": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        **_special_ids(cfg),
        "use_cache": True,
        "torch_dtype": dtype_name,  # transformers 4.x name
        "dtype": dtype_name,  # transformers 5.x name
    }


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names, in order, into groups of at most max_shard_bytes (a bigger tensor stands alone)."""
    groups, current, size = [], [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def to_hf(model: Transformer, out_dir: str | os.PathLike, tokenizer=None, max_shard_bytes: int = 5 * 2**30,
          dtype: torch.dtype | None = None, overwrite: bool = False) -> None:
    """Export an HF Phi3ForCausalLM directory (config, generation config, safetensors [+ index], tokenizer files).

    Built in a temporary directory beside `out_dir` and renamed at the end, so `out_dir` is never half-written.
    An existing non-empty `out_dir` is replaced only with overwrite=True.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not an empty directory; pass overwrite=True to replace it")
    cfg = model.cfg
    params = dict(model.named_parameters())
    dtype = dtype or params["tok_embeddings.weight"].dtype
    tensors = {hf: params[ours].detach().to("cpu", dtype).contiguous() for hf, ours in hf_key_map(cfg.n_layers).items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        groups = _shards(tensors, max_shard_bytes)
        if len(groups) == 1:
            save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, names in enumerate(groups, start=1):
                file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
                save_file({k: tensors[k] for k in names}, str(tmp / file), metadata={"format": "pt"})
                weight_map.update({k: file for k in names})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(_hf_config(cfg, dtype), indent=2) + "\n")
        generation = _special_ids(cfg)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_hf(tmp, model_max_length=cfg.max_seq_len)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src onto dst; an existing dst is moved aside first and deleted once src is in place."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
