"""Pivotal Token Search: the search against a process with known p(success), the question filter, the pairs, and a
real run (our model, KV-cache sampling, the real oracles and tokenizer) whose output the DPO loader reads."""
from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
import yaml

from model.generate import Generation
from train.config import REPO_ROOT, ConfigError, load_config
from train.pts.config import PTSConfig
from train.pts.run import main, read_questions
from train.pts.search import PivotalToken, find_pivotal_tokens, search_question, split_point


class KnownProcess:
    """TEST DOUBLE standing in for "model + oracle", with p(success | prefix) known exactly.

    A completion is `length` tokens over ids 0..3. At a planted position t the token is right[t] with probability
    q[t] (else one of the 3 others); elsewhere token 0 has probability 0.7 and the others 0.1 each. A completion
    succeeds iff it has the right token at every planted position, so p(success | prefix) = 0 after a wrong
    planted token, else the product of q over the planted positions not yet reached."""

    def __init__(self, length: int, planted: dict[int, float], prompt_len: int = 0, seed: int = 0):
        self.length, self.q, self.prompt_len = length, dict(planted), prompt_len
        self.right = {t: (t + 1) % 4 for t in planted}
        self.rng = random.Random(seed)

    def probs(self, t: int) -> list[float]:
        if t in self.q:
            return [self.q[t] if tok == self.right[t] else (1 - self.q[t]) / 3 for tok in range(4)]
        return [0.7, 0.1, 0.1, 0.1]

    def p_success(self, prefix) -> float:
        if any(t in self.q and tok != self.right[t] for t, tok in enumerate(prefix)):
            return 0.0
        return math.prod(q for t, q in self.q.items() if t >= len(prefix))

    def solution(self, wrong_at=()) -> tuple[list[int], list[float]]:
        """A fixed completion: right tokens at planted positions (wrong ones at `wrong_at`), a 1 every 5th token."""
        tokens = []
        for t in range(self.length):
            if t in self.q:
                tokens.append((self.right[t] + 1) % 4 if t in wrong_at else self.right[t])
            else:
                tokens.append(1 if t % 5 == 0 else 0)
        return tokens, [math.log(self.probs(t)[tok]) for t, tok in enumerate(tokens)]

    def sample(self, prompt_ids, n, max_new_tokens) -> list[Generation]:
        prefix = list(prompt_ids[self.prompt_len:])
        assert len(prefix) + max_new_tokens == self.length  # the response budget is shared with the prefix
        out = []
        for _ in range(n):
            tokens, logprobs = [], []
            for t in range(len(prefix), self.length):
                probs = self.probs(t)
                tok = self.rng.choices(range(4), weights=probs)[0]
                tokens.append(tok)
                logprobs.append(math.log(probs[tok]))
            out.append(Generation(tokens, logprobs, finished=True))
        return out

    def judge(self, responses) -> list[bool]:
        assert all(len(r) == self.length for r in responses)
        return [self.p_success(r) == 1.0 for r in responses]


def brute_force_pivots(p, n: int, p_gap: float) -> list[int]:
    """Positions i with |p(prefix of i + 1 tokens) - p(prefix of i tokens)| >= p_gap, from every prefix."""
    return [i for i in range(n) if abs(p(i + 1) - p(i)) >= p_gap]


def counting(p_success):
    calls = []

    def wrapped(prefix):
        calls.append(tuple(prefix))
        return p_success(prefix)

    return wrapped, calls


# ---- the pure search ----------------------------------------------------------------------------------------

def test_split_point_is_the_cumulative_logprob_midpoint():
    assert split_point([-0.1, -0.1, -0.1, -5.0, -0.1, -0.1]) == 4  # the surprising token ends the left half
    assert split_point([-0.1, -3.0]) == 1  # ...or forms the right half when it is last
    assert split_point([-1.0] * 6) == 3
    assert split_point([-4.0, -1.0, -1.0, -1.0, -1.0]) == 1  # not the token-count midpoint (2)
    assert split_point([0.0] * 7) == 3  # no surprise at all: token midpoint


