"""Batched sampling with a KV cache in our own Transformer (rollouts for Pivotal Token Search, generative evals).

Prompts of different lengths are left-padded into one batch. Three things keep a padded row identical to the same
prompt generated alone: position ids start at 0 at each row's first real token, the attention mask hides padded keys
from every query, and the cached keys of padded slots are never attended to afterwards. Identical prompts (N rollouts
from one prefix) are prefilled once and their cache rows copied. Tensors only: no files, no distributed code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.transformer import KVCache, Transformer

EOS_ID = 100_265  # <|im_end|>
PAD_ID = 100_349  # <|dummy_85|>: a filler id for padded slots; never attended to


@dataclass
class Generation:
    tokens: list[int]  # new token ids, the stop token included when one was produced
    logprobs: list[float] = field(default_factory=list)  # model log-prob (temperature 1) of each chosen token
    finished: bool = False  # True when an eos id ended the row (False: max_new_tokens ran out)


def left_pad(prompts: list[list[int]], pad_id: int = PAD_ID, device=None):
    """(input_ids, attention_mask, position_ids), each (B, L): pads on the left, mask True on real tokens,
    positions 0.. from each row's first real token (0 on pads, which nothing attends to)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    L = int(lengths.max())
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, L - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
    offset = torch.arange(L, device=device)[None, :] - (L - lengths)[:, None]  # (B, L), negative on pads
    return ids, offset >= 0, offset.clamp(min=0)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None):
    """Token ids (B,) from logits (B, V): argmax when temperature == 0, else nucleus sampling at `temperature`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest head whose mass reaches top_p: drop a token once the mass before it already does.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalised by multinomial
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _head(model: Transformer, hidden_last: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) in fp32 for the last position only: the prefill never materialises (B, L, V)."""
    return model.output(hidden_last).float()


def _select_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Keep (and reorder/duplicate) batch rows of every layer's keys and values."""
    cache.k = [k.index_select(0, rows) for k in cache.k]
    cache.v = [v.index_select(0, rows) for v in cache.v]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_ids=(EOS_ID,), generator: torch.Generator | None = None,
             return_logprobs: bool = True, pad_id: int = PAD_ID) -> list[Generation]:
    """Continue every prompt by up to `max_new_tokens` tokens; a row stops at its first eos id.

    `generator` (on the model's device) makes sampling reproducible. Log-probs are log_softmax of the model's logits
    at the chosen token, whatever the temperature and top_p used for sampling."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be > 0")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if generator is not None and torch.device(generator.device).type != device.type:
        raise ValueError(f"generate: generator on {generator.device} but the model is on {device}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_seq_len={model.cfg.max_seq_len}")

    # Prefill each distinct prompt once; rows that share a prompt share its cache (copied below).
    unique: dict[tuple, int] = {}
    row_of = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
    ids, mask, positions = left_pad([list(p) for p in unique], pad_id, device)
    L, total = ids.shape[1], ids.shape[1] + max_new_tokens
    cache = KVCache(model.cfg, len(unique), total, device, dtype)
    hidden = model(ids, position_ids=positions, kv_cache=cache, attention_mask=mask, return_hidden=True)
    logits = _head(model, hidden[:, -1])  # (U, V)
    rows = torch.tensor(row_of, device=device)
    if len(unique) < len(prompts):  # else row_of is the identity
        _select_rows(cache, rows)
    logits = logits.index_select(0, rows)  # (B, V)
    attention_mask = torch.ones(len(prompts), total, dtype=torch.bool, device=device)
    attention_mask[:, :L] = mask.index_select(0, rows)
    next_position = positions[:, -1].index_select(0, rows) + 1  # (B,) next token's position per row

    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    out = [Generation([]) for _ in prompts]
    active = torch.arange(len(prompts), device=device)  # batch row -> index into `out`
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # per batch row
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)  # (b,)
        token = token.masked_fill(done, pad_id)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1) if return_logprobs else None
        newly_done = ~done & torch.isin(token, eos)
        for row, idx, t, lp, was_done in zip(range(len(active)), active.tolist(), token.tolist(),
                                             logp.tolist() if logp is not None else [None] * len(active),
                                             done.tolist()):
            if was_done:
                continue
            out[idx].tokens.append(t)
            if return_logprobs:
                out[idx].logprobs.append(lp)
        done = done | newly_done
        for idx in active[newly_done].tolist():
            out[idx].finished = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # Drop finished rows once they are half the batch: a smaller batch costs less per step.
        if int(done.sum()) * 2 >= len(active) and len(active) > 1:
            keep = (~done).nonzero().squeeze(-1)
            _select_rows(cache, keep)
            active, done, token = active[keep], done[keep], token[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        hidden = model(token[:, None], position_ids=next_position[:, None], kv_cache=cache,
                       attention_mask=attention_mask[:, :cache.length + 1], return_hidden=True)
        logits = _head(model, hidden[:, -1])
        next_position = next_position + 1
    return out
