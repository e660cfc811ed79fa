"""The Phi-4 decoder: pre-norm blocks of GQA attention and a SwiGLU MLP, RMSNorm, rotate-half RoPE, untied head.

Single-device code. Parameter layout mirrors Hugging Face `Phi3ForCausalLM` (fused Q|K|V and gate|up projections),
so `model/hf.py` is a key rename. Labels passed to `Transformer.forward` are already shifted: `labels[:, t]` is the
token that should follow position t, -100 where no loss is taken.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.lean import rms_norm, swiglu
from model.loss import IGNORE_INDEX, fused_linear_cross_entropy, token_nll

log = logging.getLogger(__name__)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, lean: bool = False):
        super().__init__()
        self.eps, self.lean = eps, lean
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and torch.is_grad_enabled():
            return rms_norm(x, self.weight, self.eps)  # the same ops; keeps only x and 1/rms for backward
        # Normalise in fp32, scale in the input dtype (as HF Phi3RMSNorm does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) in fp32 for rotate-half RoPE over the full head dim."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (B, T, hd). Rotate-half (NeoX) layout."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


@dataclass
class AttnContext:
    """Per-forward attention layout, built once and shared by every block."""
    cu_seqlens: torch.Tensor | None  # (n_docs + 1,) int32 over the flattened B*T tokens, for flash varlen
    max_seqlen: int
    sdpa_mask: torch.Tensor | None  # (B, 1, T, S) bool, True = attend; None = plain causal


class KVCache:
    """Keys/values of every layer for incremental decoding: (B, n_kv_heads, max_len, head_dim) each."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


_FLASH = None  # resolved lazily: the flash-attn module, or False when unavailable
_TORCH_VARLEN = None  # resolved lazily: torch.nn.attention.varlen.varlen_attn, or False when this torch lacks it
_WARNED_DENSE_MASK = False


def _flash_attn():
    global _FLASH
    if _FLASH is None:
        try:
            import flash_attn  # noqa: F401
            _FLASH = flash_attn
        except ImportError:
            _FLASH = False
            log.warning("attn_backend=flash but flash-attn is not installed: packed documents use PyTorch's own "
                        "varlen flash kernel where this torch has one, otherwise falling back to PyTorch SDPA")
    return _FLASH


def _torch_varlen():
    """PyTorch's built-in varlen flash attention (CUDA only), so packed documents need no T x T mask on a GPU
    without the flash-attn package."""
    global _TORCH_VARLEN
    if _TORCH_VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn
            _TORCH_VARLEN = varlen_attn
        except ImportError:
            _TORCH_VARLEN = False
    return _TORCH_VARLEN


FLASH_DTYPES = (torch.bfloat16, torch.float16)  # flash kernels have no fp32 path


