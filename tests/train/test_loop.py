"""The trainer as users run it: real DeepSpeed processes under torchrun (gloo, 2 ranks), real checkpoints."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.train import (REPO, check, exit_status, make_sources, metrics, run_train, train_losses,
                                 write_run_config)

pytestmark = pytest.mark.slow
EXIT_REQUEUE, EXIT_CONFIG = 75, 2


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return root, make_sources(root / "shards")


def _run(work, name, nproc=2, zero=0, overrides=(), expected=0, **sections):
    root, sources = work
    run_dir = root / name
    cfg = write_run_config(root / f"{name}.yaml", sources, run_dir, deepspeed={"zero_stage": zero}, **sections)
    proc = run_train(cfg, list(overrides), nproc=nproc)
    check(proc, expected)
    return run_dir, cfg, proc


@pytest.fixture(scope="module")
def reference(work):
    """2 ranks, ZeRO 0, 6 steps, wandb offline: the run the others are compared with."""
    return _run(work, "ref_z0", logging={"wandb": {"mode": "offline"}})[0]


@pytest.fixture(scope="module")
def reference_z3(work):
    return _run(work, "ref_z3", zero=3)[0]


def test_pretraining_lowers_loss_and_logs(reference):
    records = metrics(reference)
    losses = train_losses(reference)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.25, losses
    assert abs(losses[1] - math.log(100_352)) < 0.5  # initial loss ~ ln V
    first = records[0]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "perf/mfu",
                "data/provenance/synthetic", "data/tokens/org"):
        assert key in first, key
    assert first["tokens_seen"] == 4 * 64
    assert first["lr"] == pytest.approx(2e-2)  # warmup of 1 step reaches the peak at step 1
    assert any(k.startswith("eval/loss/") for r in records for k in r)
    # wandb wrote a real offline run whose history holds the logged loss
    runs = list((reference / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0
    assert (reference / "config.yaml").is_file() and (reference / "deepspeed.json").is_file()
    ds = json.loads((reference / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 2  # 4 / (1 x 2 ranks)
    assert exit_status(reference)["status"] == "completed"


@pytest.mark.parametrize("zero,offload", [(1, False), (2, False), (2, True)])
def test_zero_stages_match_zero0(work, reference, zero, offload):
    overrides = ["deepspeed.offload_optimizer=true"] if offload else []  # optimizer states in CPU memory
    run_dir = _run(work, f"z{zero}{'_offload' if offload else ''}", zero=zero, overrides=overrides)[0]
    ref, got = train_losses(reference), train_losses(run_dir)
    assert got.keys() == ref.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (step, got, ref)
    # Our ZeRO-0 gradient norm (read before the step) against DeepSpeed's own for the partitioned stages.
    ref_norms = {r["step"]: r["grad_norm"] for r in metrics(reference) if "loss" in r}
    got_norms = {r["step"]: r["grad_norm"] for r in metrics(run_dir) if "loss" in r}
    assert got_norms == pytest.approx(ref_norms, rel=1e-4), (got_norms, ref_norms)


def test_zero3_matches_zero0(reference, reference_z3):
    ref, got = train_losses(reference), train_losses(reference_z3)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), (step, got, ref)


@pytest.mark.parametrize("zero", [0, 3])
def test_resume_is_bit_identical_and_ignores_half_written(work, reference, reference_z3, zero):
    name = f"resume_z{zero}"
    run_dir, cfg, _ = _run(work, name, zero=zero, overrides=["train.stop_after_steps=2"], expected=1)
    # torchrun reports the workers' 75 as 1; the trainer's own status says why it stopped.
    assert exit_status(run_dir)["status"] == "preempted"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    # A save killed half-way: files of a later step without the completion marker.
    partial = run_dir / "checkpoints" / "step_00000005"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02partial")
    check(run_train(cfg, [], nproc=2))
    ref = train_losses(reference if zero == 0 else reference_z3)
    got = train_losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # no step lost or repeated
    for step in ref:
        assert got[step] == ref[step], (step, got[step], ref[step])  # bit-identical


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_the_gpu_precision_trains_close_to_fp32_and_resumes_bit_identically(work, reference, zero):
    """train.precision=bf16 (what `auto` picks on GPUs: DeepSpeed's bf16 engine, fp32 master weights), run here on
    CPU under gloo: close to the fp32 run, not equal to it, and resumed without a bit of difference."""
    full = _run(work, f"bf16_z{zero}", zero=zero, overrides=["train.precision=bf16"])[0]
    assert json.loads((full / "deepspeed.json").read_text())["bf16"] == {"enabled": True}
    ref, got = train_losses(reference), train_losses(full)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert any(got[s] != ref[s] for s in ref)  # bf16 math really ran
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=0.05), (step, got, ref)
    run_dir, cfg, _ = _run(work, f"bf16_resume_z{zero}", zero=zero,
                           overrides=["train.precision=bf16", "train.stop_after_steps=3"], expected=1)
    check(run_train(cfg, ["train.precision=bf16"], nproc=2))
    resumed = train_losses(run_dir)
    assert resumed == got, (resumed, got)  # bit-identical, every step


def test_resume_on_one_process_from_two(work):
    """ZeRO-2 checkpoint of 2 ranks, resumed by 1 process through DeepSpeed's universal checkpoint."""
    root, _ = work
    full = _run(work, "ws_full", zero=2)[0]
    run_dir, cfg, _ = _run(work, "ws_change", zero=2, overrides=["train.stop_after_steps=3"], expected=1)
    check(run_train(cfg, [], nproc=1))
    ref, got = train_losses(full), train_losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(4, 7):  # the same global batches: same data order on another world size
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got, ref)


