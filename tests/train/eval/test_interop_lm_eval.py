"""train.eval's multiple choice against lm-evaluation-harness itself: the same tiny random model, exported to Hugging
Face (fp32, CPU), scored by `lm_eval.simple_evaluate(model="hf")` on a local task written to match our prompt, gives
the same per-choice log-likelihoods and the same acc / acc_norm, 0-shot and k-shot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

try:
    import lm_eval
    from lm_eval.tasks import TaskManager
except ImportError as e:  # a dev dependency: missing, the interop check fails rather than skips
    raise ImportError("tests/train/eval/test_interop_lm_eval.py needs lm-evaluation-harness: "
                      "pip install -e '.[dev]' (or pip install lm-eval)") from e

from tests.helpers.eval_models import random_model
from tests.helpers.files import write_jsonl
from train.eval.config import EvalConfig, MultipleChoiceTask
from train.eval.tasks import eval_multiple_choice, mc_prompt
from train.export.hf import to_hf

pytestmark = pytest.mark.slow  # lm-eval runs a real model load and harness per test (~100 s)

CPU = torch.device("cpu")
# Choices of different lengths in characters and in tokens, so acc, acc_norm and the per-token mean can disagree.
CHOICES = [["red", "a deep shade of blue", "green", "yellowish"], ["1", "22 22", "333", "4 4 4 4"],
           ["cat", "dog", "an elephant", "x"], ["yes", "no", "perhaps not", "certainly, yes"]]


def _rows(n: int, offset: int) -> list[dict]:
    return [{"id": f"q{offset + i}", "question": f"Which one fits item {offset + i}?",
             "choices": CHOICES[(offset + i) % len(CHOICES)], "answer": (offset + i) % 4} for i in range(n)]


def _task_yaml(name: str, items: str, shots: str) -> str:
    """lm-eval's multiple_choice task with our text prompt: 'Question: q\\nAnswer:' + ' ' + choice; shots are the
    first k rows of the fewshot split, joined by a blank line."""
    return json.dumps({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": items, "train": shots}},
        "test_split": "test", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": " ",
        "fewshot_delimiter": "\n\n", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    })


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = random_model(11)
    to_hf(model, root / "hf", tokenizer=tok, dtype=torch.float32)
    items, shots = write_jsonl(root / "items.jsonl", _rows(16, 0)), write_jsonl(root / "shots.jsonl", _rows(3, 100))
    (root / "tasks").mkdir()
    (root / "tasks" / "ours_mc.yaml").write_text(_task_yaml("ours_mc", str(items), str(shots)))
    return model, root, str(items), str(shots)


@pytest.mark.parametrize("k_shot", [0, 2])
def test_lm_eval_agrees_with_train_eval(tok, setup, k_shot):
    model, root, items, shots = setup
    limit = 12
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32", tasks=["ours_mc"], num_fewshot=k_shot,
        task_manager=TaskManager(include_path=str(root / "tasks")), limit=limit, device="cpu", batch_size=4,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    theirs = sorted(out["samples"]["ours_mc"], key=lambda s: s["doc_id"])
    task = MultipleChoiceTask(name="ours_mc", path=items, fewshot_path=shots, k_shot=k_shot, limit=limit)
    ours = eval_multiple_choice(model, tok, task, EvalConfig(batch_size=4), CPU)
    assert len(theirs) == len(ours["samples"]) == limit
    shot_rows = _rows(3, 100)[:k_shot]
    worst = 0.0
    for t, o, row in zip(theirs, ours["samples"], _rows(limit, 0)):
        ctx, conts = mc_prompt(row, shot_rows, "text")
        assert [tuple(a) for a in t["arguments"]] == [(ctx, c) for c in conts]  # the prompt string itself
        their_ll = [float(r[0]) for r in t["filtered_resps"]]
        assert len(their_ll) == len(o["logprob_sum"])
        worst = max(worst, max(abs(a - b) for a, b in zip(their_ll, o["logprob_sum"])))
        assert t["acc"] == float(o["pred_acc"] == o["answer"])
        assert t["acc_norm"] == float(o["pred_acc_norm"] == o["answer"])
    print(f"\nlm-eval vs train.eval, {k_shot}-shot, {limit} items: largest per-choice log-likelihood difference "
          f"{worst:.2e}")  # the agreement figure (pytest -s)
    assert worst < 1e-4, f"largest per-choice log-likelihood difference {worst:.2e}"
    res = out["results"]["ours_mc"]
    assert res["acc,none"] == pytest.approx(ours["metrics"]["acc"], abs=1e-12)
    assert res["acc_norm,none"] == pytest.approx(ours["metrics"]["acc_norm"], abs=1e-12)
    # the items do tell the metrics apart: a test where acc == acc_norm everywhere could not catch a wrong length
    assert any(o["pred_acc"] != o["pred_acc_norm"] for o in ours["samples"])



def test_lm_eval_mmlu_prompt_agrees_with_format_mmlu(tok, setup, tmp_path):
    """lm-eval's own `mmlu` task (its _default_template_yaml and the subject's header, on local test/dev files)
    against format=mmlu: the same per-choice log-likelihoods, so the same prompt token for token, 2-shot."""
    model, root, _, _ = setup
    subject = "high_school_biology"
    rows = [{**r, "subject": subject, "question": r["question"] + " "} for r in _rows(10, 0)]  # stripped by both
    rows = [{**r, "choices": (r["choices"] * 2)[:4]} for r in rows]
    test, dev = write_jsonl(tmp_path / "test.jsonl", rows[:6]), write_jsonl(tmp_path / "dev.jsonl", rows[6:])
    template = Path(lm_eval.__file__).parent / "tasks/mmlu/default/_default_template_yaml"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mmlu.yaml").write_text(json.dumps({
        "include": str(template), "task": "local_mmlu", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": test, "dev": dev}},
        "description": yaml.safe_load((template.parent / f"mmlu_{subject}.yaml").read_text())["description"]}))
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32", tasks=["local_mmlu"], num_fewshot=2,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")), device="cpu", batch_size=4,
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    theirs = sorted(out["samples"]["local_mmlu"], key=lambda s: s["doc_id"])
    task = MultipleChoiceTask(name="m", path=test, fewshot_path=dev, k_shot=2, format="mmlu")
    ours = eval_multiple_choice(model, tok, task, EvalConfig(batch_size=4), CPU)
    assert len(theirs) == len(ours["samples"]) == 6
    dev_rows = [json.loads(line) for line in Path(dev).read_text().splitlines()]
    for t, o, row in zip(theirs, ours["samples"], rows[:6]):
        assert [tuple(a) for a in t["arguments"]] == [(ctx, c) for ctx, cs in [mc_prompt(row, dev_rows[:2], "mmlu")]
                                                      for c in cs]  # the prompt string itself
        assert [float(r[0]) for r in t["filtered_resps"]] == pytest.approx(o["logprob_sum"], abs=1e-4)
        assert t["acc"] == float(o["pred_acc"] == o["answer"])
    assert out["results"]["local_mmlu"]["acc,none"] == pytest.approx(ours["metrics"]["acc"], abs=1e-12)
