"""init_from transitions: only a midtrain stage changes RoPE theta or grows the context past the longest one the
weights were trained at; the record travels along a chain of checkpoints (meta.json `context`)."""
from __future__ import annotations

import json

import pytest

from train.config import ConfigError, load_config
from train.transition import check_transition


def _checkpoint(root, theta, max_seq_len, longest=None):
    step = root / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    meta = {"step": 10, "config": {"model": {"rope_theta": theta, "max_seq_len": max_seq_len}}}
    if longest is not None:
        meta["context"] = {"longest_trained": longest, "rope_theta": theta}
    (step / "meta.json").write_text(json.dumps(meta))
    (root / "checkpoints" / "latest").write_text("step_00000010")
    return root


def _cfg(path, stage_config, **model):
    overrides = [f"train.init_from={path}"] + [f"model.{k}={v}" for k, v in model.items()]
    return load_config(stage_config, overrides + ["data.sft_sources=[]", "data.sft_path=x.jsonl"]
                       if "sft" in stage_config else overrides)


def test_midtrain_may_switch_theta_and_grow_the_context(tmp_path):
    src = _checkpoint(tmp_path / "pre", 10000.0, 128, longest=128)
    cfg = load_config("configs/smoke/midtrain.yaml", [f"train.init_from={src}"])
    ctx = check_transition(cfg)
    assert ctx["changes"] == ["rope_theta 10000 -> 250000", "max_seq_len 128 -> 512"]
    assert ctx["longest_trained"] == 512 and ctx["rope_theta"] == 250000.0


def test_other_stages_may_not(tmp_path):
    src = _checkpoint(tmp_path / "mid", 250000.0, 512, longest=512)
    with pytest.raises(ConfigError, match=r"stage sft\): model.rope_theta=10000 but the weights were trained with 250000"):
        check_transition(_cfg(src, "configs/smoke/sft.yaml", rope_theta=10000.0))
    with pytest.raises(ConfigError, match=r"max_seq_len=1,024 exceeds the longest context .* \(512\)"):
        check_transition(_cfg(src, "configs/smoke/dpo.yaml", max_seq_len=1024))


def test_shorter_then_longer_again_along_a_chain(tmp_path):
    """SFT at 256 after midtraining at 512 records 512; DPO at 512 from that SFT is within it."""
    mid = _checkpoint(tmp_path / "mid", 250000.0, 512, longest=512)
    sft_ctx = check_transition(_cfg(mid, "configs/smoke/sft.yaml"))
    assert sft_ctx["longest_trained"] == 512 and sft_ctx["changes"] == []
    sft = _checkpoint(tmp_path / "sft", 250000.0, 256, longest=sft_ctx["longest_trained"])
    assert check_transition(_cfg(sft, "configs/smoke/dpo.yaml"))["longest_trained"] == 512
    unrecorded = _checkpoint(tmp_path / "old", 250000.0, 256)  # from before contexts were recorded: allowed, warned
    assert check_transition(_cfg(unrecorded, "configs/smoke/dpo.yaml"))["longest_trained"] == 512


def test_hf_source(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"rope_theta": 250000.0, "max_position_embeddings": 16384}))
    with pytest.raises(ConfigError, match="rope_theta=10000"):
        check_transition(_cfg(tmp_path, "configs/smoke/dpo.yaml", rope_theta=10000.0))
    assert check_transition(_cfg(tmp_path, "configs/smoke/dpo.yaml"))["longest_trained"] == 16384
