"""Pivotal Token Search runs (train/pts/run.py): a real run (our model, KV-cache sampling, the real oracles and
tokenizer) whose output the DPO loader reads, resumed after a crash; the questions file; a trainer's run dir as model."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import yaml

from tests.helpers.files import write_jsonl
from tests.helpers.models import tiny_model
from train.config import REPO_ROOT
from train.pts.run import main, read_questions


def answer_chain_model(tokenizer, p_seven: float = 0.5):
    """A tiny real Transformer with hand-set weights (not a mock): after the generation prompt it writes
    'The answer is D<|im_end|>' with D = 7 half of the time. The layers keep their random weights but the token
    embeddings of the chain are so large that the next token depends on the current one only (a bigram chain)."""
    model = tiny_model(0, max_seq_len=64)
    the, answer, is_, space = tokenizer.encode("The answer is ")
    digits = [tokenizer.encode(str(d))[0] for d in range(10)]
    others = (1 - p_seven) / 9
    chain = {tokenizer.token_id("<|im_sep|>"): {the: 1.0}, the: {answer: 1.0}, answer: {is_: 1.0},
             is_: {space: 1.0}, space: {d: p_seven if i == 7 else others for i, d in enumerate(digits)},
             **{d: {tokenizer.eos_id: 1.0} for d in digits}}
    scale = math.sqrt(model.cfg.dim)  # RMSNorm turns 30 e_slot into sqrt(dim) e_slot
    with torch.no_grad():
        model.output.weight.zero_()  # every other token: logit 0, about 1e5 * e^-21 = 1e-4 of the mass in total
        for slot, (context, nexts) in enumerate(chain.items()):
            model.tok_embeddings.weight[context] = 0.0
            model.tok_embeddings.weight[context, slot] = 30.0
            for token, p in nexts.items():
                model.output.weight[token, slot] = (math.log(p) + 21.0) / scale
    return model


@pytest.fixture(scope="module")
def real_run_inputs(tmp_path_factory, tok):
    from train.export.hf import to_hf

    root = tmp_path_factory.mktemp("pts")
    tokenizer = tok
    to_hf(answer_chain_model(tokenizer), root / "model")
    questions = [
        {"id": "q0", "question": "What is 3 + 4?", "answer": "7", "oracle": "math"},
        {"id": "q1", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 2 + 5?"}], "answer": "7", "oracle": "math"},
        {"id": "q2", "question": "What is 1 + 2?", "answer": "3", "oracle": "math"},  # p ~ 0.06: too hard
        {"id": "q3", "question": "Write f() returning 1.", "tests": "assert f() == 1", "oracle": "code"},
    ]
    write_jsonl(root / "questions.jsonl", questions)
    config = {"model": str(root / "model"), "questions": str(root / "questions.jsonl"),
              "output": str(root / "out" / "pairs.jsonl"), "rollouts": 16, "batch_size": 16, "max_new_tokens": 7,
              "device": "cpu", "seed": 3}
    (root / "pts.yaml").write_text(yaml.safe_dump(config))
    return root, tokenizer


def test_real_run_writes_pairs_the_dpo_loader_reads_and_resumes(real_run_inputs):
    from data.pairs import PairBatches, load_pairs

    root, tokenizer = real_run_inputs
    out = root / "out" / "pairs.jsonl"
    assert main([str(root / "pts.yaml"), "max_questions=1"]) == 0  # an interrupted run: one question done
    first_lines = out.read_text().splitlines()
    assert {json.loads(line)["question_id"] for line in first_lines} == {"q0"}
    # A crash mid-question leaves pairs of an unfinished question and half a line: resume drops both.
    with open(out, "a") as f:
        f.write(first_lines[0].replace('"q0"', '"q1"') + "\n" + first_lines[0][:25])
    with open(root / "out" / "pairs.state.jsonl", "a") as f:
        f.write('{"id": "q1", "status": "ke')  # its state record was being written

    assert main([str(root / "pts.yaml")]) == 0
    lines = out.read_text().splitlines()
    assert lines[:len(first_lines)] == first_lines  # finished questions were not redone
    pairs = [json.loads(line) for line in lines]
    state = [json.loads(line) for line in (root / "out" / "pairs.state.jsonl").read_text().splitlines()]
    assert [r["id"] for r in state] == ["q0", "q1", "q2", "q3"]  # each question once
    assert {r["id"]: r["status"] for r in state} == {"q0": "kept", "q1": "kept", "q2": "too_hard",
                                                     "q3": "too_hard"}
    summary = json.loads((root / "out" / "pairs.summary.json").read_text())
    assert (summary["questions_seen"], summary["kept"], summary["dropped_too_hard"], summary["dropped_too_easy"]) \
        == (4, 2, 2, 0)
    assert summary["pairs_found"] == len(pairs) and summary["this_run"]["questions"] == 3

    seven, chain_prefix = tokenizer.encode("7"), tokenizer.encode("The answer is ")
    by_question = Counter(p["question_id"] for p in pairs)
    assert set(by_question) == {"q0", "q1"}  # every kept question gave a pair
    questions = {q["id"]: q for q in read_questions(root / "questions.jsonl")}
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(questions[pair["question_id"]]["messages"], add_generation_prompt=True)
        assert pair["prompt_ids"][:len(prompt)] == prompt
        assert pair["position"] == len(pair["prompt_ids"]) - len(prompt)
        assert len(pair["chosen_ids"]) == len(pair["rejected_ids"]) == 1 and pair["chosen_ids"] != pair["rejected_ids"]
        assert abs(pair["p_after"] - pair["p_before"]) >= 0.2
        if pair["prompt_ids"][len(prompt):] == chain_prefix:  # the digit: the one truly pivotal token
            assert pair["chosen_ids"] == seven and tokenizer.decode(pair["rejected_ids"]).isdigit()
    assert sum(p["position"] == len(chain_prefix) for p in pairs) == 2  # one digit pair per kept question

    _, meta = load_pairs(out, tokenizer)
    assert meta["forms"] == {"ids": len(pairs), "text": 0}
    assert meta["tokenizer"] == "token-ids-as-given"
    batches = PairBatches(out, seq_len=64, micro_batch=1, global_batch=1)
    assert batches.skipped == {"too_long": 0, "identical": 0}
    prompt, chosen, rejected = batches.sequences(0)
    assert prompt.tolist() == pairs[0]["prompt_ids"] and chosen.tolist() == pairs[0]["chosen_ids"]

    # Everything done: a third run loads no model and changes nothing; other settings are refused.
    assert main([str(root / "pts.yaml")]) == 0
    assert out.read_text().splitlines() == lines
    assert main([str(root / "pts.yaml"), "p_gap=0.3"]) == 2


def test_bad_questions_are_explained(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": 1, "question": "x", "oracle": "math", "answer": "1"}\n{"id": 2, "question": "y", '
                   '"oracle": "code"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: oracle 'code' needs 'tests'"):
        read_questions(bad)


@pytest.mark.slow
def test_run_dir_of_the_trainer_loads_and_samples(tmp_path):
    """The smoke config's model is a trainer run dir: model config from meta.json, weights from the checkpoint."""
    from tests.helpers.train import check, make_sources, run_train, write_run_config
    from train.checkpoint import consolidated_state_dict, find_latest, load_model

    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "pretrain.yaml", make_sources(tmp_path / "src", docs_per_source=40), run_dir,
                           train={"max_steps": 1, "save_every": 1}, model={"max_seq_len": 128})
    check(run_train(cfg))
    model, _ = load_model(str(run_dir), torch.device("cpu"), torch.float32)
    assert (model.cfg.dim, model.cfg.n_layers, model.cfg.max_seq_len) == (32, 2, 128)
    saved = consolidated_state_dict(find_latest(run_dir)[0])
    assert all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
    questions = tmp_path / "q.jsonl"
    write_jsonl(questions, [{"id": "a", "question": "What is 1 + 1?", "answer": "2", "oracle": "math"}])
    assert main([str(REPO_ROOT / "configs" / "smoke" / "pts.yaml"), f"model={run_dir}", f"questions={questions}",
                 f"output={tmp_path / 'out' / 'pairs.jsonl'}", "max_new_tokens=8", "rollouts=4"]) == 0
    summary = json.loads((tmp_path / "out" / "pairs.summary.json").read_text())
    assert summary["questions_seen"] == 1 and summary["rollouts"] >= 4


