"""The main job, end to end: `python -m train.recipe configs/recipes/smoke.yaml` on a CPU (the project's widest test)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.train import REPO, train_losses

pytestmark = pytest.mark.slow
TRAIN_STAGES = ("pretrain", "midtrain", "sft", "dpo_pts", "dpo")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, "-m", "train.recipe", "configs/recipes/smoke.yaml", f"output_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out, proc


def test_every_training_stage_lowers_its_loss(smoke_run):
    out, _ = smoke_run
    for stage in TRAIN_STAGES:
        losses = train_losses(out / stage)
        steps = sorted(losses)
        third = max(1, len(steps) // 3)  # means over thirds: batches of different sources differ in loss
        first = sum(losses[s] for s in steps[:third]) / third
        last = sum(losses[s] for s in steps[-third:]) / third
        assert last < first, (stage, losses)


def test_pts_writes_pairs_and_dpo_learns_the_preference(smoke_run):
    out, _ = smoke_run
    pairs = [json.loads(line) for line in (out / "pts" / "pairs.jsonl").read_text().splitlines() if line.strip()]
    assert pairs, "Pivotal Token Search found no pair"
    for pair in pairs:
        assert len(pair["chosen_ids"]) == 1 and len(pair["rejected_ids"]) == 1 and pair["prompt_ids"]
    late = [r for r in map(json.loads, (out / "dpo" / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-3:]
    assert sum(r["dpo/rewards_accuracy"] for r in late) / 3 > 0.5  # the last steps prefer the chosen answers
    assert sum(r["dpo/rewards_margin"] for r in late) / 3 > 0


def test_export_loads_in_transformers_with_the_checkpoints_logits(smoke_run):
    import transformers

    from train.checkpoint import load_model

    out, _ = smoke_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "export" / "hf", dtype=torch.float32)
    ours, _ = load_model(out / "dpo")
    x = torch.randint(0, 100_352, (2, 32))
    with torch.no_grad():
        # The export is bf16 (the released model's dtype): compare against our weights rounded the same way.
        torch.testing.assert_close(hf(x).logits, ours.to(torch.bfloat16).float()(x), atol=2e-2, rtol=2e-2)


def test_summary_plots_and_evals_before_and_after(smoke_run):
    out, proc = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]][:4] == ["data", "synth", "prepare", "pretrain"]
    assert (out / "summary.md").read_text().count("| train |") == len(TRAIN_STAGES)
    for stage in TRAIN_STAGES:
        assert (out / "plots" / f"{stage}.png").stat().st_size > 1000
    by_name = {s["name"]: s for s in summary["stages"]}
    assert by_name["eval_base"]["scores"] and by_name["eval_final"]["scores"]


def test_synth_stage_feeds_the_pretraining_mixture(smoke_run):
    """The synthetic-data engine ran on our own model (in process), and its web rewrites are a pretraining source."""
    out, _ = smoke_run
    by_name = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    synth = by_name["synth"]["synth"]
    made = synth["records"]["web_rewrite"]
    assert made > 0 and {"seeds", "rewrite", "revision", "plurality_organic", "reversal", "dedup"} <= set(synth["steps"])
    manifest = json.loads((out / "data" / "synth" / "manifest.json").read_text())
    for step, e in manifest["steps"].items():
        assert e["in"] == e["kept"] + sum(e["dropped"].values()), step
    shards = json.loads((out / "data" / "shards" / "web_rewrites" / "manifest.json").read_text())
    assert shards["num_docs"] == made and "web_rewrites" in (out / "pretrain" / "stage.log").read_text()


def test_post_training_data_and_the_dpo_rounds_shares(smoke_run):
    """The post-training builders ran on our models (the policy: the previous training stage), SFT and both DPO rounds
    read their files as weighted sources, and the summary shows the drawn shares."""
    out, _ = smoke_run
    by_name = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    sft_files, dpo_files = by_name["post_sft"]["post"]["files"], by_name["post_dpo"]["post"]["files"]
    assert sft_files["sft.hallucination.jsonl"] > 0 and sft_files["sft.safety.jsonl"] > 0
    assert dpo_files["dpo.hallucination.jsonl"] > 0 and dpo_files["dpo.safety.jsonl"] > 0
    manifest = json.loads((out / "data" / "post_dpo" / "manifest.json").read_text())
    assert manifest["roles"]["policy"]["model"].startswith(f"inprocess:{out / 'sft'}")  # the SFT model
    for pair in map(json.loads, (out / "data" / "post_dpo" / "dpo.hallucination.jsonl").read_text().splitlines()):
        assert 1 <= len(pair["chosen_ids"]) <= 5 and 1 <= len(pair["rejected_ids"]) <= 5
    for stage, main in (("sft", "chat"), ("dpo_pts", "pts"), ("dpo", "preference")):
        shares = by_name[stage]["shares"]
        assert set(shares) >= {main, "hallucination", "safety"} and shares[main] > 0.8, (stage, shares)
    md = (out / "summary.md").read_text()
    assert md.count("drawn shares") == 3 and "WARNING: safety" not in md


def test_rerun_skips_completed_stages(smoke_run):
    out, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "train.recipe", "configs/recipes/smoke.yaml", f"output_dir={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already complete") == len(json.loads((out / "summary.json").read_text())["stages"])


def test_one_stage_and_summary_only_modes(smoke_run, tmp_path):
    """--stage NAME reruns one stage's record check (skipped: complete), --summary rewrites the summary from disk;
    an unknown stage is a configuration error naming the stages."""
    out, _ = smoke_run
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "train.recipe", "configs/recipes/smoke.yaml", f"output_dir={out}", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    one = run("--stage", "export")
    assert one.returncode == 0 and one.stdout.count("already complete") == 1, one.stdout + one.stderr
    before = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    summary = run("--summary")
    assert summary.returncode == 0, summary.stderr[-2000:]
    after = json.loads((out / "summary.json").read_text())
    assert [(e["name"], e["status"], e.get("steps")) for e in after["stages"]] == [
        (e["name"], e["status"], e.get("steps")) for e in before["stages"]]
    bad = run("--stage", "nosuch")
    assert bad.returncode == 2 and "--stage nosuch: no such stage" in bad.stderr and "dpo_pts" in bad.stderr
