"""Fused LM head + cross-entropy: the full (N, V) fp32 logits never exist at once.

Each chunk of tokens is projected, its softmax gradient computed right away, and only the gradients w.r.t. the hidden
states and the head weight are kept for backward. Peak extra memory is one chunk's logits, and no recompute is needed.

Per chunk the (c, V) logits buffer is touched as few times as possible, since at V = 100,352 every pass over it costs
as much memory traffic as a small matmul: one matmul writes it, one in-place softmax (row by row, cache resident)
turns it into probabilities, the loss is read off the target column (-log p), the target column is decremented, and
the per-row loss weights are applied to the small (c, D) operands of the two gradient matmuls instead of the (c, V)
buffer. On CPU the three (c, D, V) matmuls can run through oneDNN (`onednn=True`), which uses AVX-512 where MKL's sgemm
may not (MKL keeps to AVX2 on AMD CPUs): about twice the FLOP/s on this machine for the same fp32 result.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a label that takes no loss (torch's default; data.tokenizer.IGNORE_INDEX, tested equal)
TINY_PROB = 1e-30  # below this -log(p) loses precision (fp32 denormals); such rows are recomputed from the logits


def onednn_available() -> bool:
    """oneDNN's linear kernel is present in this torch build (CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mm_nt(a: torch.Tensor, b: torch.Tensor, onednn: bool) -> torch.Tensor:
    """a @ b.T; a: (M, K), b: (N, K) (b may be a transposed view)."""
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.t()


def _onednn_bf16() -> bool:
    """oneDNN's bf16 inner product needs CPU bf16 support (AVX-512 BF16 / AMX); without it the primitive fails."""
    return hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _use_onednn(requested: bool, h: torch.Tensor) -> bool:
    if not (requested and h.device.type == "cpu" and onednn_available()):
        return False
    return h.dtype == torch.float32 or (h.dtype == torch.bfloat16 and _onednn_bf16())


def _softmax_chunk(hc: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """Softmax of hc @ weight.T in fp32, (c, V), computed in place over the logits buffer where the dtype allows."""
    logits = _mm_nt(hc, weight, onednn)  # (c, V) in the input dtype
    if logits.dtype != torch.float32:
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


def _exact_nll(hc: torch.Tensor, weight: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
    """logsumexp - target logit for a few rows, from recomputed fp32 logits (rows whose p(target) underflowed)."""
    logits = (hc @ weight.t()).float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(1, lab[:, None])[:, 0]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_tokens: int, reduction: str, onednn: bool):
        # h: (N, D); weight: (V, D); labels: (N,) with IGNORE_INDEX where no loss is taken.
        N = h.shape[0]
        valid = labels != IGNORE_INDEX
        denom = valid.sum().clamp(min=1).to(torch.float32) if reduction == "mean" else torch.ones((), device=h.device)
        row_scale = valid.to(torch.float32) / denom  # (N,): d loss / d nll of each token
        targets = labels.clamp(min=0)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_grad else None
        # fp32 head-gradient accumulator; oneDNN fills it transposed, (D, V), which is its fast layout.
        grad_wt = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, N, chunk_tokens):
            end = min(start + chunk_tokens, N)
            hc, tgt, ok = h[start:end], targets[start:end], valid[start:end]
            rows = torch.arange(end - start, device=h.device)
            probs = _softmax_chunk(hc, weight, onednn)  # (c, V) fp32
            p_target = probs[rows, tgt]
            nll = -torch.log(p_target)
            tiny = (p_target < TINY_PROB) & ok
            if tiny.any():  # p(target) underflowed: take these rows' loss from their logits (rare; diverged model)
                nll[tiny] = _exact_nll(hc[tiny], weight, tgt[tiny])
            total += torch.where(ok, nll, 0.0).sum()  # not nll * ok: an unlabelled row's -log p may be inf
            if not want_grad:
                continue
            probs[rows, tgt] -= 1.0  # softmax - onehot: d nll / d logits, unscaled
            g = probs.to(h.dtype)
            scale = row_scale[start:end, None]
            # Row weights applied to the (c, D) operands: diag(s) G W = (G W) s, G^T diag(s) H = G^T (s H).
            grad_h[start:end] = (_mm_nt(g, weight.t(), onednn) * scale).to(h.dtype)
            hs = (hc * scale).to(h.dtype)
            if onednn:  # (D, c) x (c, V) -> (D, V): weight gradient, transposed
                part = _mm_nt(hs.t().contiguous(), g.t(), True)
            else:
                part = g.t() @ hs  # (V, D)
            # fp32 accumulation across chunks without an fp32 copy of each 16-bit part (6 bytes/weight at peak).
            grad_wt = part.float() if grad_wt is None else grad_wt.add_(part)
        if want_grad:
            if grad_wt is None:  # no tokens at all
                grad_w = torch.zeros_like(weight)
            else:
                grad_w = (grad_wt.t() if onednn else grad_wt).to(weight.dtype).contiguous()
            ctx.save_for_backward(grad_h, grad_w)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_out.device.type == "cpu" and float(grad_out) == 1.0:
            return grad_h, grad_w, None, None, None, None  # the usual loss.backward(): skip two full-size passes
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None


def fused_linear_cross_entropy(h, weight, labels, chunk_tokens: int = 1024, reduction: str = "mean",
                               onednn: bool = False):
    """Cross-entropy of `h @ weight.T` against `labels` (mean over labelled tokens, or sum), chunked over tokens.

    onednn: on CPU (fp32/bf16), run the matmuls through oneDNN instead of the default BLAS; same fp32 arithmetic."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; expected 'mean' or 'sum'")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be > 0 (0 means the plain loss, handled by the caller)")
    return _FusedLinearCrossEntropy.apply(h, weight, labels, chunk_tokens, reduction, _use_onednn(onednn, h))


def _chunk_nll(hc, weight, lab):
    logits = (hc @ weight.t()).float()  # (c, V)
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, lab.clamp(min=0)[:, None])[:, 0]
    return nll * (lab != IGNORE_INDEX)


def token_nll(h, weight, labels, chunk_tokens: int = 1024):
    """Per-token negative log-likelihood (N,), 0 where labels are IGNORE_INDEX; logits recomputed per chunk in
    backward, so memory stays at one chunk's logits (used for sequence log-probs: DPO, PTS, evaluation)."""
    from torch.utils.checkpoint import checkpoint

    chunk_tokens = chunk_tokens or h.shape[0]
    parts = []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (h[start:start + chunk_tokens], weight, labels[start:start + chunk_tokens])
        parts.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_nll(*args))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
