"""The model on its own: exact 14B shape, packing with document masking, the fused loss, checkpointing, decoding."""
from __future__ import annotations

import math

import pytest
import torch

from model import transformer as transformer_module
from model.config import ModelConfig
from model.transformer import KVCache, Transformer, count_params
from tests.helpers.models import SMALL, small_model


def test_phi4_14b_on_meta_device_has_exact_parameter_count():
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    assert count_params(model) == 14_659_507_200 == ModelConfig().num_params()
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    cfg = model.cfg
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (
        40, 5120, 40, 10, 17920, 100_352)
    assert model.layers[0].attention.wqkv.weight.shape == (7680, 5120)  # Q 5120 | K 1280 | V 1280
    assert model.layers[0].feed_forward.w13.weight.shape == (35840, 5120)  # gate | up
    assert model.output.weight is not model.tok_embeddings.weight  # untied
    # FLOPs/token anchors (PaLM App. B / Megatron's formula for this shape): 94.9 and 125.1 GFLOP at 4K and 16K.
    assert cfg.flops_per_token(4096) / 1e9 == pytest.approx(94.9, abs=0.05)
    assert cfg.flops_per_token(16384) / 1e9 == pytest.approx(125.1, abs=0.05)


def test_initial_loss_is_log_vocab():
    model = small_model(vocab_size=100_352)
    x = torch.randint(0, 100_352, (2, 32))
    assert model(x, labels=x).item() == pytest.approx(math.log(100_352), abs=0.05)


def test_packed_documents_with_masking_equal_separate_documents(small):
    model = small
    lengths = [5, 11, 8, 8]  # two rows of 16 tokens: [5 | 11] and [8 | 8]
    docs = [torch.randint(0, 512, (n,)) for n in lengths]
    packed = torch.cat(docs).view(2, 16)
    cu = torch.tensor([0, 5, 16, 24, 32], dtype=torch.int32)
    logits = model(packed, cu_seqlens=cu).view(32, -1)
    offsets = [0, 5, 16, 24]
    for doc, start in zip(docs, offsets):
        alone = model(doc[None])[0]
        torch.testing.assert_close(logits[start:start + len(doc)], alone, atol=1e-5, rtol=1e-5)
    # Without masking the second document sees the first: results differ.
    unmasked = small_model(doc_masking=False)(packed, cu_seqlens=cu).view(32, -1)
    assert (unmasked[5:16] - logits[5:16]).abs().max() > 1e-3