@pytest.mark.parametrize("wrong_at", [(), (9,)])
def test_search_returns_exactly_the_planted_pivotal_tokens(wrong_at):
    proc = KnownProcess(16, {3: 0.5, 9: 0.5, 13: 0.97})  # 13 is planted but moves p by only 0.03
    tokens, logprobs = proc.solution(wrong_at)
    p_success, calls = counting(proc.p_success)
    found = find_pivotal_tokens(tokens, logprobs, p_success, p_gap=0.2)
    assert [f.position for f in found] == [3, 9]
    assert [f.position for f in found] == brute_force_pivots(lambda k: proc.p_success(tokens[:k]), 16, 0.2)
    assert found[0] == PivotalToken(3, tokens[3], pytest.approx(0.2425), pytest.approx(0.485))
    assert found[1].token == tokens[9] and found[1].p_before == pytest.approx(0.485)
    assert found[1].p_after == (0.0 if wrong_at else pytest.approx(0.97))
    assert max(Counter(calls).values()) == 1  # memoized: each prefix estimated once
    assert len(calls) < 16 + 1  # fewer estimates than scanning every prefix


def test_call_order_follows_the_logprob_midpoint_recursion():
    # p by prefix length; only token 1 is pivotal. Token 1 carries most of the surprise.
    p_table = [0.2, 0.2, 0.9, 0.9, 0.9]
    p_success, calls = counting(lambda prefix: p_table[len(prefix)])
    found = find_pivotal_tokens([10, 11, 12, 13], [-0.1, -3.0, -0.1, -0.1], p_success, p_gap=0.2)
    assert found == [PivotalToken(1, 11, 0.2, 0.9)]
    # (): root; full: |0.7| >= gap -> split after 2 tokens (surprise 3.1 of 3.3 reached) -> (10, 11) split into
    # single tokens without estimates; [12, 13] is flat (memoized ends); the last leaf check needs p((10,)).
    assert calls == [(), (10, 11, 12, 13), (10, 11), (10,)]


def test_cancelling_pivots_are_missed_as_documented():
    p_table = [0.5, 0.5, 0.95, 0.95, 0.5, 0.5]  # +0.45 at token 1, -0.45 at token 3: p is not monotone
    found = find_pivotal_tokens(list(range(5)), [-1.0] * 5, lambda pre: p_table[len(pre)], p_gap=0.2)
    assert found == []  # the whole solution shows no change, so it is never subdivided
    assert brute_force_pivots(lambda k: p_table[k], 5, 0.2) == [1, 3]


def test_search_on_random_processes_only_returns_genuine_pivots_and_all_when_monotone():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(1, 24)
        steps = [rng.choice([0.0, 0.0, 0.0, rng.uniform(-0.5, 0.5)]) for _ in range(n)]
        monotone = trial % 2 == 0
        if monotone:
            steps = [abs(s) for s in steps]
        p_table = [0.0]
        for s in steps:
            p_table.append(p_table[-1] + s)
        logprobs = [-rng.expovariate(1.0) for _ in range(n)]
        p_success, calls = counting(lambda pre: p_table[len(pre)])
        found = [f.position for f in find_pivotal_tokens(list(range(n)), logprobs, p_success, 0.2)]
        truth = brute_force_pivots(lambda k: p_table[k], n, 0.2)
        assert set(found) <= set(truth)
        if monotone:
            assert found == truth
        assert max(Counter(calls).values()) == 1


def test_empty_solution_and_mismatched_logprobs():
    assert find_pivotal_tokens([], [], lambda pre: 0.5, 0.2) == []
    with pytest.raises(ValueError, match="log-probs"):
        find_pivotal_tokens([1, 2], [-1.0], lambda pre: 0.5, 0.2)


# ---- one question: filter and pairs, with sampled rollouts of the known process --------------------------------

def _cfg(**overrides) -> PTSConfig:
    base = dict(model="-", questions="-", output="-", p_gap=0.15, rollouts=1000, max_new_tokens=8, eos_ids=[],
                solution="both")
    return PTSConfig(**{**base, **overrides})


def test_question_filter_drops_too_easy_and_too_hard():
    statuses = {}
    for name, q in (("easy", 0.95), ("hard", 0.05), ("moderate", 0.5)):
        proc = KnownProcess(8, {2: q}, prompt_len=1, seed=1)
        result = search_question(name, [900], proc.sample, proc.judge, _cfg())
        statuses[name] = result.status
        assert result.p == pytest.approx(q, abs=0.05)
        if result.status != "kept":
            assert result.estimates == 1 and result.pairs == []  # no search spent on dropped questions
    assert statuses == {"easy": "too_easy", "hard": "too_hard", "moderate": "kept"}


