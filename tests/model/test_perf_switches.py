"""Speed switches compute the same thing as the plain path: losses and gradients equal within fp32 tolerance.

Switches: `loss_chunk_tokens` (fused chunked LM head + cross-entropy vs full logits), `onednn_loss` (its matmuls
through oneDNN vs the default BLAS) and `lean_activations` (RMSNorm and SwiGLU recompute in backward), plus the fused loss's own fast paths (in-place softmax, -log p with an exact
fallback, row weights folded into the small matmul operands, the 16-bit branch used on GPUs).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.loss import TINY_PROB, fused_linear_cross_entropy, onednn_available
from tests.helpers.models import small_model

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


def _loss_and_grads(h, weight, labels, reduction="mean", **kw):
    """Loss and (dh, dW) of the fused loss (chunk_tokens in kw) or, without kw, of plain full-logits cross-entropy."""
    h, weight = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    if kw:
        loss = fused_linear_cross_entropy(h, weight, labels, reduction=reduction, **kw)
    else:
        loss = F.cross_entropy((h @ weight.t()).float(), labels, ignore_index=-100, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


def _assert_same(a, b, atol=1e-5, rtol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=rtol)


@needs_onednn
@pytest.mark.parametrize("chunk", [5, 64])
def test_onednn_switch_equals_blas_and_plain_in_the_model(chunk):
    x = torch.randint(0, 512, (2, 24))
    labels = torch.randint(0, 512, (2, 24))
    labels[1, 10:] = -100
    results = {}
    for name, overrides in (("plain", dict(loss_chunk_tokens=0)),
                            ("blas", dict(loss_chunk_tokens=chunk, onednn_loss=False)),
                            ("onednn", dict(loss_chunk_tokens=chunk, onednn_loss=True))):
        model = small_model(0, **overrides)
        for reduction in ("mean", "sum"):
            model.zero_grad()
            loss = model(x, labels=labels, reduction=reduction)
            loss.backward()
            results[name, reduction] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for reduction in ("mean", "sum"):
        _assert_same(results["blas", reduction], results["plain", reduction])
        _assert_same(results["onednn", reduction], results["plain", reduction])


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_fused_loss_at_the_full_vocabulary_matches_plain(onednn):
    # The real width (100,352 columns) exercises the in-place row softmax beyond any small-vocab tiling.
    torch.manual_seed(0)
    h, weight = torch.randn(40, 16), torch.randn(100_352, 16) * 0.5
    labels = torch.randint(0, 100_352, (40,))
    labels[::7] = -100
    plain = _loss_and_grads(h, weight, labels)
    _assert_same(_loss_and_grads(h, weight, labels, chunk_tokens=16, onednn=onednn), plain)


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_underflowed_target_probability_takes_the_exact_loss(onednn):
    # Token 0's target logit sits ~300 below the row max: p(target) underflows to 0 in fp32 and -log p would be inf.
    h = torch.zeros(3, 4)
    h[:, 0] = 1.0
    weight = torch.zeros(10, 4)
    weight[5, 0], weight[2, 0] = 300.0, -1.0
    labels = torch.tensor([2, 5, -100])
    plain = _loss_and_grads(h, weight, labels, reduction="sum")
    assert torch.exp(-(plain[0] - 0.0)) < TINY_PROB  # the case is real: the summed loss is ~300
    fused = _loss_and_grads(h, weight, labels, reduction="sum", chunk_tokens=2, onednn=onednn)
    assert torch.isfinite(fused[0])
    _assert_same(fused, plain, atol=1e-4)


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_16bit_branch_matches_plain_16bit_loss(onednn):
    # The branch GPUs take (bf16 logits, fp32 softmax, fp32 accumulation of the head gradient across chunks).
    torch.manual_seed(0)
    h, weight = torch.randn(48, 32).bfloat16(), (torch.randn(300, 32) * 0.3).bfloat16()
    labels = torch.randint(0, 300, (48,))
    labels[:5] = -100
    plain = _loss_and_grads(h, weight, labels)
    fused = _loss_and_grads(h, weight, labels, chunk_tokens=16, onednn=onednn)
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    _assert_same(fused, plain, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_no_labelled_tokens_gives_zero_loss_and_gradients(onednn):
    h, weight = torch.randn(6, 8), torch.randn(20, 8)
    labels = torch.full((6,), -100)
    loss, dh, dw = _loss_and_grads(h, weight, labels, chunk_tokens=4, onednn=onednn)
    assert loss.item() == 0.0 and not dh.any() and not dw.any()


@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_upstream_gradient_scales_and_no_grad_forward_agrees(onednn):
    torch.manual_seed(1)
    h = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (12,))
    (3.0 * fused_linear_cross_entropy(h, weight, labels, 5, onednn=onednn)).backward()
    plain = _loss_and_grads(h, weight, labels)
    torch.testing.assert_close(h.grad, 3.0 * plain[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, 3.0 * plain[2], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, weight, labels, 5, onednn=onednn), plain[0])


@needs_onednn
def test_onednn_matmul_is_full_fp32_precision():
    # oneDNN must not trade precision (bf16/tf32 math) for its speed: its error against fp64 is BLAS-sized.
    torch.manual_seed(0)
    a, b = torch.randn(64, 2048), torch.randn(300, 2048)
    exact = a.double() @ b.double().t()
    blas_err = ((a @ b.t()).double() - exact).abs().max()
    onednn_err = (torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "").double() - exact).abs().max()
    assert onednn_err < 4 * blas_err + 1e-4  # bf16 math would be ~1e-1 here, fp32 ~1e-4


def test_bad_arguments_are_refused():
    h, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, weight, labels, 2, reduction="none")
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_linear_cross_entropy(h, weight, labels, 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lean_activations_switch_equals_plain_autograd(dtype, tol):
    """Same forward bits, same gradients (to rounding) as plain autograd, for every parameter and the input; also
    under activation checkpointing, and with packed documents."""
    x = torch.randint(0, 512, (2, 24))
    labels = torch.randint(0, 512, (2, 24))
    cu = torch.tensor([0, 7, 24, 30, 48], dtype=torch.int32)
    results = {}
    for lean in (False, True):
        for ac in (False, True):
            model = small_model(0, lean_activations=lean, activation_checkpointing=ac).to(dtype)
            loss = model(x, labels=labels, cu_seqlens=cu)
            loss.backward()
            hidden = model(x, cu_seqlens=cu, return_hidden=True)
            results[lean, ac] = [loss.detach(), hidden.detach()] + [p.grad.clone() for p in model.parameters()]
    for ac in (False, True):
        plain, lean = results[False, ac], results[True, ac]
        assert torch.equal(plain[0], lean[0]) and torch.equal(plain[1], lean[1])  # forward: bit-identical
        for name, a, b in zip(["loss", "hidden", *(n for n, _ in model.named_parameters())], plain, lean):
            scale = a.double().abs().max().clamp_min(1e-6)
            assert ((a.double() - b.double()).abs().max() / scale) <= tol, name


def test_lean_functions_match_autograd_on_their_own():
    """RMSNorm and SwiGLU functions against autograd of the same formulas, including a weight that broadcasts over
    (B, T) and gradients that reach only some inputs."""
    from model.lean import rms_norm, swiglu

    torch.manual_seed(0)  # fp32: the norm computes in fp32 whatever the input dtype
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16)).requires_grad_()
    g = torch.randn(3, 5, 16)
    plain = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    ours = rms_norm(x, w, 1e-5)
    assert torch.equal(plain, ours)
    expected = torch.autograd.grad(plain, (x, w), g)
    for a, b in zip(expected, torch.autograd.grad(ours, (x, w), g)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    frozen = rms_norm(x, w.detach(), 1e-5)  # only x needs a gradient
    torch.testing.assert_close(torch.autograd.grad(frozen, x, g)[0], expected[0], atol=1e-6, rtol=1e-5)
    gate_up = torch.randn(3, 5, 2 * 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, 8, dtype=torch.float64)
    gate, up = gate_up.split(8, dim=-1)
    ref = F.silu(gate) * up
    assert torch.equal(ref, swiglu(gate_up, 8))
    torch.testing.assert_close(torch.autograd.grad(swiglu(gate_up, 8), gate_up, gy)[0],
                               torch.autograd.grad(ref, gate_up, gy)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_checkpointing_every_nth_block_equals_no_checkpointing(every):
    """Recomputing every N-th block in backward changes memory only: the same loss and gradients, bit for bit."""
    x, labels = torch.randint(0, 512, (2, 24)), torch.randint(0, 512, (2, 24))
    results = []
    for ac in (False, True):
        model = small_model(0, n_layers=4, activation_checkpointing=ac, checkpoint_every=every)
        recomputed = []
        for i, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: recomputed.append(i))
        model(x, labels=labels).backward()
        results.append([p.grad for p in model.parameters()])
        forwards = [recomputed.count(i) for i in range(4)]
        assert forwards == ([2 if ac and i % every == 0 else 1 for i in range(4)]), forwards  # who is recomputed
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_blocks_equal_eager():
    """train.compile (each block through torch.compile, as train/loop.py does) computes the eager model's loss and
    gradients, with packed documents, activation checkpointing and lean activations on."""
    x, labels = torch.randint(0, 512, (2, 24)), torch.randint(0, 512, (2, 24))
    boundaries = [torch.tensor(c, dtype=torch.int32)
                  for c in ([0, 7, 24, 30, 48], [0, 3, 5, 24, 40, 48], [0, 1, 2, 3, 24, 26, 30, 48])]
    from torch._dynamo.utils import counters

    results, graphs = {}, []
    counters.clear()
    for compiled in (False, True):
        model = small_model(0, activation_checkpointing=True)
        if compiled:
            for layer in model.layers:
                layer.compile()
        for i, cu in enumerate(boundaries):  # other documents each batch: one recompile (cu_seqlens turns dynamic)
            model.zero_grad()
            loss = model(x, labels=labels, cu_seqlens=cu)
            loss.backward()
            results[compiled, i] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[-2] > 0 and not counters["graph_break"], (graphs, dict(counters["graph_break"]))
    for i in range(len(boundaries)):
        _assert_same(results[True, i], results[False, i])
