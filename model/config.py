"""ModelConfig: the shape of a Phi-4-family decoder, plain values only."""
from __future__ import annotations

from dataclasses import dataclass

ATTN_BACKENDS = ("sdpa", "flash")


@dataclass
class ModelConfig:
    # Defaults are Phi-4 14B (HF microsoft/phi-4 config.json); presets in configs/model/ shrink it for smoke runs.
    vocab_size: int = 100_352  # 100,256 cl100k ranks + 96 special/reserved ids
    dim: int = 5120  # hidden size d
    n_layers: int = 40
    n_heads: int = 40  # query heads; head_dim = dim / n_heads = 128
    n_kv_heads: int = 10  # grouped-query attention: 4 query heads share one KV head
    ffn_dim: int = 17_920  # SwiGLU intermediate size (3.5 d)
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0  # pretraining; midtraining and the release use 250,000
    max_seq_len: int = 4096  # 16,384 after midtraining
    init_std: float = 0.02
    attn_backend: str = "sdpa"  # sdpa | flash (falls back to sdpa, logged once, if flash-attn is missing)
    doc_masking: bool = True  # packed documents never attend to each other; positions restart per document
    activation_checkpointing: bool = False  # recompute blocks in backward
    checkpoint_every: int = 1  # with activation_checkpointing: every N-th block (1 = all, 2 = every other, ...)
    lean_activations: bool = True  # RMSNorm/SwiGLU keep only their inputs for backward (model/lean.py); same forward
    loss_chunk_tokens: int = 1024  # tokens per chunk of the fused LM-head + cross-entropy; 0 = plain (full logits)
    onednn_loss: bool = True  # CPU only: the fused loss's matmuls through oneDNN (AVX-512) instead of MKL; same fp32

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ValueError naming the field when the shape is inconsistent."""
        checks = [
            (self.dim % self.n_heads == 0, f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}"),
            (self.n_heads % self.n_kv_heads == 0,
             f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}"),
            (self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary embeddings"),
            (self.attn_backend in ATTN_BACKENDS,
             f"model.attn_backend={self.attn_backend!r}; expected one of {list(ATTN_BACKENDS)}"),
            (self.loss_chunk_tokens >= 0, f"model.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0"),
            (self.checkpoint_every >= 1, f"model.checkpoint_every={self.checkpoint_every} must be >= 1 (1 = every block)"),
        ]
        for field_name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, field_name)
            checks.append((value > 0, f"model.{field_name}={value} must be > 0"))
        checks.append((self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def num_params(self) -> int:
        """Exact parameter count (embedding and LM head untied, no biases)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        attn = d * (d + 2 * kv) + d * d
        mlp = 3 * d * self.ffn_dim
        layer = attn + mlp + 2 * d
        return self.n_layers * layer + 2 * self.vocab_size * d + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N (non-embedding, LM head included) + 12 L H hd s (PaLM App. B)."""
        n_nonembedding = self.num_params() - self.vocab_size * self.dim
        return 6.0 * n_nonembedding + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len
