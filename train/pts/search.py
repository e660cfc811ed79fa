"""Pivotal Token Search, the search itself (spec section 6): a pure function of one solution, its log-probs and any
p(success | prefix) estimator. The runner (rollouts, oracle, files, CLI) is `train.pts.run`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


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
