"""Evaluation tasks (train/eval/tasks.py): multiple choice, generative and perplexity scores computed from models built
to behave a known way, checked against direct computations (perplexity: test_perplexity.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.configfile import ConfigError
from data.tokenizer import EOD_ID, EOS_ID
from tests.helpers.eval_models import bigram_model, full_logit_logprob, random_model
from tests.helpers.files import write_jsonl
from train.eval.config import EvalConfig, GenerativeTask, MultipleChoiceTask, PerplexitySource
from train.eval.tasks import (continuation_logprobs, eval_generative, eval_multiple_choice, generate_texts,
                              generative_prompt, mc_predictions, mc_prompt)

CPU = torch.device("cpu")


# ---- multiple choice --------------------------------------------------------------------------------------------
def test_continuation_logprobs_equal_full_logits(tok):
    """Batched, right-padded scoring with the head on labelled positions only == log-softmax of the full logits;
    contexts longer than max_len are cut on the left."""
    model = random_model(0)
    requests = [(tok.encode("Question: what is 2 + 2?\nAnswer:"), tok.encode(" 4")),
                (tok.encode("Hi"), tok.encode(" there, how are you today?")),
                (tok.encode("A much longer context " * 12), tok.encode(" end")),
                (tok.encode("x"), tok.encode(" y"))]
    got = continuation_logprobs(model, requests, batch_size=3, device=CPU, max_len=40)
    for (ctx, cont), (logprob, n) in zip(requests, got):
        ids = (ctx + cont)[-41:]
        assert n == len(cont)
        assert logprob == pytest.approx(full_logit_logprob(model, ids, len(ids) - len(cont)), rel=1e-5, abs=1e-4)


def test_multiple_choice_picks_the_planted_answer(tok, tmp_path):
    """A model built to prefer certain tokens: the choice made of them wins, wherever it sits among the choices."""
    good = [" apple", " river", " violin", " granite"]
    bad = [" seven hundred", " carpet", " Thursday", " lemon tree", " cobalt", " saxophone"]
    favoured = [tok.encode(w)[0] for w in good]
    assert all(len(tok.encode(w)) == 1 for w in good)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        choices = [w.strip() for w in rng.choice(bad, 3, replace=False)]
        answer = int(rng.integers(0, 4))
        choices.insert(answer, good[i % 4].strip())
        rows.append({"id": f"q{i}", "question": f"Pick one ({i})", "choices": choices, "answer": answer})
    assert len({r["answer"] for r in rows}) > 1  # the planted answer moves around
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    model = bigram_model({}, favoured)
    cfg = EvalConfig(batch_size=5)
    for primary in ("acc", "acc_norm", "per_token"):
        task = MultipleChoiceTask(name="planted", path=path, k_shot=1, primary=primary)
        rec = eval_multiple_choice(model, tok, task, cfg, CPU)
        assert rec["metrics"]["items"] == 7  # the first row is the shot
        assert rec["metrics"]["accuracy"] == 1.0 and rec["metrics"]["acc"] == 1.0
    # the same items with a random model: scores are real log-probs, not a constant
    rec = eval_multiple_choice(random_model(3), tok, task, cfg, CPU)
    assert all(len(set(s["logprob_sum"])) == 4 for s in rec["samples"])
    # the recorded score of a choice is its log-prob after the k-shot prompt
    ctx, conts = mc_prompt(rows[1], rows[:1], "text")
    ids = tok.encode(ctx) + tok.encode(conts[0])
    assert rec["samples"][0]["logprob_sum"][0] == pytest.approx(
        full_logit_logprob(random_model(3), ids, len(tok.encode(ctx))), rel=1e-5)


def test_mc_predictions_by_hand():
    """Three choices whose winners differ by metric. Log-probs -6, -8, -9; tokens 3, 2, 6; characters (the space
    joining the choice to the prompt not counted, as lm-eval's len(choice)) 2, 10, 12:
    acc: max(-6, -8, -9) -> 0; acc_norm: -6/2=-3, -8/10=-0.8, -9/12=-0.75 -> 2; per token: -2, -4, -1.5 -> 2.
    With tokens 3, 1, 9: per token -2, -8, -1 -> 2; with characters 2, 10, 30: acc_norm -3, -0.8, -0.3 -> 2.
    And a case where acc_norm and per_token disagree: tokens 3, 2, 9 (-2, -4, -1 -> 2) vs characters 2, 10, 3
    (-3, -0.8, -3 -> 1)."""
    conts = [" ab", " abcdefghij", " abcdefghijkl"]
    assert mc_predictions([-6.0, -8.0, -9.0], [3, 2, 6], conts) == {"acc": 0, "acc_norm": 2, "acc_per_token": 2}
    assert mc_predictions([-6.0, -8.0, -9.0], [3, 2, 9], [" ab", " abcdefghij", " abc"]) == \
        {"acc": 0, "acc_norm": 1, "acc_per_token": 2}
    assert mc_predictions([-1.0, -1.0], [1, 1], [" A", " B"]) == {"acc": 0, "acc_norm": 0, "acc_per_token": 0}


def test_mc_metrics_by_hand(tok, tmp_path):
    """End to end on a random model: acc, acc_norm, acc_per_token equal argmaxes of the recorded log-probs divided by
    hand-counted lengths, and `accuracy` repeats the primary one."""
    rows = [{"question": f"Q{i}?", "choices": ["a", "bb bb bb", "c c", "dddd dddd dddd dddd"], "answer": i % 4}
            for i in range(12)]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    chars = [1, 8, 3, 19]
    recs = {p: eval_multiple_choice(random_model(5), tok, MultipleChoiceTask(name="m", path=path, primary=p),
                                    EvalConfig(batch_size=7), CPU) for p in ("acc", "acc_norm", "per_token")}
    rec = recs["acc"]
    want = {"acc": 0, "acc_norm": 0, "acc_per_token": 0}
    for s, row in zip(rec["samples"], rows):
        lp, toks = s["logprob_sum"], s["tokens"]
        assert toks == [len(tok.encode(" " + c)) for c in row["choices"]]
        for key, scores in (("acc", lp), ("acc_norm", [x / n for x, n in zip(lp, chars)]),
                            ("acc_per_token", [x / n for x, n in zip(lp, toks)])):
            assert s[f"pred_{key}"] == max(range(4), key=lambda j: scores[j])
            want[key] += s[f"pred_{key}"] == row["answer"]
    for key, hits in want.items():
        assert rec["metrics"][key] == hits / 12
    assert recs["acc"]["metrics"]["accuracy"] == recs["acc"]["metrics"]["acc"]
    assert recs["acc_norm"]["metrics"]["accuracy"] == recs["acc"]["metrics"]["acc_norm"]
    assert recs["per_token"]["metrics"]["accuracy"] == recs["acc"]["metrics"]["acc_per_token"]
    assert "acc_mean" not in rec["metrics"] and "acc_sum" not in rec["metrics"]


def test_multiple_choice_prompts():
    item = {"question": "2+2?", "choices": ["3", "4"], "answer": 1}
    shot = {"question": "1+1?", "choices": ["2", "5"], "answer": 0}
    ctx, conts = mc_prompt(item, [shot], "text")
    assert ctx == "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:" and conts == [" 3", " 4"]
    ctx, conts = mc_prompt(item, [shot], "letters")
    assert ctx == "Question: 1+1?\nA. 2\nB. 5\nAnswer: A\n\nQuestion: 2+2?\nA. 3\nB. 4\nAnswer:"
    assert conts == [" A", " B"]


def test_mmlu_prompt_is_lm_evals(tok, tmp_path):
    """format=mmlu: lm-eval's `mmlu` prompt string exactly; shots are the first k dev rows of the item's subject."""
    shot = {"question": "  Which is a bone?\n", "subject": "college_medicine",
            "choices": ["femur", "liver", "skin", "lung"], "answer": 0}
    item = {"question": "Which organ filters blood?", "subject": "college_medicine",
            "choices": ["heart", "kidney", "tooth", "hair"], "answer": 1}
    ctx, conts = mc_prompt(item, [shot], "mmlu")
    assert ctx == ("The following are multiple choice questions (with answers) about college medicine.\n\n"
                   "Which is a bone?\nA. femur\nB. liver\nC. skin\nD. lung\nAnswer: A\n\n"
                   "Which organ filters blood?\nA. heart\nB. kidney\nC. tooth\nD. hair\nAnswer:")
    assert conts == [" A", " B", " C", " D"]
    assert mc_prompt(item, [], "mmlu", subject="anatomy")[0].startswith("The following are multiple choice "
                                                                         "questions (with answers) about anatomy.\n\n")
    with pytest.raises(ValueError, match="needs the subject"):
        mc_prompt({k: v for k, v in item.items() if k != "subject"}, [], "mmlu")
    # shots: per subject, from the dev file, in file order; every test row is scored
    dev = [{**shot, "subject": subj, "question": f"{subj} {i}"} for i in range(3) for subj in ("anatomy", "virology")]
    test = [{**item, "subject": subj} for subj in ("virology", "anatomy", "virology")]
    paths = write_jsonl(tmp_path / "test.jsonl", test), write_jsonl(tmp_path / "dev.jsonl", dev)
    task = MultipleChoiceTask(name="mmlu", path=paths[0], fewshot_path=paths[1], k_shot=2, format="mmlu")
    rec = eval_multiple_choice(random_model(0), tok, task, EvalConfig(), CPU)
    assert rec["metrics"]["items"] == 3 and rec["metrics"]["acc"] == rec["metrics"]["acc_norm"]  # 1-char letters
    ctx, _ = mc_prompt(test[0], dev[1:4:2], "mmlu")
    assert "virology 0\n" in ctx and "virology 1\n" in ctx and "anatomy" not in ctx
    ids = tok.encode(ctx) + tok.encode(" B")
    assert rec["samples"][0]["logprob_sum"][1] == pytest.approx(
        full_logit_logprob(random_model(0), ids, len(tok.encode(ctx))), rel=1e-5)
    with pytest.raises(ValueError, match="1 few-shot rows for subject 'virology', fewer than k_shot=2"):
        eval_multiple_choice(random_model(0), tok, MultipleChoiceTask(
            name="m", path=paths[0], fewshot_path=write_jsonl(tmp_path / "d1.jsonl", dev[1:2]), k_shot=2,
            format="mmlu"), EvalConfig(), CPU)


# ---- generative -------------------------------------------------------------------------------------------------
def test_generative_extracts_and_scores_answers(tok, tmp_path):
    """A model that always says 'The answer is 42.' then stops: right where the answer is 42, wrong elsewhere."""
    rows = [{"id": "a", "question": "What is 40 + 2?", "answer": "42", "oracle": "math"},
            {"id": "b", "question": "What is 3 + 4?", "answer": "7", "oracle": "math"},
            {"id": "c", "question": "Write f.", "answer": "", "oracle": "code", "tests": "assert f(1) == 1"},
            {"id": "d", "messages": [{"role": "user", "content": "How many?"}], "answer": "42.0"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    plain_last = generative_prompt(tok, rows[0], [], "plain")[-1]
    chat_last = generative_prompt(tok, rows[0], [], "chat")[-1]
    assert {generative_prompt(tok, r, [], "plain")[-1] for r in rows} == {plain_last}
    words = tok.encode(" The answer is 42.")
    assert len(set(words)) == len(words) and not {plain_last, chat_last} & set(words)
    chain = {plain_last: words[0], chat_last: words[0], **dict(zip(words, words[1:]))}
    model = bigram_model({**chain, words[-1]: EOS_ID})
    cfg = EvalConfig(batch_size=3)
    for style in ("plain", "chat"):
        task = GenerativeTask(name="g", path=path, prompt=style, max_new_tokens=12)
        rec = eval_generative(model, tok, task, cfg, CPU)
        assert [s["completion"] for s in rec["samples"]] == [" The answer is 42."] * 4
        assert [s["correct"] for s in rec["samples"]] == [True, False, False, True]
        assert [s["extracted"] for s in rec["samples"]] == ["42"] * 4
        m = rec["metrics"]
        assert m["accuracy"] == 0.5 and m["accuracy_code"] == 0.0 and m["accuracy_math"] == pytest.approx(2 / 3)
    # sampled: with a chain this sharp every sample is the same answer; num_samples multiplies the rows
    task = GenerativeTask(name="g", path=path, temperature=0.5, num_samples=2, max_new_tokens=12)
    rec = eval_generative(model, tok, task, cfg, CPU)
    assert len(rec["samples"]) == 8 and rec["metrics"]["accuracy"] == 0.5


def test_generative_few_shot_prompt_and_stop(tok):
    shots = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "solution": "2+2=4. The answer is 4."}]
    ids = generative_prompt(tok, {"question": "3+3?"}, shots, "plain")
    assert tok.decode(ids) == ("Question: 1+1?\nAnswer: The answer is 2.\n\nQuestion: 2+2?\nAnswer: 2+2=4. The answer "
                               "is 4.\n\nQuestion: 3+3?\nAnswer:")
    chat = generative_prompt(tok, {"question": "3+3?"}, shots, "chat")
    assert chat == tok.apply_chat_template([
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "The answer is 2."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "2+2=4. The answer is 4."},
        {"role": "user", "content": "3+3?"}], add_generation_prompt=True)
    # completions are cut before the stop token; a row that never stops runs max_new_tokens
    a, b = tok.encode(" yes")[0], tok.encode(" no")[0]
    model = bigram_model({a: EOD_ID, b: b})
    texts = generate_texts(model, tok, [[a], [b]], 5, 0.0, 1.0, EvalConfig(), CPU)
    assert texts == ["", " no" * 5]
