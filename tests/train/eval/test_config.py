"""The evaluation config (train/eval/config.py): the shipped smoke config loads; bad values fail naming the key."""
from __future__ import annotations

import pytest

from data.configfile import ConfigError
from train.config import REPO_ROOT, load_config
from train.eval.config import EvalConfig


def test_smoke_config_loads_and_bad_values_are_named(tmp_path):
    cfg = load_config(REPO_ROOT / "configs/smoke/eval.yaml", ["model_path=somewhere"], schema=EvalConfig)
    assert cfg.model_path == "somewhere" and cfg.multiple_choice[0].path.endswith("eval_mc.jsonl")
    assert {t.prompt for t in cfg.generative} == {"plain", "chat"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("multiple_choice:\n  - {name: x, path: x.jsonl, format: essay}\n")
    with pytest.raises(ConfigError, match=r"multiple_choice\[0\].format='essay'; expected one of \['text', "):
        load_config(bad, schema=EvalConfig)
    with pytest.raises(ConfigError, match="recal"):
        load_config(bad, ["recal.samples=3"], schema=EvalConfig)


def test_renamed_primary_says_what_to_use(tmp_path):
    bad = tmp_path / "old.yaml"
    for old, new in (("mean", "per_token"), ("sum", "acc")):
        bad.write_text(f"multiple_choice:\n  - {{name: x, path: x.jsonl, primary: {old}}}\n")
        with pytest.raises(ConfigError, match=rf"multiple_choice\[0\].primary='{old}' was renamed: use '{new}'"):
            load_config(bad, schema=EvalConfig)
    bad.write_text("multiple_choice:\n  - {name: x, path: x.jsonl, primary: acc_mean}\n")
    with pytest.raises(ConfigError, match=r"primary='acc_mean'; expected one of \['acc', 'acc_norm', 'per_token'\]"):
        load_config(bad, schema=EvalConfig)


def test_mmlu_format_needs_the_dev_split(tmp_path):
    bad = tmp_path / "mmlu.yaml"
    bad.write_text("multiple_choice:\n  - {name: mmlu, path: t.jsonl, k_shot: 5, format: mmlu}\n")
    with pytest.raises(ConfigError, match=r"multiple_choice\[0\] \(mmlu\): format=mmlu takes its shots from the dev"):
        load_config(bad, schema=EvalConfig)
    bad.write_text("multiple_choice:\n  - {name: mmlu, path: t.jsonl, k_shot: 5, format: mmlu, fewshot_path: d}\n")
    assert load_config(bad, schema=EvalConfig).multiple_choice[0].format == "mmlu"