def test_shards_and_merge_equal_one_process(real_run_inputs, tmp_path):
    """`--shard I/N` array tasks (question k -> shard k % N) and `--merge N` write what one process writes, pair for
    pair: each question's sampling is seeded by its id, not by its place in a shard."""
    root, _ = real_run_inputs
    cfg = yaml.safe_load((root / "pts.yaml").read_text())
    cfg["output"] = str(tmp_path / "one" / "pairs.jsonl")
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tmp_path / "one.yaml")]) == 0
    cfg["output"] = str(tmp_path / "split" / "pairs.jsonl")
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(tmp_path / "split.yaml"), "--merge", "2"]) == 2  # no shard has run yet: refused, named
    for i in (1, 0):
        assert main([str(tmp_path / "split.yaml"), "--shard", f"{i}/2"]) == 0
    assert (tmp_path / "split" / "pairs.shard-00001-of-00002.jsonl").is_file()
    assert main([str(tmp_path / "split.yaml"), "--merge", "2"]) == 0
    one, merged = (tmp_path / "one" / "pairs.jsonl").read_bytes(), (tmp_path / "split" / "pairs.jsonl").read_bytes()
    assert one == merged and one.strip()
    s1 = json.loads((tmp_path / "one" / "pairs.summary.json").read_text())
    s2 = json.loads((tmp_path / "split" / "pairs.summary.json").read_text())
    for key in ("questions_selected", "questions_seen", "kept", "pairs_found", "rollouts"):
        assert s1[key] == s2[key], key
    assert main([str(tmp_path / "split.yaml"), "--shard", "2/2"]) == 2