def attention_kernel(backend: str, device: torch.device | str, dtype: torch.dtype, packed: bool,
                     decoding: bool = False) -> str:
    """The kernel attention runs: "flash" (flash-attn), "varlen" (PyTorch's varlen flash kernel, packed documents
    only) or "sdpa". Flash kernels need CUDA and 16-bit activations; decoding with a KV cache uses SDPA."""
    if backend != "flash" or decoding or torch.device(device).type != "cuda" or dtype not in FLASH_DTYPES:
        return "sdpa"
    if _flash_attn():
        return "flash"
    return "varlen" if packed and _torch_varlen() else "sdpa"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.backend = cfg.attn_backend
        # Fused projection, rows Q (n_heads) | K (n_kv_heads) | V (n_kv_heads), as HF qkv_proj.
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, ctx: AttnContext, layer_idx: int = 0, kv_cache: KVCache | None = None):
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)

        kernel = attention_kernel(self.backend, x.device, x.dtype, ctx.cu_seqlens is not None, kv_cache is not None)
        if kernel == "flash":
            out = self._flash(_flash_attn(), q, k, v, ctx)  # (B, T, H, hd)
        elif kernel == "varlen":
            out = self._torch_varlen(_torch_varlen(), q, k, v, ctx)
        else:
            out = self._sdpa(q, k, v, ctx)
        return self.wo(out.reshape(B, T, q_size))

    @staticmethod
    def _sdpa(q, k, v, ctx: AttnContext):
        """(B, T, H, hd) from SDPA. With an explicit mask, K/V are repeated to every query head: PyTorch's fused
        CUDA kernels refuse `enable_gqa` together with a mask and fall back to the math kernel, which holds
        B x H x T x S fp32 scores (40 GB per 16K row at Phi-4's 40 heads). On CPU both cost the same."""
        mask = ctx.sdpa_mask
        if mask is None and ctx.cu_seqlens is not None:
            raise RuntimeError("packed documents reached SDPA without their block-diagonal mask")
        if mask is not None and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)

    @staticmethod
    def _flash(flash, q, k, v, ctx: AttnContext):
        B, H, T, hd = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, heads, hd); flash handles GQA natively
        if ctx.cu_seqlens is None:
            return flash.flash_attn_func(q, k, v, causal=True)
        flat = [t.reshape(B * T, t.shape[2], hd) for t in (q, k, v)]
        out = flash.flash_attn_varlen_func(
            *flat, cu_seqlens_q=ctx.cu_seqlens, cu_seqlens_k=ctx.cu_seqlens,
            max_seqlen_q=ctx.max_seqlen, max_seqlen_k=ctx.max_seqlen, causal=True,
        )
        return out.view(B, T, H, hd)

    @staticmethod
    def _torch_varlen(varlen_attn, q, k, v, ctx: AttnContext):
        """Packed documents through torch.nn.attention.varlen: (total, heads, hd) layouts, causal as window
        (-1, 0), GQA native."""
        B, H, T, hd = q.shape
        flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], hd) for t in (q, k, v)]
        out = varlen_attn(*flat, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
                          window_size=(-1, 0), enable_gqa=H != k.shape[1])
        return out.view(B, T, H, hd)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_dim, self.lean = cfg.ffn_dim, cfg.lean_activations
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # gate | up, as HF gate_up_proj
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate_up = self.w13(x)
        if self.lean and torch.is_grad_enabled():
            return self.w2(swiglu(gate_up, self.ffn_dim))  # keeps only gate|up for backward
        gate, up = gate_up.split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.lean_activations)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.lean_activations)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, ctx: AttnContext, layer_idx: int = 0, kv_cache: KVCache | None = None):
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx, layer_idx, kv_cache)
        return x + self.feed_forward(self.ffn_norm(x))


