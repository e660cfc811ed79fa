"""Batched KV-cache generation: parity with full forwards, left padding invisible, reproducible sampling."""
from __future__ import annotations

import pytest
import torch

from model.generate import decode_step, generate, prefill, sample_next
from model.transformer import Transformer
from tests.helpers.models import tiny_model


@pytest.fixture(scope="module")
def model() -> Transformer:
    # TINY has the real vocabulary (pad 100349 and eos 100265 are real ids); a larger init std makes the next-token
    # distributions peaked enough that greedy choices are far from ties.
    return tiny_model(0, max_seq_len=64, init_std=0.2).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100_000, (n,), generator=g).tolist() for n in (3, 9, 14)]


def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the last position's logits, recomputed from scratch without a cache: (V,)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)


def test_left_aligned_cache_decodes_each_row_as_its_prompt_alone(model, prompts):
    """prefill + decode_step (what generate runs) against full forwards without a cache, whole logit vectors."""
    batch = prompts + [prompts[1]]  # a repeated prompt shares one prefill
    follow = [11, 12, 13]  # fed after every prompt, one token per step
    with torch.no_grad():
        state, first = prefill(model, batch, max(map(len, batch)) + len(follow))
        steps = [first] + [decode_step(model, state, torch.tensor([t] * len(batch))) for t in follow[:-1]]
        for row, prompt in enumerate(batch):
            alone = model(torch.tensor([prompt + follow]))[0]  # (n + 3, V)
            for t, logits in enumerate(steps):
                torch.testing.assert_close(logits[row], alone[len(prompt) - 1 + t], atol=1e-4, rtol=0)
    assert state.attention_mask[0].tolist()[:14] == [False] * 11 + [True] * 3  # prompt 0 after 11 empty slots
    assert state.next_position.tolist() == [len(p) + 2 for p in batch]


def test_greedy_batch_equals_stepwise_argmax_and_each_prompt_alone(model, prompts):
    new = 6
    batch = generate(model, prompts, new, temperature=0, eos_ids=())
    for prompt, got in zip(prompts, batch):
        seq, expected_tokens = list(prompt), []
        for _ in range(new):
            logprobs = full_forward_logprobs(model, seq)
            token = int(logprobs.argmax())
            margin = logprobs.topk(2).values
            assert margin[0] - margin[1] > 1e-3  # the comparison is meaningful: no near-tie
            expected_tokens.append(token)
            assert got.logprobs[len(expected_tokens) - 1] == pytest.approx(float(logprobs[token]), abs=1e-4)
            seq.append(token)
        assert got.tokens == expected_tokens and not got.finished
        alone = generate(model, [prompt], new, temperature=0, eos_ids=())[0]
        assert alone.tokens == got.tokens
        assert alone.logprobs == pytest.approx(got.logprobs, abs=1e-4)
    assert len({tuple(g.tokens) for g in batch}) > 1  # the prompts lead to different continuations


def test_seeded_sampling_is_reproducible_and_logprobs_are_model_logprobs(model, prompts):
    batch = [prompts[0], prompts[1], prompts[0]]  # repeated prompts share one prefill

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, batch, 4, temperature=1.5, top_p=0.95, eos_ids=(), generator=g)

    first, again, other = run(7), run(7), run(8)
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert [g.tokens for g in first] != [g.tokens for g in other]
    assert first[0].tokens != first[2].tokens  # copies of one prompt sample independently
    for prompt, got in zip(batch, first):
        seq = list(prompt)
        for token, logprob in zip(got.tokens, got.logprobs):
            # log-prob at temperature 1, not of the tempered/truncated sampling distribution
            assert logprob == pytest.approx(float(full_forward_logprobs(model, seq)[token]), abs=1e-4)
            seq.append(token)


def test_top_p_samples_only_from_the_nucleus(model, prompts):
    g = torch.Generator().manual_seed(0)
    out = generate(model, [prompts[2]] * 16, 1, temperature=1.0, top_p=0.3, eos_ids=(), generator=g)
    probs = full_forward_logprobs(model, prompts[2]).exp()
    sorted_probs, order = probs.sort(descending=True)
    nucleus_size = int((sorted_probs.cumsum(0) - sorted_probs < 0.3).sum())
    nucleus = set(order[:nucleus_size].tolist())
    # Sampling from the whole distribution would leave the nucleus (30% of the mass) with p = 0.7 per draw.
    assert nucleus_size < 100_352 // 4 and {o.tokens[0] for o in out} <= nucleus


def test_rows_stop_at_eos_and_others_continue(model, prompts):
    greedy = generate(model, prompts, 6, temperature=0, eos_ids=())
    stops = (greedy[1].tokens[2], greedy[0].tokens[1])  # rows 1 and 0 stop at their 3rd / 2nd token
    assert not set(stops) & set(greedy[2].tokens) and stops[0] not in greedy[0].tokens[:2]
    out = generate(model, prompts, 6, temperature=0, eos_ids=stops)
    assert out[1].tokens == greedy[1].tokens[:3] and out[1].finished and len(out[1].logprobs) == 3
    assert out[0].tokens == greedy[0].tokens[:2] and out[0].finished
    # Two of three rows done: the cache was compacted and row 2 moved to the front; its results are unchanged.
    assert out[2].tokens == greedy[2].tokens and not out[2].finished
    assert out[2].logprobs == pytest.approx(greedy[2].logprobs, abs=1e-4)


def test_bad_arguments_are_refused(model, prompts):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [prompts[2]], 60)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompts, 2, top_p=0.0)


def test_sampler_follows_the_tempered_nucleus_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).log().repeat(20_000, 1)
    for temperature, top_p, expected in ((1.0, 1.0, [0.5, 0.3, 0.15, 0.05, 0.0]),
                                         (1.0, 0.7, [0.625, 0.375, 0.0, 0.0, 0.0]),  # head {0.5, 0.3} renormalised
                                         (2.0, 1.0, torch.softmax(logits[0] / 2.0, -1).tolist())):
        tokens = sample_next(logits, temperature, top_p, g)
        freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
        torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float64), atol=0.015, rtol=0)
    assert sample_next(logits[:3], 0.0, 1.0, g).tolist() == [0, 0, 0]
