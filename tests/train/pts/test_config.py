"""The Pivotal Token Search config (train/pts/config.py): shipped configs load; bad values are refused by key."""
from __future__ import annotations

import pytest

from data.configfile import ConfigError
from train.config import REPO_ROOT, load_config
from train.pts.config import PTSConfig


@pytest.mark.parametrize("name", ["smoke", "phi4-14b"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO_ROOT / "configs" / name / "pts.yaml", schema=PTSConfig)
    assert cfg.p_gap == 0.2 and (cfg.p_low, cfg.p_high) == (0.2, 0.8)
    # the paper's sampler runs at 1.0; the smoke's tiny model samples sharper (0.5) or it only emits noise
    assert cfg.temperature == (1.0 if name == "phi4-14b" else 0.5)
    assert 100265 in cfg.eos_ids


def test_bad_config_is_explained():
    path = REPO_ROOT / "configs" / "smoke" / "pts.yaml"
    with pytest.raises(ConfigError, match="p_low"):
        load_config(path, ["p_low=0.9"], schema=PTSConfig)
    with pytest.raises(ConfigError, match="rolouts"):
        load_config(path, ["rolouts=3"], schema=PTSConfig)
