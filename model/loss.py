"""Fused LM head + cross-entropy: the full (N, V) fp32 logits never exist at once.

Each chunk of tokens is projected, its softmax gradient computed right away, and only the gradients w.r.t. the hidden
states and the head weight are kept for backward. Peak extra memory is one chunk's logits, and no recompute is needed.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_tokens: int, reduction: str):
        # h: (N, D); weight: (V, D); labels: (N,) with IGNORE_INDEX where no loss is taken.
        valid = labels != IGNORE_INDEX
        denom = valid.sum().clamp(min=1).to(torch.float32) if reduction == "mean" else torch.ones((), device=h.device)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            hc, lab = h[start:start + chunk_tokens], labels[start:start + chunk_tokens]
            ok = valid[start:start + chunk_tokens]
            logits = (hc @ weight.t()).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, lab.clamp(min=0)[:, None])[:, 0]
            total += ((lse - target) * ok).sum()
            if want_grad:
                grad_logits = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place over the logits buffer
                grad_logits[torch.arange(len(lab), device=h.device), lab.clamp(min=0)] -= 1.0
                grad_logits *= (ok.to(torch.float32) / denom)[:, None]
                g = grad_logits.to(h.dtype)
                grad_h[start:start + chunk_tokens] = g @ weight
                grad_w.addmm_(g.t().float(), hc.float())  # fp32 accumulation across chunks
        if want_grad:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def fused_linear_cross_entropy(h, weight, labels, chunk_tokens: int = 1024, reduction: str = "mean"):
    """Cross-entropy of `h @ weight.T` against `labels` (mean over labelled tokens, or sum), chunked over tokens."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; expected 'mean' or 'sum'")
    return _FusedLinearCrossEntropy.apply(h, weight, labels, chunk_tokens, reduction)


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
