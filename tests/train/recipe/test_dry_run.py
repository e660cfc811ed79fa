"""`python -m train.recipe RECIPE --dry-run`: the shipped recipes pass, and each way the 14B chain was broken is caught
(a mixture path nothing produces, an 8K final model, a batch its GPUs do not divide, a silent RoPE theta change)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.helpers.train import REPO
from train.recipe.cli import main

RECIPE_14B = REPO / "configs" / "recipes" / "phi4-14b.yaml"


def _dry_run(capsys, recipe, *args) -> tuple[int, str]:
    rc = main([str(recipe), "--dry-run", *args])
    return rc, capsys.readouterr().out


def _broken(tmp_path, stage: str, **change) -> str:
    """A temp copy of the 14B recipe with one stage changed (its overrides, or its resources)."""
    raw = yaml.safe_load(RECIPE_14B.read_text())
    raw["output_dir"] = str(tmp_path / "run")
    entry = next(s for s in raw["stages"] if s["name"] == stage)
    entry.update(change)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def test_shipped_14b_recipe_passes_and_plans_every_stage(capsys):
    rc, out = _dry_run(capsys, RECIPE_14B, "--gpus", "1920")
    assert rc == 0, out
    assert "no problems" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("pretrain ", "midtrain "))}
    assert rows["pretrain"][2:4] == ["240", "1,920"] and rows["midtrain"][2:4] == ["180", "1,440"]
    assert "midtrain: rope_theta 10000 -> 250000, max_seq_len 4,096 -> 16,384" in out
    assert "export: a 16,384-token model" in out
    # the datasets a user brings are listed, not failed; nothing the chain makes itself is among them
    assert "post_dpo: judge_pairs.prompts[0]: supplied by you: data/post/prompts/dpo (not found)" in out
    for made in ("pts/pairs.jsonl", "data/phi4/shards", "post_sft/sft.", "post_dpo/dpo."):
        assert made not in out, made  # the post stages write what SFT and both DPO rounds read


def test_strict_fails_on_datasets_you_supply(capsys):
    rc, out = _dry_run(capsys, RECIPE_14B, "--strict")
    assert rc == 2 and "problem: post_sft: sft.prompts[0]: supplied by you: data/post/prompts/sft" in out, out


def test_dpo_without_the_stage_that_makes_its_pairs_is_caught(tmp_path, capsys):
    raw = yaml.safe_load(RECIPE_14B.read_text())
    raw["output_dir"] = str(tmp_path / "run")
    raw["stages"] = [s for s in raw["stages"] if s["name"] != "post_dpo"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out = _dry_run(capsys, str(path))
    assert rc == 2, out
    assert "problem: dpo_pts: data.dpo_sources[1] (hallucination).path" in out
    assert "problem: dpo: data.dpo_sources[0] (judge_pairs).path" in out and "no earlier stage produces it" in out


def test_smoke_recipe_passes(capsys):
    rc, out = _dry_run(capsys, REPO / "configs" / "recipes" / "smoke.yaml")
    assert rc == 0 and "no problems; 0 dataset(s)" in out, out
    assert "export: a 512-token model" in out


@pytest.mark.parametrize("stage,change,needle", [
    # 1. wiring: a mixture source that no prepare stage writes
    ("midtrain", {"overrides": ["data.sources.0.path=data/phi4/shards/books"]},
     "problem: midtrain: data.sources[0] (long_acquired).path: data/phi4/shards/books: no earlier stage produces it"),
    # 2. context: the final model trained and exported at 8K
    ("dpo", {"overrides": ["model.max_seq_len=8192"]},
     "problem: dpo: model.max_seq_len: 8,192 in the last training stage"),
    # 3. world size: midtraining on the pretraining's 240 nodes
    ("midtrain", {"nodes": 240},
     "problem: midtrain: batch: train.global_batch=1440 is not divisible by train.micro_batch=1 x world size 1920"),
    # 4. transition: SFT silently back at pretraining's RoPE theta
    ("sft", {"overrides": ["model.rope_theta=10000"]},
     "problem: sft: model.rope_theta: 10000 after 250000 in midtrain: only a midtrain"),
])
def test_each_break_is_caught_and_named(tmp_path, capsys, stage, change, needle):
    rc, out = _dry_run(capsys, _broken(tmp_path, stage, **change))
    assert rc == 2, out
    assert needle in out, out


def test_context_growth_outside_midtraining_is_refused(tmp_path, capsys):
    rc, out = _dry_run(capsys, _broken(tmp_path, "pretrain", overrides=["model.max_seq_len=8192"]))
    assert rc == 0, out  # the first stage starts from nothing: its context is its own
    path = _broken(tmp_path, "sft", overrides=["model.max_seq_len=32768", "train.seq_len=32768"])
    rc, out = _dry_run(capsys, path)
    assert rc == 2 and "problem: sft: model.max_seq_len: 32,768 exceeds the longest context trained so far" in out


@pytest.mark.slow  # tests/conftest.py asks it of every `-m train.recipe` process; this one trains nothing (~5 s)
def test_command_line_dry_run(tmp_path):
    """The real entry point: exit status 2 and the problem on stdout, no training started."""
    proc = subprocess.run([sys.executable, "-m", "train.recipe", _broken(tmp_path, "dpo_pts", nodes=5),
                           "--dry-run"], check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "dpo_pts: batch: train.global_batch=64 is not divisible" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_bad_resources_are_config_errors(tmp_path, capsys):
    rc = main([_broken(tmp_path, "sft", time="two days"), "--dry-run"])
    assert rc == 2 and "stages[5] (sft).time='two days'" in capsys.readouterr().err
    rc = main([_broken(tmp_path, "pts", nodes=4), "--dry-run"])
    assert rc == 2 and "nodes > 1 only for train stages" in capsys.readouterr().err
