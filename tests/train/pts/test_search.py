"""Pivotal Token Search (train/pts/search.py): the search against a process with known p(success) (a scripted test
double for sample and judge), the question filter, and the pairs."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from model.generate import Generation
from train.pts.config import PTSConfig
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
