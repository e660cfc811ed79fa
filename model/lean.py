"""RMSNorm and SwiGLU as autograd functions that keep less for backward (`model.lean_activations`).

Plain autograd keeps, per token of a block in bf16: for each RMSNorm an fp32 copy of its input (4h bytes) and the
normalised bf16 tensor (2h) besides the output the next matmul keeps; for SwiGLU silu(gate) (2f) besides the gate|up
projection the matmul produced. These functions keep only their inputs (and the fp32 1/rms per token) and recompute
the rest in backward, elementwise work that is cheap next to the matmuls: 51.7 -> 36.7 bytes x s x b x h per
Phi-4 layer (`train/plan.py`, measured in `tests/test_plan.py`). The forward computes the same ops in the same
order as the plain path, so outputs are bit-identical; gradients agree to rounding (`tests/test_perf_switches.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype); saves x and rstd (fp32, one per token)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed32 = x.float() * rstd
        normed = normed32.to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g32 = (grad_out * weight).to(x.dtype).float()  # the gradient reaching the normalised tensor
            # d(x * rstd)/dx applied to g: rstd * (g - normed * mean(g * normed)) over the hidden dimension
            grad_x = (rstd * (g32 - normed32 * (g32 * normed32).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up from the fused gate|up projection; saves only that projection."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
        gate, up = gate_up.split(ffn_dim, dim=-1)
        ctx.save_for_backward(gate_up)
        ctx.ffn_dim = ffn_dim
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.split(ctx.ffn_dim, dim=-1)
        grad_up = grad_out * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)  # the kernel plain autograd calls
        return torch.cat((grad_gate, grad_up), dim=-1), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def swiglu(gate_up: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    return SwiGLUFunction.apply(gate_up, ffn_dim)
