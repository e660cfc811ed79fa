"""Pivotal Token Search, the search itself: `find_pivotal_tokens` is a pure function of one solution, its log-probs
and any p(success | prefix) estimator; `search_question` filters a question by p(success) and turns its pivotal tokens
into single-token pairs, with the model and the oracle passed in. The runner (rollouts, oracle, files, CLI) is
`train.pts.run`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from train.pts.config import PTSConfig


@dataclass
class PivotalToken:
    position: int  # index of the token in the solution (= length of the prefix before it)
    token: int
    p_before: float  # p(success | solution[:position])
    p_after: float  # p(success | solution[:position + 1])


def split_point(logprobs: Sequence[float]) -> int:
    """Boundary k (1 <= k < n): the first k where the cumulative surprise (-log-prob) of seg[:k] reaches half the
    segment's total, so a token carrying most of the surprise ends the left half (or, when last, forms the right
    one); the token-count midpoint when the segment carries no surprise at all."""
    surprise = [max(0.0, -float(lp)) for lp in logprobs]
    half = sum(surprise) / 2
    if half <= 0:
        return len(surprise) // 2
    acc = 0.0
    for k, s in enumerate(surprise[:-1], 1):
        acc += s
        if acc >= half:
            return k
    return len(surprise) - 1


def find_pivotal_tokens(solution_ids: Sequence[int], token_logprobs: Sequence[float],
                        p_success: Callable[[list[int]], float], p_gap: float) -> list[PivotalToken]:
    """Tokens t_i of the solution with |p(success | t_1..t_i) - p(success | t_1..t_{i-1})| >= p_gap.

    Recursive subdivision (the paper's Fig. 4): a segment after a prefix is split in two only while p changes by at
    least p_gap across it and it holds more than one token; the split falls where the cumulative log-probability
    reaches half of the segment's total (equal surprise on both sides, not equal token counts), so the search spends
    its estimates around the unlikely tokens, where pivots tend to be. The single-token segments left at the end
    with |delta p| >= p_gap are returned. Guarantee: every token returned is genuinely pivotal (its own delta is
    measured); all pivotal tokens are found only when p is near-monotone along the solution, because a segment
    whose changes cancel (0.3 -> 0.9 -> 0.3) is never split. `p_success` is called once per distinct prefix the
    recursion needs (memoized on the prefix tuple), in depth-first left-to-right order.
    """
    solution = tuple(int(t) for t in solution_ids)
    if len(token_logprobs) != len(solution):
        raise ValueError(f"find_pivotal_tokens: {len(solution)} tokens but {len(token_logprobs)} log-probs")
    memo: dict[tuple[int, ...], float] = {}

    def p(end: int) -> float:  # p(success | solution[:end])
        key = solution[:end]
        if key not in memo:
            memo[key] = float(p_success(list(key)))
        return memo[key]

    # Depth-first, left before right, with an explicit stack: solutions can be longer than Python's recursion limit.
    leaves, stack = [], [(0, len(solution))]
    while stack:
        start, end = stack.pop()
        if end - start <= 1 or abs(p(start) - p(end)) < p_gap:
            leaves.append((start, end))
            continue
        mid = start + split_point(token_logprobs[start:end])
        stack += [(mid, end), (start, mid)]
    return [PivotalToken(start, solution[start], p(start), p(end)) for start, end in leaves
            if end - start == 1 and abs(p(end) - p(start)) >= p_gap]


# ---- one question: filter, search, pairs. `sample` and `judge` are the model and the oracle (injected for testing).

@dataclass
class Estimate:
    p: float  # fraction of rollouts the oracle accepted (exact 0/1 for a complete response)
    first_tokens: list[int]  # first new token of each rollout
    successes: list[bool]
    rollouts: list = field(default_factory=list)  # model.generate.Generation of each (empty prefix only)


@dataclass
class QuestionResult:
    status: str  # kept | too_easy | too_hard | too_long
    p: float | None
    pairs: list[dict] = field(default_factory=list)
    pivotal: int = 0  # pivotal tokens found
    no_contrast: int = 0  # pivotal tokens without an opposite token among the prefix's rollouts (no pair)
    estimates: int = 0  # p(success | prefix) evaluations
    rollouts: int = 0
    generated_tokens: int = 0


def classify(p: float, p_low: float, p_high: float) -> str:
    return "too_hard" if p < p_low else "too_easy" if p > p_high else "kept"


def contrast_token(before: Estimate, pivot: PivotalToken) -> int | None:
    """The other side of a pair, from the first tokens of the rollouts sampled at the pivot's prefix: for a token
    that raises p, a first token of failed rollouts whose empirical success rate is below p_before (the lowest rate,
    then the most frequent); for one that lowers p, a successful first token with a rate above p_before."""
    raising = pivot.p_after > pivot.p_before
    counts, wins = Counter(before.first_tokens), Counter()
    for token, ok in zip(before.first_tokens, before.successes):
        wins[token] += ok
    candidates = []
    for token, ok in zip(before.first_tokens, before.successes):
        rate = wins[token] / counts[token]
        if token != pivot.token and ok != raising and (rate < pivot.p_before if raising else rate > pivot.p_before):
            candidates.append((rate if raising else -rate, -counts[token], token))
    return min(candidates)[2] if candidates else None


def search_question(qid: str, prompt_ids: list[int], sample, judge, cfg: PTSConfig) -> QuestionResult:
    """sample(prompt_ids, n, max_new_tokens) -> list[Generation]; judge(responses: list[list[int]]) -> list[bool]
    on whole assistant responses (token ids, eos included when produced)."""
    eos = set(cfg.eos_ids)
    memo: dict[tuple[int, ...], Estimate] = {}
    result = QuestionResult("kept", None)

    def estimate(prefix: tuple[int, ...]) -> Estimate:
        if prefix in memo:
            return memo[prefix]
        budget = cfg.max_new_tokens - len(prefix)
        if budget <= 0 or (prefix and prefix[-1] in eos):  # a complete response: the oracle decides exactly
            est = Estimate(float(judge([list(prefix)])[0]), [], [])
        else:
            gens = sample(list(prompt_ids) + list(prefix), cfg.rollouts, budget)
            ok = judge([list(prefix) + g.tokens for g in gens])
            # Whole rollouts are kept at the root only (T_full is one of them); elsewhere first tokens suffice.
            est = Estimate(sum(ok) / len(ok), [g.tokens[0] for g in gens], list(ok), gens if not prefix else [])
            result.rollouts += len(gens)
            result.generated_tokens += sum(len(g.tokens) for g in gens)
        result.estimates += 1
        memo[prefix] = est
        return est

    root = estimate(())
    result.p = root.p
    result.status = classify(root.p, cfg.p_low, cfg.p_high)
    if result.status != "kept":
        return result
    wanted = {"sampled": [None], "success": [True], "failure": [False], "both": [True, False]}[cfg.solution]
    solutions = []
    for outcome in wanted:  # None: the first rollout, whatever its outcome
        for gen, ok in zip(root.rollouts, root.successes):
            if outcome is None or ok == outcome:
                solutions.append(gen)
                break
    seen = set()
    for gen in solutions:
        pivots = find_pivotal_tokens(gen.tokens, gen.logprobs, lambda pre: estimate(tuple(pre)).p, cfg.p_gap)
        for pivot in pivots:
            prefix = tuple(gen.tokens[:pivot.position])
            if (prefix, pivot.token) in seen:  # both solutions share this prefix: one pair
                continue
            seen.add((prefix, pivot.token))
            result.pivotal += 1
            other = contrast_token(estimate(prefix), pivot)
            if other is None:
                result.no_contrast += 1
                continue
            chosen, rejected = (pivot.token, other) if pivot.p_after > pivot.p_before else (other, pivot.token)
            result.pairs.append({"question_id": qid, "prompt_ids": list(prompt_ids) + list(prefix),
                                 "chosen_ids": [chosen], "rejected_ids": [rejected], "position": pivot.position,
                                 "p_before": pivot.p_before, "p_after": pivot.p_after})
    return result


# Files: questions in, pairs out, resumable.