def test_pairs_contrast_the_pivotal_token_with_rollout_first_tokens():
    proc = KnownProcess(8, {2: 0.5, 6: 0.5}, prompt_len=2, seed=2)  # p = 0.25 at the start
    result = search_question("q", [900, 901], proc.sample, proc.judge, _cfg())
    assert result.status == "kept" and result.p == pytest.approx(0.25, abs=0.05)
    assert len(result.pairs) >= 3 and result.no_contrast == 0
    for pair in result.pairs:
        pos = pair["position"]
        assert pos in (2, 6)  # only planted tokens are pivotal; the rest is sampling noise far below p_gap
        prefix = pair["prompt_ids"][2:]
        assert pair["prompt_ids"][:2] == [900, 901] and len(prefix) == pos
        assert pair["chosen_ids"] == [proc.right[pos]] and pair["rejected_ids"] != [proc.right[pos]]
        assert pair["p_before"] == pytest.approx(proc.p_success(prefix), abs=0.06)
        assert abs(pair["p_after"] - pair["p_before"]) >= 0.15
    signs = {pair["p_after"] > pair["p_before"] for pair in result.pairs}
    assert signs == {True, False}  # the failed solution contributes a pair where the pivotal token is rejected


# ---- a real run ------------------------------------------------------------------------------------------------

def answer_chain_model(tokenizer, p_seven: float = 0.5):
    """A tiny real Transformer with hand-set weights (not a mock): after the generation prompt it writes
    'The answer is D<|im_end|>' with D = 7 half of the time. The layers keep their random weights but the token
    embeddings of the chain are so large that the next token depends on the current one only (a bigram chain)."""
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=100_352, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64))
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
def real_run_inputs(tmp_path_factory):
    from data.tokenizer import Phi4Tokenizer
    from train.export.hf import to_hf

    root = tmp_path_factory.mktemp("pts")
    tokenizer = Phi4Tokenizer()
    to_hf(answer_chain_model(tokenizer), root / "model")
    questions = [
        {"id": "q0", "question": "What is 3 + 4?", "answer": "7", "oracle": "math"},
        {"id": "q1", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 2 + 5?"}], "answer": "7", "oracle": "math"},
        {"id": "q2", "question": "What is 1 + 2?", "answer": "3", "oracle": "math"},  # p ~ 0.06: too hard
        {"id": "q3", "question": "Write f() returning 1.", "tests": "assert f() == 1", "oracle": "code"},
    ]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
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


# ---- configs and inputs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smoke", "phi4-14b"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO_ROOT / "configs" / name / "pts.yaml", schema=PTSConfig)
    assert cfg.p_gap == 0.2 and (cfg.p_low, cfg.p_high) == (0.2, 0.8)
    # the paper's sampler runs at 1.0; the smoke's tiny model samples sharper (0.5) or it only emits noise
    assert cfg.temperature == (1.0 if name == "phi4-14b" else 0.5)
    assert 100265 in cfg.eos_ids


def test_bad_config_and_questions_are_explained(tmp_path):
    path = REPO_ROOT / "configs" / "smoke" / "pts.yaml"
    with pytest.raises(ConfigError, match="p_low"):
        load_config(path, ["p_low=0.9"], schema=PTSConfig)
    with pytest.raises(ConfigError, match="rolouts"):
        load_config(path, ["rolouts=3"], schema=PTSConfig)
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": 1, "question": "x", "oracle": "math", "answer": "1"}\n{"id": 2, "question": "y", '
                   '"oracle": "code"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: oracle 'code' needs 'tests'"):
        read_questions(bad)


def test_run_dir_of_the_trainer_loads_and_samples(tmp_path):
    """The smoke config's model is a trainer run dir: model config from meta.json, weights from the checkpoint."""
    from tests.helpers.train import check, make_sources, run_train, write_run_config
    from train.checkpoint import consolidated_state_dict, find_latest
    from train.checkpoint import load_model

    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "pretrain.yaml", make_sources(tmp_path / "src", docs_per_source=40), run_dir,
                           train={"max_steps": 1, "save_every": 1}, model={"max_seq_len": 128})
    check(run_train(cfg))
    model, _ = load_model(str(run_dir), torch.device("cpu"), torch.float32)
    assert (model.cfg.dim, model.cfg.n_layers, model.cfg.max_seq_len) == (32, 2, 128)
    saved = consolidated_state_dict(find_latest(run_dir)[0])
    assert all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "question": "What is 1 + 1?", "answer": "2", "oracle": "math"}) + "\n")
    assert main([str(REPO_ROOT / "configs" / "smoke" / "pts.yaml"), f"model={run_dir}", f"questions={questions}",
                 f"output={tmp_path / 'out' / 'pairs.jsonl'}", "max_new_tokens=8", "rollouts=4"]) == 0
    summary = json.loads((tmp_path / "out" / "pairs.summary.json").read_text())
    assert summary["questions_seen"] == 1 and summary["rollouts"] >= 4
