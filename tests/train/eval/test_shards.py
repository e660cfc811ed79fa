"""Evaluation as array shards (train/eval/shards.py): N shards merged give exactly one process's records (metrics
and samples), sampled tasks included; the CLI's --shard/--merge; a missing or stale shard is named."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.helpers.eval_models import random_model
from tests.helpers.files import eval_results, write_jsonl
from train.eval.config import EvalConfig, GenerativeTask, MultipleChoiceTask, PerplexitySource, RecallProbe
from train.eval.run import TASK_SECTIONS, main, run_tasks
from train.eval.shards import merge_shards, shard_path, write_shard

CPU = torch.device("cpu")
INFO = {"source": "model-dir", "step": 3}


def _config(tmp_path, **overrides) -> EvalConfig:
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"What is {i} + 1?", "choices": [str(i + 1), "7", "x y"],
                                             "answer": 0} for i in range(7)])
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question": f"{i} + {i}?", "answer": str(2 * i)} for i in range(5)])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "words " * (3 + 5 * i)} for i in range(5)])
    return EvalConfig(output_dir=str(tmp_path / "out"), batch_size=1, seq_len=16, **{"seed": 5,
        "multiple_choice": [MultipleChoiceTask(name="mc", path=mc, k_shot=1)],
        "generative": [GenerativeTask(name="greedy", path=qs, max_new_tokens=4),
                       GenerativeTask(name="sampled", path=qs, max_new_tokens=4, temperature=0.9, num_samples=2)],
        "perplexity": [PerplexitySource(name="t", path=text, provenance="organic")],
        "recall": RecallProbe(lengths=[160, 192], samples=2), **overrides})


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


@pytest.mark.parametrize("n", [2, 3])
def test_merged_shards_equal_one_process(tok, tmp_path, n):
    model = random_model(1)
    cfg = _config(tmp_path)
    one = run_tasks(model, tok, cfg, CPU)
    assert {r["kind"] for r in one} == {"multiple_choice", "generative", "perplexity", "perplexity_by_provenance",
                                        "recall"}
    counts = [0] * len(one)
    for i in range(n):
        part = run_tasks(model, tok, cfg, CPU, (i, n))
        for j, r in enumerate(part):
            counts[j] += len(r.get("samples", []))
            assert all(s["index"] % n == i for s in r.get("samples", []))
        write_shard(cfg, i, n, part, INFO, "lbl")
    records, info, label = merge_shards(cfg, n, TASK_SECTIONS)
    assert _strip(records) == _strip(one)  # metrics, samples and their order: exactly one process's
    assert info == INFO and label == "lbl"
    sampled = next(r for r in one if r["task"] == "sampled")
    assert sampled["metrics"]["items"] == 5 and len(sampled["samples"]) == 10
    assert counts[[r["task"] for r in one].index("mc")] == 6  # 7 rows less the shot


def test_sampled_completions_do_not_depend_on_the_batch(tok, tmp_path):
    """Per-row generators: a batch of 4 samples the same completions as batches of 1."""
    model = random_model(2)
    cfg = _config(tmp_path, multiple_choice=[], perplexity=[], recall=RecallProbe(lengths=[]))
    alone = run_tasks(model, tok, cfg, CPU)
    batched = run_tasks(model, tok, dataclasses.replace(cfg, batch_size=4), CPU)
    pick = [[s["completion"] for s in r["samples"]] for r in alone]
    assert pick == [[s["completion"] for s in r["samples"]] for r in batched]
    assert len(set(pick[1])) > 1  # the sampled task really samples


def test_merge_names_missing_and_stale_shards(tok, tmp_path):
    model = random_model(1)
    cfg = _config(tmp_path, perplexity=[], recall=RecallProbe(lengths=[]))
    write_shard(cfg, 0, 3, run_tasks(model, tok, cfg, CPU, (0, 3)), INFO, "x")
    other = _config(tmp_path, perplexity=[], recall=RecallProbe(lengths=[]), seed=6)
    write_shard(other, 1, 3, run_tasks(model, tok, other, CPU, (1, 3)), INFO, "x")
    with pytest.raises(ValueError) as e:
        merge_shards(cfg, 3, TASK_SECTIONS)
    assert "shard-00001.json was written for another config" in str(e.value)
    assert f"{shard_path(cfg, 2, 3)} is missing" in str(e.value)


def test_cli_shards_then_merge_write_one_process_results(tok, tmp_path):
    from train.export.hf import to_hf

    to_hf(random_model(3), tmp_path / "hf")
    cfg = _config(tmp_path, perplexity=[])
    raw = {"model_path": str(tmp_path / "hf"), "batch_size": 1, "seed": cfg.seed, "label": "final",
           "multiple_choice": [{"name": "mc", "path": cfg.multiple_choice[0].path, "k_shot": 1}],
           "generative": [{"name": "sampled", "path": cfg.generative[1].path, "max_new_tokens": 4,
                           "temperature": 0.9, "num_samples": 2}],
           "recall": {"lengths": [160], "samples": 3}}
    for name in ("one", "arr"):
        (tmp_path / f"{name}.yaml").write_text(json.dumps({**raw, "output_dir": str(tmp_path / name)}))
    assert main([str(tmp_path / "one.yaml")]) == 0
    arr = str(tmp_path / "arr.yaml")
    assert main([arr, "--merge", "2"]) == 1  # nothing to merge yet
    for i in range(2):
        assert main([arr, "--shard", f"{i}/2"]) == 0
    assert main([arr, "--shard", "1/2"]) == 0  # already done: exits at once
    assert not (tmp_path / "arr" / "results.jsonl").exists()  # shards alone write no results
    assert main([arr, "--merge", "2"]) == 0
    assert eval_results(tmp_path / "arr") == eval_results(tmp_path / "one") and len(eval_results(tmp_path / "one")) == 3
    for f in (tmp_path / "one" / "samples").iterdir():
        assert (tmp_path / "arr" / "samples" / f.name).read_bytes() == f.read_bytes()
    assert main([arr, "--shard", "2/2"]) == 2  # I < N
