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
