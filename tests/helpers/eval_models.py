"""Models for the evaluation tests: random ones, and ones built to behave a known way (not mocks: real Transformers
with hand-set weights)."""
from __future__ import annotations

import torch

from model.transformer import Transformer
from tests.helpers.models import tiny_model

# One block is enough (the bigram construction zeroes what blocks add); 512 positions hold every prompt of the tests.
EVAL_SHAPE = dict(n_layers=1, max_seq_len=512)


def random_model(seed: int = 0, **overrides) -> Transformer:
    return tiny_model(seed, **{**EVAL_SHAPE, **overrides}).eval()


def bigram_model(next_token: dict[int, int], favoured: list[int] = (), favour: float = 3.0) -> Transformer:
    """A model whose next-token choice depends only on the current token, by construction.

    Attention and MLP outputs are zeroed (wo = w2 = 0), so the final hidden state is RMSNorm(embedding): token `a` of
    the chain gets the one-hot embedding e_slot(a), every other token e_0. The LM head row of `next_token[a]` is
    30 e_slot(a) (logit ~170 after the norm's sqrt(dim) gain), and rows of `favoured` tokens get `favour` in every
    coordinate, so they are preferred after any token (logit ~17 against 0 for the rest of the vocabulary)."""
    model = random_model(1)
    d = model.cfg.dim
    slots = {a: 1 + i for i, a in enumerate(next_token)}
    assert len(slots) < d
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        emb = torch.zeros(model.cfg.vocab_size, d)
        emb[:, 0] = 1.0
        for a, s in slots.items():
            emb[a] = 0.0
            emb[a, s] = 1.0
        model.tok_embeddings.weight.copy_(emb)
        head = torch.zeros(model.cfg.vocab_size, d)
        for a, b in next_token.items():
            head[b, slots[a]] += 30.0
        for f in favoured:
            head[f] += favour
        model.output.weight.copy_(head)
    return model


def full_logit_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from the full (T, V) logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float()[0]
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))
