"""Long-context JSON key-value recall (HELMET's recall task): a JSON object of random UUID pairs filling exactly the
target length in tokens, then the value of one key; scored by exact match and substring match (SubEM).
"""
from __future__ import annotations

import random
import uuid
from contextlib import contextmanager

from train.eval.config import EvalConfig, RecallProbe
from train.eval.tasks import generate_texts


# ---- long-context recall ----------------------------------------------------------------------------------------
RECALL_HEADER = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{\n"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def build_recall_prompt(tok, target_tokens: int, seed: int, chat: bool = False) -> dict:
    """A JSON key-value recall prompt of exactly `target_tokens` tokens (chat template included when `chat`).

    Pieces are cut where the cl100k pre-tokeniser splits anyway (a pair line starts with ' "' and ends with '",\\n'),
    so the ids are the text's own tokenisation. Pairs are added until the next would not fit; the last pair's value
    is a run of 3-digit groups (one token each), sized to land exactly on the target. The queried pair sits at a
    random depth; its key appears once in the object."""
    rng = random.Random(f"json-kv:{seed}:{target_tokens}")
    chat_open = tok.apply_chat_template([{"role": "user", "content": ""}])[:-1] if chat else []  # up to <|im_sep|>
    chat_close = tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True)[
        len(chat_open):] if chat else []
    head = chat_open + tok.encode(RECALL_HEADER)

    def pair(k: str, v: str, last: bool) -> list[int]:
        return tok.encode(f' "{k}": "{v}"' + ("\n" if last else ",\n"))

    def tail(k: str) -> list[int]:
        return tok.encode(f'}}\n\nKey: "{k}"\nCorresponding value:') + chat_close

    query, value = _uuid(rng), _uuid(rng)
    pairs = [(query, value)]
    budget = target_tokens - len(head) - len(tail(query))
    used = len(pair(query, value, False))
    pad_key = _uuid(rng)
    pad_base = len(pair(pad_key, "100", True)) - 1  # the padding pair without its value's digit groups
    while True:
        k, v = _uuid(rng), _uuid(rng)
        cost = len(pair(k, v, False))
        if used + cost + pad_base + 1 > budget:  # always leave room for the padding pair
            break
        pairs.append((k, v))
        used += cost
    if used + pad_base + 1 > budget:
        raise ValueError(f"recall probe: {target_tokens} tokens is too short for a JSON object (header, question "
                         f"and two pairs take {target_tokens - budget + used + pad_base + 1})")
    pos = rng.randrange(len(pairs))  # depth of the queried pair in the object
    pairs.insert(pos, pairs.pop(0))
    body = [pair(k, v, False) for k, v in pairs]
    groups = budget - used - pad_base  # >= 1: 3-digit groups, one token each
    body.append(pair(pad_key, "".join(str(rng.randrange(100, 1000)) for _ in range(groups)), True))
    ids = head + [t for piece in body for t in piece] + tail(query)
    if len(ids) != target_tokens:
        raise AssertionError(f"recall probe built {len(ids)} tokens, expected {target_tokens}")
    return {"ids": ids, "key": query, "value": value, "position": pos, "pairs": len(pairs) + 1}


def recall_scores(completion: str, value: str) -> dict:
    """exact: the completion's first quoted/bare string equals the value; substring: the value appears in it."""
    words = completion.strip().lstrip('"').split('"')[0].split()
    first = words[0] if words else ""
    return {"exact_match": float(first == value), "substring_match": float(value in completion)}


def eval_recall(model, tok, probe: RecallProbe, cfg: EvalConfig, device, shard: tuple[int, int] = (0, 1)) -> dict:
    """Every probe (length-major; probe k of the task goes to array shard k % N), scored; lengths beyond the model's
    context are skipped (recorded) unless allow_beyond_context."""
    context = model.cfg.max_seq_len
    skipped, samples = {}, []
    for li, length in enumerate(probe.lengths):
        mine = [i for i in range(probe.samples) if (li * probe.samples + i) % shard[1] == shard[0]]
        probes = {i: build_recall_prompt(tok, length, probe.seed * 1_000_003 + i, probe.prompt == "chat")
                  for i in range(probe.samples)}
        max_new = max(len(tok.encode(f' "{p["value"]}"')) for p in probes.values()) + 4  # the same on every shard
        if length + max_new > context and not probe.allow_beyond_context:
            skipped[f"len_{length}"] = f"beyond the model's max_seq_len={context}"
            continue
        if not mine:
            continue
        with _context_at_least(model, length + max_new):
            texts = generate_texts(model, tok, [probes[i]["ids"] for i in mine], max_new, 0.0, 1.0, cfg, device)
        for i, t in zip(mine, texts):
            p = probes[i]
            samples.append({"index": li * probe.samples + i, "length": length, "key": p["key"], "value": p["value"],
                            "position": p["position"], "pairs": p["pairs"], "completion": t,
                            **recall_scores(t, p["value"])})
    record = {"task": "json_kv", "kind": "recall", "metrics": recall_metrics(probe, samples), "skipped": skipped,
              "samples": samples}
    if probe.paper_score:
        record["paper_score"] = {f"len_{n}/substring_match": v for n, v in probe.paper_score.items()}
    return record


def recall_metrics(probe: RecallProbe | None, samples: list[dict]) -> dict:
    """Exact and substring match per length and their mean over lengths, from the samples alone."""
    per_length: dict[str, list[dict]] = {}
    for s in sorted(samples, key=lambda s: s["index"]):
        per_length.setdefault(f"len_{s['length']}", []).append(s)
    metrics = {f"{name}/{k}": sum(s[k] for s in rows) / len(rows)
               for name, rows in per_length.items() for k in ("exact_match", "substring_match")}
    if per_length:
        means = [metrics[f"{name}/substring_match"] for name in per_length]
        metrics["mean/substring_match"] = sum(means) / len(means)
    return metrics


@contextmanager
def _context_at_least(model, n: int):
    """Temporarily raise cfg.max_seq_len (a guard in generate; RoPE itself has no length limit)."""
    old = model.cfg.max_seq_len
    model.cfg.max_seq_len = max(old, n)
    try:
        yield
    finally:
        model.cfg.max_seq_len = old
