"""Running evaluations (train/eval/run.py): inputs checked before a model loads, the CLI on a real trained checkpoint,
in-loop evaluation, and the same in-loop evaluation on two real ZeRO-3 ranks."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.helpers.eval_models import random_model
from tests.helpers.files import write_jsonl
from train.checkpoint import load_model
from train.eval.config import EvalConfig, MultipleChoiceTask, RecallProbe
from train.eval.run import check_inputs, evaluate, main

CPU = torch.device("cpu")


def test_bad_inputs_fail_before_a_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("perplexity: [{name: x, path: a.jsonl}]\noutput_dir: out\nmodel_path: nowhere\n")
    assert main([str(bad)]) == 2
    rows = tmp_path / "mc.jsonl"
    rows.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n{"question": "q2", "choices": ["a"]}\n')
    cfg = EvalConfig(model_path=str(tmp_path), multiple_choice=[MultipleChoiceTask(name="m", path=str(rows))])
    with pytest.raises(ValueError, match=r"mc.jsonl:2: missing key\(s\) \['answer'\]"):
        check_inputs(cfg)


@pytest.mark.slow
def test_cli_on_a_trained_checkpoint(tok, tmp_path):
    """A real (1-process) training run; eval loads its newest checkpoint, writes results, samples, offline wandb."""
    from tests.helpers.train import check, make_sources, run_train, write_run_config
    from train.checkpoint import consolidated_state_dict, resolve_checkpoint_dir
    from train.export.hf import to_hf

    sources = make_sources(tmp_path / "shards", docs_per_source=40)
    run_dir = tmp_path / "run"
    cfg_path = write_run_config(tmp_path / "run.yaml", sources, run_dir,
                                train={"seq_len": 64, "global_batch": 2, "micro_batch": 2, "max_steps": 2,
                                       "save_every": 2, "log_every": 1})
    check(run_train(cfg_path))
    model, info = load_model(run_dir, CPU, torch.float32)
    assert info["step"] == 2 and model.cfg.dim == 32
    state = consolidated_state_dict(resolve_checkpoint_dir(run_dir)[0])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    to_hf(model, tmp_path / "hf")  # an exported directory loads to the same weights
    hf_model, hf_info = load_model(tmp_path / "hf", CPU, torch.float32)
    assert hf_info["step"] is None and all(torch.equal(state[k], v) for k, v in hf_model.state_dict().items())

    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}", "choices": ["a", "b", "c"], "answer": i % 3}
                                             for i in range(4)])
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}])
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(json.dumps({
        "model_path": str(run_dir), "output_dir": str(tmp_path / "eval"), "label": "after",
        "multiple_choice": [{"name": "mc", "path": mc}],
        "generative": [{"name": "q", "path": qs, "max_new_tokens": 4}],
        "perplexity": [{"name": "syn", "path": str(sources["syn"]), "max_docs": 3}],
        "recall": {"lengths": []}, "wandb": {"mode": "offline", "project": "test"}}))
    assert main([str(eval_yaml), "batch_size=2"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "eval/results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["task"]) for r in lines] == [("multiple_choice", "mc"), ("generative", "q"),
                                                       ("perplexity", "syn"), ("perplexity_by_provenance", "synthetic")]
    assert all(r["label"] == "after" and r["step"] == 2 for r in lines)
    assert 0 < lines[2]["metrics"]["nll"] < 13  # ~ln V for a 2-step model
    assert (tmp_path / "eval/samples/after.mc.mc.jsonl").is_file()
    assert list((tmp_path / "eval/wandb").glob("offline-run-*/run-*.wandb"))
    assert main([str(eval_yaml)]) == 0  # a second evaluation appends
    assert len((tmp_path / "eval/results.jsonl").read_text().splitlines()) == 8


def test_evaluate_in_loop_returns_flat_metrics_and_restores_mode(tok, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 2)
    model = random_model(0)
    model.train()
    cfg = EvalConfig(multiple_choice=[MultipleChoiceTask(name="mc", path=mc)],
                     recall=RecallProbe(lengths=[160], samples=1))
    out = evaluate(model, tok, cfg, CPU)
    assert model.training
    assert set(out) >= {"eval/mc/mc/accuracy", "eval/mc/mc/acc", "eval/mc/mc/acc_norm", "eval/mc/mc/acc_per_token", "eval/recall/json_kv/len_160/exact_match"}
    assert all(k.startswith("eval/") for k in out)
    assert dataclasses.asdict(cfg)  # a plain dataclass the trainer can carry in its config


@pytest.mark.slow
def test_in_loop_evaluation_under_zero3_matches_plain_model(tmp_path):
    """Two real ZeRO-3 ranks evaluate the engine's module (generation included) with the same results on both ranks,
    equal to the gathered model evaluated without ZeRO."""
    from tests.helpers.train import check, make_sources, run_train, write_run_config

    sources = make_sources(tmp_path / "shards", docs_per_source=20)
    run_yaml = write_run_config(tmp_path / "run.yaml", sources, tmp_path / "run",
                                train={"seq_len": 64, "global_batch": 2, "micro_batch": 1, "max_steps": 1})
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}", "choices": ["a", "bb c", "d"], "answer": 1}
                                             for i in range(3)])
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+5?", "answer": "7"}])
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(json.dumps({
        "batch_size": 2, "multiple_choice": [{"name": "mc", "path": mc}],
        "generative": [{"name": "q", "path": qs, "max_new_tokens": 6}],
        "recall": {"lengths": [160], "samples": 1, "allow_beyond_context": True}}))  # tiny context: 128
    # torchrun -m tests.helpers.zero3_eval RUN_YAML EVAL_YAML OUT_DIR
    check(run_train(run_yaml, [str(eval_yaml), str(tmp_path)], nproc=2, module="tests.helpers.zero3_eval"))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["zero3"] == r1["zero3"]
    for key, value in r0["plain"].items():
        assert r0["zero3"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert "eval/gen/q/accuracy" in r0["zero3"] and "eval/recall/json_kv/len_160/exact_match" in r0["zero3"]
