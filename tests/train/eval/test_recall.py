"""Long-context JSON key-value recall (train/eval/recall.py): exact probes of the requested length, scoring, and a run
that skips lengths beyond the model's context."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.eval_models import random_model
from train.eval.config import EvalConfig, RecallProbe
from train.eval.recall import build_recall_prompt, eval_recall, recall_scores

CPU = torch.device("cpu")


@pytest.mark.parametrize("length", [160, 512, 4096, 8192, 16384])
def test_recall_probe_is_exact_and_well_formed(tok, length):
    probe = build_recall_prompt(tok, length, seed=3)
    ids = probe["ids"]
    assert len(ids) == length
    assert tok.encode(tok.decode(ids)) == ids  # the ids are the text's own tokenisation
    text = tok.decode(ids)
    body = text[text.index("JSON data:\n") + len("JSON data:\n"): text.index("\n\nKey:")]
    data = json.loads(body)
    assert len(data) == probe["pairs"] and data[probe["key"]] == probe["value"]
    assert body.count(probe["key"]) == 1  # the key is present once in the object...
    assert text.endswith(f'Key: "{probe["key"]}"\nCorresponding value:')  # ...and asked for at the end
    assert list(data).index(probe["key"]) == probe["position"]
    assert build_recall_prompt(tok, length, seed=3) == probe  # deterministic by seed
    assert build_recall_prompt(tok, length, seed=4)["ids"] != ids


def test_recall_probe_chat_and_errors(tok):
    probe = build_recall_prompt(tok, 300, seed=0, chat=True)
    ids = probe["ids"]
    assert len(ids) == 300
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-1] == tok.token_id("<|im_sep|>")
    assert tok.decode(ids).endswith("Corresponding value:<|im_end|><|im_start|>assistant<|im_sep|>")
    with pytest.raises(ValueError, match="too short"):
        build_recall_prompt(tok, 100, seed=0)


def test_recall_scoring_and_run(tok):
    v = "3e1e695e-2e7e-46a9-a21e-ef62ce50c47a"
    assert recall_scores(f' "{v}"\n}}', v) == {"exact_match": 1.0, "substring_match": 1.0}
    assert recall_scores(f" The value is {v}", v) == {"exact_match": 0.0, "substring_match": 1.0}
    assert recall_scores(' "3e1e695e"', v) == {"exact_match": 0.0, "substring_match": 0.0}
    assert recall_scores("", v)["exact_match"] == 0.0
    model = random_model(0, max_seq_len=256)
    cfg = EvalConfig(recall=RecallProbe(lengths=[160, 300], samples=2, paper_score={160: 100.0}))
    rec = eval_recall(model, tok, cfg.recall, cfg, CPU)
    assert set(rec["skipped"]) == {"len_300"}  # 300 + answer tokens > max_seq_len 256
    assert rec["paper_score"] == {"len_160/substring_match": 100.0}  # for the recipe summary
    assert {s["length"] for s in rec["samples"]} == {160} and len(rec["samples"]) == 2
    assert 0.0 <= rec["metrics"]["len_160/substring_match"] <= 1.0
    assert model.cfg.max_seq_len == 256


def test_recall_paper_scores_name_the_probed_lengths():
    from train.config import ConfigError
    from train.eval.config import EvalConfig, RecallProbe

    cfg = EvalConfig(recall=RecallProbe(lengths=[64], samples=1, paper_score={64: 100.0}))
    cfg.validate()
    cfg.recall.paper_score = {128: 99.0}
    with pytest.raises(ConfigError, match=r"recall.paper_score has lengths \[128\] that recall.lengths=\[64\]"):
        cfg.validate()