class LMHead(nn.Module):
    """Output projection; with labels it returns the loss without materialising all logits at once."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.chunk_tokens = cfg.loss_chunk_tokens
        self.onednn = cfg.onednn_loss
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim))

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, reduction: str = "mean"):
        if labels is None:
            return F.linear(h, self.weight)  # (B, T, V)
        if reduction == "none":  # per-token NLL (B, T), 0 where unlabelled
            return token_nll(h.reshape(-1, h.shape[-1]), self.weight, labels.reshape(-1),
                             self.chunk_tokens).view(labels.shape)
        h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        if self.chunk_tokens > 0:
            return fused_linear_cross_entropy(h, self.weight, labels, self.chunk_tokens, reduction, self.onednn)
        logits = F.linear(h, self.weight).float()  # (N, V) fp32: the memory the fused path avoids
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Document index of each token, (B, T), from boundaries over the flattened batch."""
    positions = torch.arange(batch * seq_len, device=cu_seqlens.device)
    return (torch.searchsorted(cu_seqlens.to(torch.int64), positions, right=True) - 1).view(batch, seq_len)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Positions restarting at 0 at each document start, (B, T)."""
    doc = doc_ids_from_cu_seqlens(cu_seqlens, batch, seq_len).view(-1)
    starts = cu_seqlens.to(torch.int64)[doc]
    return (torch.arange(batch * seq_len, device=cu_seqlens.device) - starts).view(batch, seq_len)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.lean_activations)
        self.output = LMHead(cfg)  # untied from tok_embeddings
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix, ones for norms (the HF initializer_range convention)."""
        for module in self.modules():
            self.init_module(module)

    @torch.no_grad()
    def init_module(self, module: nn.Module) -> None:
        """Initialise one module's own parameters (callers that shard parameters gather them around this)."""
        if isinstance(module, (nn.Linear, nn.Embedding, LMHead)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def set_rope_theta(self, theta: float) -> None:
        """RoPE has no weights: changing the base (midtraining) is a config change."""
        self.cfg.rope_theta = float(theta)

    def _attn_context(self, B, T, device, cu_seqlens, max_seqlen, kv_cache, attention_mask) -> AttnContext:
        if kv_cache is not None:
            # Decoding: queries at [past, past+T) attend to cached keys [0, past+T), minus padding.
            past = kv_cache.length
            q_pos = torch.arange(past, past + T, device=device)[:, None]
            mask = (torch.arange(past + T, device=device)[None, :] <= q_pos)[None, None]  # (1, 1, T, S)
            if attention_mask is not None:  # (B, S) True = real token (left padding)
                mask = mask & attention_mask[:, None, None, :].bool()
                # A padded query would see no key at all: NaN in some CUDA SDPA kernels. Let it see itself.
                mask = mask | (torch.arange(past + T, device=device)[None, :] == q_pos)[None, None]
            return AttnContext(None, 0, mask.expand(B, 1, T, past + T))
        if cu_seqlens is None or not self.cfg.doc_masking:
            return AttnContext(None, T, None)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if attention_kernel(self.cfg.attn_backend, device, self.tok_embeddings.weight.dtype, packed=True) != "sdpa":
            return AttnContext(cu_seqlens.to(torch.int32), int(max_seqlen), None)  # no T x T mask on the GPU
        global _WARNED_DENSE_MASK
        if torch.device(device).type == "cuda" and not _WARNED_DENSE_MASK:
            _WARNED_DENSE_MASK = True
            log.warning("packed documents on the GPU go through SDPA with a dense %d x %d mask per row (attn_backend=%s, "
                        "%s): flash-attn (pip install -e '.[gpu]') or PyTorch's varlen kernel with 16-bit activations "
                        "avoid it", T, T, self.cfg.attn_backend, self.tok_embeddings.weight.dtype)
        doc = doc_ids_from_cu_seqlens(cu_seqlens, B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        sdpa_mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T) block-diagonal causal
        return AttnContext(cu_seqlens.to(torch.int32), int(max_seqlen), sdpa_mask[:, None])

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T), already shifted; -100 = no loss
        position_ids: torch.Tensor | None = None,  # (B, T)
        cu_seqlens: torch.Tensor | None = None,  # document boundaries over the flattened B*T tokens
        max_seqlen: int | None = None,
        reduction: str = "mean",  # mean over labelled tokens | sum (the trainer normalises globally) | none (B, T)
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, S) bool key mask, only with kv_cache
        return_hidden: bool = False,
    ):
        B, T = input_ids.shape
        if position_ids is None:
            if cu_seqlens is not None and self.cfg.doc_masking:
                position_ids = position_ids_from_cu_seqlens(cu_seqlens, B, T)
            else:
                start = kv_cache.length if kv_cache is not None else 0
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        ctx = self._attn_context(B, T, input_ids.device, cu_seqlens, max_seqlen, kv_cache, attention_mask)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)

        h = self.tok_embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            if (self.cfg.activation_checkpointing and i % self.cfg.checkpoint_every == 0 and self.training
                    and torch.is_grad_enabled()):
                h = checkpoint(layer, h, cos, sin, ctx, i, None, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx, i, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h, labels, reduction)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

