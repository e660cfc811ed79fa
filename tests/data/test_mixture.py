"""Mixture math: Table 5 epochs, the manifest CLI, validation, the schedule, selection and held-out draws."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.config import DataConfig, SourceConfig
from data.mixture import (MixtureError, Schedule, epoch_entries, held_out_mask, load_mixture_config, main,
                          mixture_manifest, validate_mixture)
from data.shards import ShardWriter

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "configs" / "data" / "phi4_pretrain_mixture.yaml"
MIDTRAIN = REPO / "configs" / "data" / "phi4_midtrain_mixture.yaml"
TABLE5 = {"web": 1.2, "web_rewrites": 5.2, "synthetic": 13.8, "code": 2.4, "acquired": 1.7}


def test_table5_epochs_from_the_function():
    cfg, total = load_mixture_config(str(PRETRAIN))
    assert total == 10 * 10**12
    rows = mixture_manifest(cfg, total)
    assert {r["source"]: round(r["epochs"], 1) for r in rows} == TABLE5
    assert {r["source"]: r["fraction"] for r in rows} == {"web": 0.15, "web_rewrites": 0.15, "synthetic": 0.40,
                                                          "code": 0.20, "acquired": 0.10}
    assert sum(r["tokens_drawn"] for r in rows) == total
    assert rows[2]["tokens_drawn"] == 4 * 10**12 and rows[2]["unique_tokens"] == 290 * 10**9


def test_table5_epochs_from_the_cli():
    out = subprocess.run([sys.executable, "-m", "data.mixture", str(PRETRAIN), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    manifest = json.loads(out.stdout)
    assert {r["source"]: round(r["epochs"], 1) for r in manifest["sources"]} == TABLE5
    assert {r["source"]: r["provenance"] for r in manifest["sources"]}["web_rewrites"] == "synthetic"


def test_text_manifest_and_a_run_config_refused_with_the_way_out(tmp_path, capsys):
    assert main([str(PRETRAIN)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("synthetic "))
    assert line.split()[1:] == ["synthetic", "290.00B", "40.0%", "4.00T", "13.8"]
    assert "synthetic 55.0%, organic 45.0%" in text
    # A run config belongs to train/ (its token budget is derived there): the message names the planner that prints
    # its mixture (tests/train/test_plan.py) and the mixture file it includes.
    run = tmp_path / "run.yaml"
    run.write_text("stage: pretrain\ndata: {mixture: configs/data/phi4_pretrain_mixture.yaml}\n")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "run config" in err and "configs/data/phi4_pretrain_mixture.yaml" in err and "train.plan" in err


def test_bad_mixtures_are_refused_with_names(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("total_tokens: 1000\nsources:\n  - {name: web, weight: 0.6, unique_tokens: 10}\n"
                   "  - {name: code, weight: 0.3, unique_tokens: 10}\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "sum to 0.9" in err and "web=0.6, code=0.3" in err
    cases = [([SourceConfig(name="a", weight=1.0), SourceConfig(name="a", weight=0.0)], "duplicate"),
             ([SourceConfig(name="a", weight=1.0), SourceConfig(name="b", weight=0.0)], "'b': weight=0"),
             ([SourceConfig(name="a", weight=1.0, provenance="web")], "provenance"),
             ([SourceConfig(name="a", weight=1.0, upweight_factor=2.0)], "needs upweight_min_tokens"),
             ([], "no sources")]
    for sources, msg in cases:
        with pytest.raises(MixtureError, match=msg):
            validate_mixture(DataConfig(sources=sources))
    with pytest.raises(MixtureError, match="held_out_fraction"):
        validate_mixture(DataConfig(sources=[SourceConfig(name="a", weight=1.0)], held_out_fraction=1.0))
    typo = tmp_path / "typo.yaml"
    typo.write_text("total_tokens: 10\nsources:\n  - {name: a, weigth: 1.0}\n")
    assert main([str(typo)]) == 2 and "weigth" in capsys.readouterr().err


def test_midtraining_config_is_30_percent_long_and_70_percent_recall():
    cfg, total = load_mixture_config(str(MIDTRAIN))
    validate_mixture(cfg)
    assert total == 250 * 10**9
    long = [s for s in cfg.sources if s.min_doc_tokens > 0]
    assert abs(sum(s.weight for s in long) - 0.30) < 1e-9
    assert {(s.provenance, s.min_doc_tokens) for s in long} == {("organic", 8192), ("synthetic", 4096)}
    assert all(s.upweight_min_tokens == 16384 and s.upweight_factor > 1 for s in long if s.provenance == "organic")
    recall = [s for s in cfg.sources if s.min_doc_tokens == 0]
    assert [round(s.weight / 0.7, 6) for s in recall] == [0.15, 0.15, 0.40, 0.20, 0.10]  # Table 5 at 70%
    rows = mixture_manifest(cfg, total)
    assert [r["epochs"] is None for r in rows] == [True] * 3 + [False] * 5  # long sizes are unknown until prepared


def test_schedule_holds_the_ratios_at_every_prefix():
    for weights in ([0.15, 0.15, 0.4, 0.2, 0.1], [0.5, 0.3, 0.15, 0.05], [0.123457, 0.3, 0.576543], [0.9, 0.09, 0.01]):
        sched = Schedule.from_weights(weights)
        n = 200_000
        src, k = sched.locate(np.arange(n))
        onehot = np.zeros((n, len(weights)), dtype=np.int64)
        onehot[np.arange(n), src] = 1
        counts = onehot.cumsum(0)  # (n, S) samples of each source among the first i+1
        prefix = np.arange(1, n + 1)[:, None]
        assert np.abs(counts - prefix * np.asarray(weights)).max() < 2  # a bounded lag, in samples
        assert np.abs(counts[99:] / prefix[99:] - np.asarray(weights)).max() <= 0.01 + 1e-12  # within 1% from 100 samples on
        # k is the source's own running count: each source's samples are numbered 0, 1, 2, ... in order.
        assert np.array_equal(k, counts[np.arange(n), src] - 1)
        # Pure function of the index: a far-away sample needs no history.
        far = 10**12 + 12345
        s_far, k_far = sched.locate(far)
        assert k_far == sched.counts_before(far)[s_far]
        assert sched.counts_before(far + 1).sum() == far + 1
    table5 = Schedule.from_weights([0.15, 0.15, 0.4, 0.2, 0.1])
    assert table5.period == 20 and table5.counts.tolist() == [3, 3, 8, 4, 2]


def test_selection_and_held_out_draws():
    lengths = np.array([3, 9, 10, 11, 20, 21, 30], dtype=np.int64)  # text tokens 2, 8, 9, 10, 19, 20, 29
    src = SourceConfig(name="x", weight=1.0, min_doc_tokens=8, upweight_min_tokens=20, upweight_factor=3.0)
    assert epoch_entries(lengths, src).tolist() == [2, 3, 4, 5, 5, 5, 6, 6, 6]
    held = np.zeros(7, dtype=bool)
    held[5] = True
    assert epoch_entries(lengths, src, held).tolist() == [2, 3, 4, 6, 6, 6]
    assert epoch_entries(lengths, SourceConfig(name="y", weight=1.0)).tolist() == list(range(7))
    m = held_out_mask(1000, 0.05, seed=3)
    assert m.sum() == 50 and np.array_equal(m, held_out_mask(1000, 0.05, seed=3))
    assert not np.array_equal(m, held_out_mask(1000, 0.05, seed=4))
    assert held_out_mask(10, 0.0, 3).sum() == 0 and held_out_mask(10, 0.01, 3).sum() == 1


def test_manifest_of_a_prepared_source_applies_selection(tmp_path):
    w = ShardWriter(tmp_path / "books", "books", "organic", "fp", shard_tokens=50)
    lengths = [5, 30, 41, 60]  # text tokens 4, 29, 40, 59
    for n in lengths:
        w.add([7] * (n - 1) + [100257])
    w.close()
    src = SourceConfig(name="long_books", path=str(tmp_path / "books"), weight=1.0, min_doc_tokens=20,
                       upweight_min_tokens=40, upweight_factor=2.0)
    (row,) = mixture_manifest(DataConfig(sources=[src], total_tokens=1310))
    assert row["unique_tokens"] == 30 + 41 + 60
    assert row["pass_tokens"] == 30 + 2 * 41 + 2 * 60
    assert row["epochs"] == 10.0 and row["passes"] == 1310 / 232
