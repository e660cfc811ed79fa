"""Benchmark plumbing (train.bench.cpu, train.bench.gpu): arguments, the comparison's fairness, formulas, reports.

No timed assertions: speed targets are measured by `python -m train.bench`, never asserted here.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import train.bench.cpu as bench
import train.bench.gpu as bench_gpu
from model import transformer as transformer_module
from model.config import ModelConfig
from tests.helpers.models import SMALL, small_model
from train import plan
from train.bench import data as bench_data
from train.bench import step as bench_step
from train.bench import timing


def test_arguments_defaults_and_refusals():
    args = bench.parse_args([])
    assert args.only == list(bench.BENCHES) and args.repeats >= 3 and args.compile
    assert (args.batch, args.seq, args.mem_batch * args.mem_seq) == (4, 256, 4096)
    assert bench.parse_args(["--only", "step", "mfu", "--no-compile"]).only == ["step", "mfu"]
    for bad in (["--repeats", "0"], ["--only", "nonsense"], ["--seq", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_interleaved_runs_every_variant_in_alternating_order():
    calls = []
    runs = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    for r in runs.values():
        assert len(r["wall_s"]) == len(r["cpu_s"]) == 3
        assert r["median_wall_s"] == sorted(r["wall_s"])[1]


def test_hf_twin_has_our_weights_and_computes_our_loss_and_gradients():
    ours = small_model(0, max_seq_len=16, doc_masking=False, loss_chunk_tokens=0)
    hf = bench_step.hf_twin(ours)
    assert hf.config._attn_implementation == "sdpa" and not hf.config.tie_word_embeddings
    assert sum(p.numel() for p in hf.parameters()) == ours.cfg.num_params()
    x, labels = bench_step.make_batch(ours.cfg, 2, 16)
    loss_ours = ours(x, labels=labels)
    loss_hf = hf(input_ids=x, labels=x).loss
    torch.testing.assert_close(loss_ours, loss_hf, atol=1e-5, rtol=1e-5)
    loss_ours.backward()
    loss_hf.backward()
    torch.testing.assert_close(ours.output.weight.grad, hf.lm_head.weight.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.tok_embeddings.weight.grad, hf.model.embed_tokens.weight.grad,
                               atol=1e-6, rtol=1e-4)


@pytest.mark.slow  # the step and MFU benchmarks end to end: four timed models and a GEMM peak (~20 CPU-seconds)
def test_step_and_mfu_benchmarks_report_consistent_figures(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--only", "step", "mfu", "--batch", "1", "--seq", "32", "--repeats", "1", "--no-compile",
                       "--ablation", "--gemm-n", "256", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    step, mfu = res["step"], res["mfu"]
    assert res["machine"]["threads"] >= 1 and res["machine"]["torch"] == torch.__version__
    # Same weights and data: both start at ln(V) and agree (bench_step refuses to time a mismatched pair).
    assert step["initial_loss"]["ours"] == pytest.approx(np.log(100_352), abs=0.3)
    assert step["initial_loss"]["ours"] == pytest.approx(step["initial_loss"]["hf"], abs=1e-3)
    assert step["ratio"] == pytest.approx(step["ours_tokens_per_s"] / step["hf_tokens_per_s"])
    assert step["ours_tokens_per_s"] == pytest.approx(32 / step["runs"]["ours"]["median_wall_s"])
    assert set(step["runs"]) == {"ours", "hf", "ours_blas", "ours_plain_loss"}
    assert step["ratio_blas"] == pytest.approx(step["ours_blas_tokens_per_s"] / step["hf_tokens_per_s"])
    flops = bench_step.tiny_config(32).flops_per_token(32)
    assert mfu["flops_per_token"] == flops
    assert mfu["peak_flops"] == max(mfu["gemm_flops"].values())
    assert mfu["ours"]["flops"] == pytest.approx(flops * step["ours_tokens_per_s"])
    assert mfu["ours"]["mfu"] == pytest.approx(mfu["ours"]["flops"] / mfu["peak_flops"])
    assert set(mfu) >= {"hf", "ours_blas", "ours_plain_loss"}


def test_peak_rss_sees_memory_touched_inside_the_block():
    import mmap

    with bench_step.PeakRSS() as peak:
        # 64 MiB of fresh anonymous pages, written, then unmapped before the block ends (a fresh mapping, not the
        # heap: after many tests in one process malloc may reuse pages that are already resident)
        buf = mmap.mmap(-1, 64 * 2**20)
        for offset in range(0, len(buf), 4096):
            buf[offset] = 1
        buf.close()
    assert peak.growth >= 48 * 2**20
    assert peak.peak >= peak.base + peak.growth - 1


def test_memory_child_reports_one_step(capsys):
    assert bench.main(["--memory-child", "ours", "--mem-batch", "1", "--mem-seq", "32"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["model"] == "ours" and r["tokens"] == 32
    assert r["peak_rss_bytes"] >= r["base_rss_bytes"] > 0
    assert r["step_growth_bytes"] == r["peak_rss_bytes"] - r["base_rss_bytes"]


def test_loader_benchmark_reads_real_shards_and_reports_wait_fractions():
    args = bench.parse_args(["--loader-tokens", "100000", "--loader-batches", "3"])
    res = bench_data.bench_loader(args, {"ours_tokens_per_s": 1000.0})
    assert set(res) == {"4096", "16384"}
    for seq_len, r in res.items():
        assert r["seq_len"] == int(seq_len) and r["batches"] == 3
        assert r["wait_fraction_tiny_cpu"] == pytest.approx(1000.0 / r["tokens_per_s"])
        step_s = int(seq_len) * ModelConfig().flops_per_token(int(seq_len)) / (989e12 * 0.40)
        assert r["wait_fraction_14b_h100"] == pytest.approx(r["ms_per_batch"] / 1000 / step_s)


def test_tokenize_benchmark_text_is_real_and_nonempty(tmp_path):
    (tmp_path / "a.py").write_text("print('hello')\n")
    (tmp_path / "empty.py").write_text("\n")
    (tmp_path / "b.py").write_text("x = 1\n" * 100)
    assert bench_data.bench_texts(str(tmp_path), 10**6) == ["print('hello')\n", "x = 1\n" * 100]
    with pytest.raises(FileNotFoundError, match="no readable"):
        bench_data.bench_texts(str(tmp_path / "missing"), 10)


def test_summary_states_ratios_and_verdicts():
    res = {"machine": {"cpu": "X", "cores": 2, "threads": 2, "torch": "t", "transformers": "h", "loadavg": [1, 1, 1]},
           "step": {"batch": 4, "seq_len": 256, "ours_tokens_per_s": 900.0, "hf_tokens_per_s": 450.0, "ratio": 2.0,
                    "cpu_ratio": 1.9},
           "memory": {"batch": 1, "seq_len": 4096, "ratio": 0.6, "ratio_total_peak": 0.7,
                      **{k: {"step_growth_bytes": 2**30} for k in ("ours", "ours_plain", "hf")}}}
    text = bench.summary(res)
    assert "ratio 2.00" in text and "target met, >= 1.5" in text
    assert "ratio 0.60 (TARGET NOT MET, <= 0.5)" in text


# ---- the GPU script's CPU-safe parts ----------------------------------------------------------------------------

def test_gpu_proxy_has_the_14b_layer_shape_and_flop_formula():
    cfg = bench_gpu.model_config("proxy14b", 4096)
    full = ModelConfig()
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers) == (
        full.dim, full.n_heads, full.n_kv_heads, full.ffn_dim, full.vocab_size, 4)
    per_layer = (full.num_params() - 2 * full.vocab_size * full.dim - full.dim) // full.n_layers
    assert per_layer == 340_787_200 + 2 * 5120  # 340.8 M matrices + 2 norms per Phi-4 layer
    non_embedding = 4 * per_layer + full.vocab_size * full.dim + full.dim  # LM head counted, as PaLM does
    for seq in (4096, 16384):
        expected = 6 * non_embedding + 12 * 4 * 40 * 128 * seq
        assert bench_gpu.model_config("proxy14b", seq).flops_per_token(seq) == expected
    one_b = bench_gpu.model_config("1b", 16384)
    assert (one_b.dim, one_b.n_layers, one_b.max_seq_len, one_b.doc_masking) == (2048, 16, 16384, False)
    with pytest.raises(FileNotFoundError, match="no such preset"):
        bench_gpu.model_config("nope.yaml", 4096)


def test_gpu_prediction_is_the_planners_zero0_layout():
    cfg = bench_gpu.model_config("proxy14b", 4096)
    psi = cfg.num_params()
    pred = bench_gpu.planned_bytes(cfg, 4096, 1, checkpointing=True)
    assert pred["model_states"] == 20 * psi  # bf16 params + grads, fp32 master/m/v, fp32 grad copy
    sbh, layer = 4096 * 1 * cfg.dim, 4096 * plan.layer_activation_bytes_per_token(cfg)
    assert pred["activations"] == plan.ACT_BYTES_AC * sbh * 4 + layer
    assert bench_gpu.planned_bytes(cfg, 4096, 1, checkpointing=False)["activations"] == layer * 4
    assert pred["total"] == pred["model_states"] + pred["activations"] + pred["loss"]


def test_gpu_arguments():
    args = bench_gpu.parse_args([])
    assert args.models == ["1b", "proxy14b"] and args.seqs == [4096, 16384] and args.ac == ["off", "on"]
    assert args.dtype == "bf16" and args.attn == "flash"
    assert args.doc_len == [0]
    assert bench_gpu.parse_args(["--ac", "off", "2"]).ac == ["off", "2"]  # every other block
    for bad in (["--steps", "0"], ["--ac", "maybe"], ["--ac", "1"], ["--seqs", "1"], ["--doc-len", "-1"]):
        with pytest.raises(SystemExit):
            bench_gpu.parse_args(bad)


def test_gpu_loop_runs_on_cpu_and_prints_one_table(tmp_path, capsys):
    # The measuring loop itself, on CPU with a toy model: real steps, real MixedPrecisionAdamW; figures not judged.
    model_yaml = tmp_path / "toy.yaml"
    model_yaml.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--device", "cpu", "--models", str(model_yaml), "--seqs", "32", "--steps", "2",
                           "--warmup", "1", "--tokens-per-step", "64", "--peak-tflops", "1", "--doc-len", "0", "8",
                           "--ac", "off", "on", "2", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["seq_len"], r["doc_len"], r["micro_batch"], r["ac"], r["ac_every"], r["status"], r["attn"])
            for r in rows] == [("toy", 32, d, 2, ac, every, "ok", "sdpa")
                               for d in (0, 8) for ac, every in ((False, 1), (True, 1), (True, 2))]
    acts = [r["planned_bytes"]["activations"] for r in rows[:3]]
    assert acts[1] < acts[2]  # every block checkpointed keeps less than every other one
    assert " 1/2 " in table.splitlines()[5]
    for r in rows:
        assert r["tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0)
        assert 5.0 < r["loss"] < 7.0  # ln 512 = 6.24 after two tiny steps
    assert table.count("device: cpu") == 1 and table.count("toy") == 6


def test_gpu_packed_rows_use_document_boundaries(monkeypatch):
    cu, longest = bench_gpu.packed_cu_seqlens(2, 10, 4, torch.device("cpu"))
    assert cu.tolist() == [0, 4, 8, 10, 14, 18, 20] and cu.dtype == torch.int32 and longest == 4
    assert bench_gpu.model_config("proxy14b", 4096, 4096).doc_masking is False  # one document fills the row
    assert bench_gpu.model_config("proxy14b", 4096, 1024).doc_masking is True
    # The table names the kernel the model itself chooses (model.transformer.attention_kernel).
    kernel = transformer_module.attention_kernel
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(transformer_module, "_FLASH", False)
    monkeypatch.setattr(transformer_module, "_TORCH_VARLEN", lambda *a, **k: None)
    assert [kernel("flash", cuda, bf16, True), kernel("flash", cuda, bf16, False), kernel("sdpa", cuda, bf16, True),
            kernel("flash", cpu, bf16, True), kernel("flash", cuda, torch.float32, True),
            kernel("flash", cuda, bf16, True, decoding=True)] == ["varlen", "sdpa", "sdpa", "sdpa", "sdpa", "sdpa"]
    monkeypatch.setattr(transformer_module, "_FLASH", object())  # flash-attn installed
    assert kernel("flash", cuda, bf16, False) == kernel("flash", cuda, bf16, True) == "flash"


def test_gpu_table_marks_targets_and_failed_rows():
    base = {"model": "proxy14b", "micro_batch": 1, "ac": True, "attn": "flash", "planned_bytes": {"total": 40 * 2**30}}
    rows = [{**base, "seq_len": 4096, "status": "ok", "tokens_per_s": 4800.0, "tflops": 455.0, "mfu": 0.46,
             "peak_bytes": 38 * 2**30, "peak_vs_plan": 0.95},
            {**base, "seq_len": 16384, "status": "ok", "tokens_per_s": 3000.0, "tflops": 375.0, "mfu": 0.38,
             "peak_bytes": 41 * 2**30, "peak_vs_plan": 1.02},
            {**base, "seq_len": 16384, "ac": False, "status": "OOM"}]
    table = bench_gpu.format_table(rows, "NVIDIA H100 80GB HBM3", 989e12)
    lines = table.splitlines()
    assert ">= 45%: met" in lines[3] and ">= 40%: NOT MET" in lines[4] and "OOM" in lines[5]
    assert ">= 45%" not in bench_gpu.format_table(rows[:1], "NVIDIA A100", 312e12)  # H100 targets only
    packed = bench_gpu.format_table([{**rows[0], "doc_len": 1024}], "NVIDIA H100 80GB HBM3", 989e12)
    assert ">= 45%" not in packed and " 1024 " in packed.splitlines()[3]  # targets are for unpacked rows


def test_gpu_script_refuses_to_run_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_gpu.main(["--steps", "1"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