def test_injected_nan_is_skipped_and_counted(work):
    run_dir = _run(work, "nan_once", nproc=1, overrides=["train.debug_nan_steps=[2]"])[0]
    recs = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert math.isnan(recs[2]["loss"]) and recs[2]["train/skipped_steps"] == 1
    assert recs[1]["train/skipped_steps"] == 0 and recs[6]["train/skipped_steps"] == 1
    assert all(math.isfinite(recs[s]["loss"]) for s in (1, 3, 4, 5, 6))


def test_stream_of_nans_stops_with_message(work):
    run_dir, _, proc = _run(work, "nan_stream", nproc=1, expected=1,
                            overrides=["train.debug_nan_steps=[2,3,4]", "train.max_bad_steps_in_row=3"])
    status = exit_status(run_dir)
    assert status["status"] == "failed" and "3 steps in a row" in status["message"]
    assert "non-finite" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000004"


def test_sigterm_saves_and_exits_requeue_code(work):
    root, sources = work
    run_dir = root / "sigterm"
    cfg = write_run_config(root / "sigterm.yaml", sources, run_dir, train={"max_steps": 500, "save_every": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "train", str(cfg)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                          and len(train_losses(run_dir)) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, out[-3000:]
    status = exit_status(run_dir)
    assert status["status"] == "preempted" and 2 <= status["step"] < 500
    assert (run_dir / "checkpoints" / f"step_{status['step']:08d}" / "meta.json").is_file()


def test_midtraining_loads_pretraining_and_switches_rope_and_length(work, reference):
    run_dir, _, proc = _run(work, "midtrain", nproc=1, stage="midtrain",
                            model={"rope_theta": 250_000.0},
                            train={"seq_len": 128, "max_steps": 3, "init_from": str(reference)},
                            optim={"lr": 3e-4})
    assert f"initialising weights from checkpoint {reference}" in proc.stderr
    saved = json.loads(next((run_dir / "checkpoints").glob("step_*/meta.json")).read_text())["config"]
    assert saved["model"]["rope_theta"] == 250_000.0 and saved["train"]["seq_len"] == 128
    assert saved["model"]["max_seq_len"] >= 128
    mid, pre = train_losses(run_dir), train_losses(reference)
    # Starting from trained weights, the first midtraining loss is far below a fresh model's ln V.
    assert mid[1] < pre[1] - 0.5 and all(math.isfinite(v) for v in mid.values())


@pytest.mark.parametrize("override,needle,nproc", [
    ("train.global_batch=3", "not divisible by train.micro_batch=1 x world size 2", 2),
    ("train.bogus_key=1", "unknown key 'train.bogus_key'", 2),
    ("train.micro_batch=3", "train.global_batch=4 is not divisible by train.micro_batch=3", 1),
])
def test_config_errors_fail_before_any_process_group(work, override, needle, nproc):
    root, sources = work
    run_dir = root / "bad"
    cfg = write_run_config(root / "bad.yaml", sources, run_dir)
    proc = run_train(cfg, [override], nproc=nproc)
    assert proc.returncode == (EXIT_CONFIG if nproc == 1 else 1)  # torchrun reports any worker failure as 1
    assert needle in proc.stderr
    assert "Initializing TorchBackend" not in proc.stderr  # DeepSpeed never started a process group
    assert not run_dir.exists()


def test_export_zero3_checkpoint_loads_in_transformers_with_same_logits(reference_z3, tmp_path):
    import torch
    import transformers

    from train.checkpoint import load_model

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "train.export", str(reference_z3), str(out), "--dtype", "fp32"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 6  # the summary is the last line
    ours, _ = load_model(reference_z3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    x = torch.randint(0, 100_352, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == 100265 and tok.pad_token_id == 100349


def test_in_loop_benchmark_eval(work):
    """train.eval_config runs the eval harness on the live model at each evaluation and logs eval/ metrics."""
    root, sources = work
    eval_cfg = root / "inloop_eval.yaml"
    eval_cfg.write_text(f"perplexity:\n  - {{name: syn, path: {sources['syn']}, held_out_fraction: 0.05, "
                        f"seed: 1234, max_tokens: 300}}\n")
    run_dir = _run(work, "inloop", nproc=1, train={"max_steps": 2, "eval_every": 1,
                                                     "eval_config": str(eval_cfg)})[0]
    evals = [r for r in metrics(run_dir) if "eval/ppl/syn/perplexity" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(1.0 < r["eval/ppl/syn/perplexity"] < 200_000 for r in evals)
    assert "eval/loss/syn" in evals[0]  # the held-out loss is logged with it