def test_position_ids_restart_per_document():
    cu = torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32)
    pos = transformer_module.position_ids_from_cu_seqlens(cu, 2, 8)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
    x = torch.randint(0, 512, (2, 24))
    labels = torch.randint(0, 512, (2, 24))
    labels[0, :6] = -100
    results = []
    for chunk_tokens in (0, chunk):
        model = small_model(loss_chunk_tokens=chunk_tokens)
        for reduction in ("mean", "sum"):
            model.zero_grad()
            loss = model(x, labels=labels, reduction=reduction)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for (plain_loss, plain_grads), (fused_loss, fused_grads) in ((results[0], results[2]), (results[1], results[3])):
        torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-6)
        for a, b in zip(fused_grads, plain_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_per_token_nll_matches_full_logits():
    model = small_model(loss_chunk_tokens=5)
    x = torch.randint(0, 512, (2, 12))
    labels = x.roll(-1, dims=1)
    labels[:, -1] = -100
    nll = model(x, labels=labels, reduction="none")
    logp = torch.log_softmax(model(x).float(), dim=-1)
    expected = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_computes_the_same():
    x = torch.randint(0, 512, (2, 16))
    grads = []
    for ac in (False, True):
        model = small_model(activation_checkpointing=ac)
        model(x, labels=x).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward(small):
    model = small.eval()
    x = torch.randint(0, 512, (2, 10))
    full = model(x)
    cache = KVCache(model.cfg, batch_size=2, max_len=10, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        prefill = model(x[:, :6], kv_cache=cache)
        steps = [model(x[:, t:t + 1], kv_cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(prefill, full[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], atol=1e-5, rtol=1e-5)


def test_rope_theta_changes_outputs_and_is_config_only(small):
    model = small
    x = torch.randint(0, 512, (1, 32))
    before = model(x)
    model.set_rope_theta(250_000.0)
    assert model.cfg.rope_theta == 250_000.0 and not any("rope" in n for n, _ in model.named_parameters())
    assert (model(x) - before).abs().max() > 1e-4


class FlashAttnTestDouble:
    """A test double for flash-attn's two entry points (it cannot run without CUDA), written with SDPA,
    to check our varlen plumbing: packing layout, cu_seqlens, GQA head layout."""

    @staticmethod
    def flash_attn_func(q, k, v, causal):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)

    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        outs = []
        for s, e in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            outs.append(FlashAttnTestDouble.flash_attn_func(q[None, s:e], k[None, s:e], v[None, s:e], causal)[0])
        return torch.cat(outs)


def test_flash_varlen_path_matches_sdpa_with_test_double():
    """Our flash call (layouts, cu_seqlens over the flattened batch) against the SDPA block-diagonal path."""
    model = small_model(attn_backend="flash")
    cu = torch.tensor([0, 5, 16, 24, 32], dtype=torch.int32)
    ctx = model._attn_context(2, 16, torch.device("cpu"), cu, None, None, None)
    q = torch.randn(2, 4, 16, 16)
    k = torch.randn(2, 2, 16, 16)
    v = torch.randn(2, 2, 16, 16)
    via_flash = transformer_module.Attention._flash(FlashAttnTestDouble, q, k, v, ctx)
    via_sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=ctx.sdpa_mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(via_flash, via_sdpa, atol=1e-5, rtol=1e-5)
    unpacked = transformer_module.AttnContext(None, 16, None)  # no packing: flash_attn_func, plain causal
    torch.testing.assert_close(transformer_module.Attention._flash(FlashAttnTestDouble, q, k, v, unpacked),
                               torch.nn.functional.scaled_dot_product_attention(
                                   q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2), atol=1e-5, rtol=1e-5)


def torch_varlen_test_double(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size, enable_gqa):
    """A test double for torch.nn.attention.varlen.varlen_attn (CUDA only), with its signature, written with SDPA
    one document at a time, to check our call: (total, heads, hd) layouts, causal window, GQA."""
    assert window_size == (-1, 0) and cu_seq_q is cu_seq_k and max_q == max_k
    assert cu_seq_q.dtype == torch.int32 and max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    outs = []
    for s, e in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qd, kd, vd = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=enable_gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def test_torch_varlen_path_matches_sdpa_with_test_double():
    """Packed documents on a GPU without flash-attn go through PyTorch's varlen kernel; our call must equal the
    block-diagonal SDPA path."""
    model = small_model(attn_backend="flash")
    cu = torch.tensor([0, 3, 16, 20, 32], dtype=torch.int32)
    ctx = model._attn_context(2, 16, torch.device("cpu"), cu, None, None, None)
    q, k, v = torch.randn(2, 4, 16, 16), torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)
    via_varlen = transformer_module.Attention._torch_varlen(torch_varlen_test_double, q, k, v, ctx)
    torch.testing.assert_close(via_varlen, transformer_module.Attention._sdpa(q, k, v, ctx), atol=1e-5, rtol=1e-5)


def test_cuda_packing_with_a_varlen_kernel_builds_no_dense_mask(monkeypatch, caplog):
    """With a varlen kernel on the GPU the T x T mask (256 MB per 16K row) is never built; for SDPA (CPU) it is."""
    model = small_model(attn_backend="flash").to(torch.bfloat16)
    cu = torch.tensor([0, 5, 16, 24, 32], dtype=torch.int32)
    monkeypatch.setattr(transformer_module, "_FLASH", False)
    monkeypatch.setattr(transformer_module, "_TORCH_VARLEN", torch_varlen_test_double)
    ctx = model._attn_context(2, 16, torch.device("cuda"), cu, None, None, None)
    assert ctx.sdpa_mask is None and ctx.cu_seqlens.tolist() == cu.tolist() and ctx.max_seqlen == 11
    assert model._attn_context(2, 16, torch.device("cpu"), cu, None, None, None).sdpa_mask.shape == (2, 1, 16, 16)
    with pytest.raises(RuntimeError, match="without their block-diagonal mask"):
        transformer_module.Attention._sdpa(*(torch.randn(2, h, 16, 16) for h in (4, 2, 2)), ctx)

    # No varlen kernel on a GPU: the dense mask is built, and said once (the build itself needs a GPU, absent here).
    monkeypatch.setattr(transformer_module, "_TORCH_VARLEN", False)
    monkeypatch.setattr(transformer_module, "_WARNED_DENSE_MASK", False)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            try:
                model._attn_context(2, 16, torch.device("cuda"), cu, None, None, None)
            except (RuntimeError, AssertionError):  # torch without CUDA
                pass
    assert caplog.text.count("dense 16 x 16 mask per row") == 1, caplog.text


def test_masked_sdpa_gives_every_query_head_its_kv(monkeypatch, small):
    """CUDA SDPA falls back to its O(T^2) math kernel for enable_gqa with a mask, so masked calls repeat K/V;
    plain causal calls keep native GQA. Values and gradients equal the native-GQA call."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw["attn_mask"] is not None, kw["enable_gqa"]))
        return real(q, k, v, **kw)

    model = small
    cu = torch.tensor([0, 5, 16, 24, 32], dtype=torch.int32)
    ctx = model._attn_context(2, 16, torch.device("cpu"), cu, None, None, None)
    q, k, v = (torch.randn(2, h, 16, 16, requires_grad=True) for h in (4, 2, 2))
    monkeypatch.setattr(transformer_module.F, "scaled_dot_product_attention", spy)
    ours = transformer_module.Attention._sdpa(q, k, v, ctx)
    plain = transformer_module.Attention._sdpa(q, k, v, transformer_module.AttnContext(None, 16, None))
    assert calls == [(4, 4, True, False), (4, 2, False, True)]
    reference = real(q, k, v, attn_mask=ctx.sdpa_mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ours, reference)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    assert plain.shape == ours.shape


def test_missing_flash_attn_falls_back_to_sdpa_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(transformer_module, "_FLASH", None)
    import builtins

    real_import = builtins.__import__

    def no_flash(name, *args, **kwargs):
        if name == "flash_attn":
            raise ImportError("no flash-attn here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flash)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert transformer_module._flash_attn() is False
    assert sum("falling back to PyTorch SDPA" in r.message for r in caplog.records) == 1


def test_bad_shapes_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(**{**SMALL, "n_kv_heads": 3}).validate()
    with pytest.raises(ValueError, match="attn_backend"):
        ModelConfig(**{**SMALL, "attn_backend": "xformers"}).validate()
