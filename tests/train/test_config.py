"""Every shipped config loads and validates; bad configs fail at load with the key, file and choices named."""
from __future__ import annotations

import re

from pathlib import Path

import pytest

from data.configfile import ConfigError
from train.config import REPO_ROOT, RunConfig, grad_accum_steps, load_config

CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def schema_for(path: Path):
    """The schema of a shipped config, by where it lives; a new kind of file must be added here."""
    from data.config import DataConfig
    from data.decontaminate import DecontaminateConfig
    from data.prepare import PrepareConfig
    from data.post.config import PostDataConfig
    from data.synth.config import SynthConfig
    from model.config import ModelConfig
    from train.eval.config import EvalConfig
    from train.pts.config import PTSConfig
    from train.recipe.runner import Recipe

    rel = path.relative_to(REPO_ROOT / "configs")
    if rel.parts[0] == "model":
        return ModelConfig
    if rel.parts[0] == "recipes":
        return Recipe
    if rel.parts[0] == "data":
        return DecontaminateConfig if rel.name.startswith("decontaminate") else DataConfig
    if "synth" in rel.parts[:-1] or rel.name == "synth.yaml":
        return SynthConfig
    if rel.name.startswith("post_"):
        return PostDataConfig
    if rel.name.startswith("eval"):
        return EvalConfig
    by_name = {"prepare.yaml": PrepareConfig, "pts.yaml": PTSConfig}
    return by_name.get(rel.name, RunConfig)


def test_configs_exist():
    names = {str(p.relative_to(REPO_ROOT / "configs")) for p in CONFIGS}
    for required in ("model/phi4-14b.yaml", "model/tiny.yaml", "model/small.yaml", "model/1b.yaml",
                     "phi4-14b/pretrain.yaml", "phi4-14b/midtrain.yaml", "smoke/pretrain.yaml",
                     "smoke/midtrain.yaml", "recipes/smoke.yaml", "data/phi4_pretrain_mixture.yaml"):
        assert required in names, required


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path, schema=schema_for(path))
    if isinstance(cfg, RunConfig):
        assert cfg.train.max_steps > 0
        assert cfg.model.vocab_size == 100_352
    if type(cfg).__name__ == "Recipe":
        for stage in cfg.stages:
            if stage.config:
                load_config(REPO_ROOT / stage.config, schema=schema_for(REPO_ROOT / stage.config))


def test_phi4_stage_values():
    pre = load_config(REPO_ROOT / "configs/phi4-14b/pretrain.yaml")
    mid = load_config(REPO_ROOT / "configs/phi4-14b/midtrain.yaml")
    assert pre.model.num_params() == 14_659_507_200
    assert (pre.model.rope_theta, pre.train.seq_len, pre.optim.lr, pre.optim.weight_decay) == (1e4, 4096, 3e-4, 0.1)
    assert pre.train.global_batch == 5760 and pre.train.max_steps == 423_856  # ceil(10T / (5760 x 4096))
    assert [s.weight for s in pre.data.sources] == [0.15, 0.15, 0.40, 0.20, 0.10]  # Table 5
    assert (mid.model.rope_theta, mid.train.seq_len, mid.model.max_seq_len) == (250_000.0, 16384, 16384)
    assert mid.optim.lr == pytest.approx(pre.optim.lr / 10)
    assert mid.train.total_tokens == 250_000_000_000
    assert grad_accum_steps(pre, 1920) == 3


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_the_key_and_the_choices(tmp_path):
    p = _write(tmp_path, "model: {preset: tiny}\ntrain: {max_steps: 2, globl_batch: 8}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.globl_batch'.*global_batch"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'optim.learning_rate'.*\blr\b"):
        load_config(_write(tmp_path, "train: {max_steps: 2}\n"), ["optim.learning_rate=1"])


def test_wrong_type_and_bad_choice(tmp_path):
    p = _write(tmp_path, "train: {max_steps: two}\n")
    with pytest.raises(ConfigError, match=r"train.max_steps"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage=4; expected one of \[0, 1, 2, 3\]"):
        load_config(_write(tmp_path, "train: {max_steps: 2}\n"), ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"logging.wandb.mode='cloud'"):
        load_config(_write(tmp_path, "train: {max_steps: 2}\n"), ["logging.wandb.mode=cloud"])
    with pytest.raises(ConfigError, match=r"model.checkpoint_every=0 must be >= 1"):
        load_config(_write(tmp_path, "train: {max_steps: 2}\n"), ["model.checkpoint_every=0"])


def test_invalid_yaml_names_the_line(tmp_path):
    p = _write(tmp_path, "train:\n  max_steps: 2\n  seq_len: [1, 2\n")
    with pytest.raises(ConfigError, match=r"run.yaml line \d+: invalid YAML"):
        load_config(p)


def test_missing_preset_lists_available(tmp_path):
    with pytest.raises(ConfigError, match=r"model.preset='huge' not found.*tiny"):
        load_config(_write(tmp_path, "model: {preset: huge}\ntrain: {max_steps: 1}\n"))


def test_derived_values_and_overrides(tmp_path):
    p = _write(tmp_path, "model: {preset: tiny}\ntrain: {seq_len: 512, global_batch: 8, total_tokens: 40000}\n")
    with pytest.raises(ConfigError, match="train.seq_len=512 is longer than the model's context model.max_seq_len=128"):
        load_config(p)  # a window past the model's context is never grown silently
    cfg = load_config(p, ["train.micro_batch=2", "optim.betas=[0.9, 0.99]", "model.max_seq_len=512"])
    assert cfg.train.max_steps == 10  # ceil(40000 / (8 x 512))
    assert cfg.model.max_seq_len == 512
    assert cfg.optim.betas == [0.9, 0.99]
    assert grad_accum_steps(cfg, 2) == 2
    with pytest.raises(ConfigError, match="not divisible"):
        grad_accum_steps(cfg, 3)


def test_list_entries_can_be_overridden():
    cfg = load_config(REPO_ROOT / "configs/smoke/pretrain.yaml", ["data.sources.1.weight=0.5"])
    assert cfg.data.sources[1].weight == 0.5


def test_smoke_configs_follow_the_recipe_directory(monkeypatch):
    """Every path of a smoke config moves with the recipe's output_dir (PHI4_RECIPE_DIR), so two smoke runs in
    different directories never read each other's data."""
    import dataclasses
    import json

    monkeypatch.setenv("PHI4_RECIPE_DIR", "/elsewhere/recipe")
    for path in sorted((REPO_ROOT / "configs" / "smoke").glob("*.yaml")):
        text = json.dumps(dataclasses.asdict(load_config(path, schema=schema_for(path))))
        assert "runs/smoke" not in text, f"{path.name} has a path that ignores PHI4_RECIPE_DIR"
        assert "/elsewhere/recipe" in text, path.name


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-0.001", "optim.lr=-0.001; expected a finite value > 0"),
    ("optim.lr=.nan", "optim.lr=nan; expected a finite value > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1; expected a finite value >= 0"),
    ("optim.warmup_fraction=2", "optim.warmup_fraction=2.0; expected a finite value in [0, 1)"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5"),
    ("train.seq_len=100000", "train.seq_len=100000 is longer than the model's context"),
])
def test_numeric_ranges_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(REPO_ROOT / "configs/smoke/pretrain.yaml", [override])
