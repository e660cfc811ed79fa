"""Evaluation of a checkpoint, a run or an exported Hugging Face directory: `python -m train.eval <config.yaml> [k=v]`.

Tasks (spec section 8), each on jsonl files, each giving one result record:
- multiple choice by log-likelihood, k-shot (MMLU / ARC style): every choice is scored by the sum of its tokens'
  log-probs after the prompt, and by their mean (length-normalised); `primary` picks which one `accuracy` reports;
- generative few-shot (GSM8K / MATH style): greedy or sampled completions, plain few-shot text (base models) or the
  chat template (chat models), checked by `data.answers` (answer match; unit tests in the sandbox for code items);
- perplexity per source (prepared shards or jsonl text), token-weighted, and aggregated per provenance
  (synthetic vs organic): each document is scored alone, in windows of seq_len, every token after its first once;
- long-context JSON key-value recall (HELMET's recall task): a JSON object of random UUID pairs filling exactly the
  target length in tokens, then the value of one key; scored by exact match and substring match (SubEM).
Results go to `<output_dir>/results.jsonl` (one record per task), per-item samples to `<output_dir>/samples/`, and
wandb under `eval/`. `evaluate(model, tokenizer, cfg, device)` is the in-loop entry point (flat metric dict).

Distributed use: every rank runs every task on the same items, so forwards match rank for rank (ZeRO-3 safe). Under
ZeRO-3 (parameters carry `ds_id`) generation never stops early: it runs max_new_tokens steps on every rank and the
completions are cut at the first stop token afterwards, so no rank waits in a collective the others left.
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data.answers import check_answer, check_code_many, extract_answer
from data.config import PROVENANCES
from data.fileio import atomic_write
from data.tokenizer import EOD_ID, EOS_ID, PAD_ID, Phi4Tokenizer
from model.config import ModelConfig
from model.generate import generate
from model.transformer import IGNORE_INDEX, Transformer
from train.config import ConfigError, WandbConfig, from_dict, load_config, to_dict

log = logging.getLogger("eval")
STOP_IDS = (EOS_ID, EOD_ID)  # <|im_end|> ends a chat turn, <|endoftext|> a plain document


@dataclass
class MultipleChoiceTask:
    name: str = ""
    path: str = ""  # jsonl rows {"question", "choices": [...], "answer": index}
    k_shot: int = 0
    fewshot_path: str = ""  # shots = its first k rows; empty = the first k rows of `path` (then not scored)
    format: str = "text"  # text: score each choice's text (ARC) | letters: list choices as A-D, score the letter (MMLU)
    primary: str = "mean"  # the score `accuracy` uses: mean (per-token, length-normalised) | sum
    limit: int = 0  # 0 = every item


@dataclass
class GenerativeTask:
    name: str = ""
    path: str = ""  # jsonl rows {"question" or "messages", "answer", "oracle"?: math|code, "tests"?}
    k_shot: int = 0
    fewshot_path: str = ""  # rows with "question" and "solution" (or "answer"); empty = first k rows of `path`
    prompt: str = "plain"  # plain few-shot text (base models) | chat (the chat template; chat models)
    temperature: float = 0.0  # 0 = greedy; simple-evals use 0.5
    top_p: float = 1.0
    max_new_tokens: int = 256
    num_samples: int = 1  # completions per item; accuracy is averaged over them
    limit: int = 0


@dataclass
class PerplexitySource:
    name: str = ""
    path: str = ""  # prepared shard directory (manifest.json) or a .jsonl file
    provenance: str = ""  # synthetic | organic; shards: read from the manifest (must agree when given)
    text_field: str = "text"  # jsonl only
    held_out_fraction: float = 0.0  # shards: score only the documents the loader holds out (same seed); 0 = all
    seed: int = 1234  # the run's data.seed, so the held-out documents are the loader's
    max_docs: int = 0  # 0 = no cap
    max_tokens: int = 0  # 0 = no cap


@dataclass
class RecallProbe:
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])  # prompt tokens; empty = off
    samples: int = 5  # probes per length
    prompt: str = "plain"  # plain | chat
    seed: int = 0
    allow_beyond_context: bool = False  # probe lengths above the model's max_seq_len too (else they are skipped)


@dataclass
class EvalConfig:
    model_path: str = ""  # run dir, checkpoint step dir, or Hugging Face directory (CLI only)
    output_dir: str = ""  # results.jsonl and samples/ (CLI only)
    label: str = ""  # recorded with every result, e.g. "after-sft"; default: the model path and step
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    batch_size: int = 8  # sequences per forward / prompts per generate call
    seq_len: int = 0  # perplexity window and multiple-choice context cap; 0 = the model's max_seq_len
    seed: int = 0  # sampling
    multiple_choice: list[MultipleChoiceTask] = field(default_factory=list)
    generative: list[GenerativeTask] = field(default_factory=list)
    perplexity: list[PerplexitySource] = field(default_factory=list)
    recall: RecallProbe = field(default_factory=RecallProbe)
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="disabled"))

    def validate(self) -> None:
        """Raise ConfigError naming the key of the first bad value."""
        mc, gen, ppl = self.multiple_choice, self.generative, self.perplexity
        choices = [("device", self.device, ("auto", "cpu", "cuda")),
                   ("precision", self.precision, ("auto", "bf16", "fp32")),
                   ("wandb.mode", self.wandb.mode, ("online", "offline", "disabled")),
                   ("recall.prompt", self.recall.prompt, ("plain", "chat"))]
        choices += [(f"multiple_choice[{i}].format", t.format, ("text", "letters")) for i, t in enumerate(mc)]
        choices += [(f"multiple_choice[{i}].primary", t.primary, ("mean", "sum")) for i, t in enumerate(mc)]
        choices += [(f"generative[{i}].prompt", t.prompt, ("plain", "chat")) for i, t in enumerate(gen)]
        choices += [(f"perplexity[{i}].provenance", t.provenance, ("",) + PROVENANCES) for i, t in enumerate(ppl)]
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"eval config: {key}={value!r}; expected one of {list(allowed)}")
        positive = [("batch_size", self.batch_size), ("recall.samples", self.recall.samples)]
        positive += [(f"recall.lengths[{i}]", n) for i, n in enumerate(self.recall.lengths)]
        positive += [(f"generative[{i}].{k}", getattr(t, k)) for i, t in enumerate(gen)
                     for k in ("max_new_tokens", "num_samples", "top_p")]
        for key, value in positive:
            if value <= 0:
                raise ConfigError(f"eval config: {key}={value} must be > 0")
        for section, tasks in (("multiple_choice", mc), ("generative", gen), ("perplexity", ppl)):
            names = [t.name for t in tasks]
            if len(set(names)) != len(names) or not all(names) or not all(t.path for t in tasks):
                raise ConfigError(f"eval config: every {section} entry needs a unique name and a path; got {names}")
        for i, t in enumerate(gen):
            if t.temperature < 0 or t.top_p > 1:
                raise ConfigError(f"eval config: generative[{i}]: temperature={t.temperature} must be >= 0 and "
                                  f"top_p={t.top_p} at most 1")


# ---- loading ---------------------------------------------------------------------------------------------------
def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, dict]:
    """A Transformer from a Hugging Face directory, a checkpoint step dir or a run dir; plus {source, step}."""
    path = Path(path)
    if (path / "config.json").is_file():
        from model.hf import from_hf

        return from_hf(path, dtype=dtype, device=device).eval(), {"source": str(path), "step": None}
    from train.checkpoint import consolidated_state_dict, resolve_checkpoint_dir

    tag_dir, meta = resolve_checkpoint_dir(path)
    if "model" not in meta.get("config", {}):
        raise ConfigError(f"{tag_dir}/meta.json: no config.model; cannot rebuild the model")
    cfg = from_dict(meta["config"]["model"], schema=ModelConfig)
    with torch.device("meta"):
        model = Transformer(cfg)  # no allocation: the checkpoint's tensors are assigned below
    model.load_state_dict(consolidated_state_dict(tag_dir), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval(), {"source": str(tag_dir), "step": meta.get("step")}


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: invalid JSON ({e.msg})") from None
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path} line {n}: missing key(s) {missing}; expected {list(required)}")
            rows.append(row)
    return rows


def _shots_and_items(path: str, fewshot_path: str, k: int, limit: int, required) -> tuple[list[dict], list[dict]]:
    items = read_jsonl(path, required)
    pool = read_jsonl(fewshot_path) if fewshot_path else items
    if len(pool) < k:
        raise ValueError(f"{fewshot_path or path}: {len(pool)} rows, fewer than k_shot={k}")
    shots = pool[:k]
    if not fewshot_path:
        items = items[k:]  # shots drawn from the evaluation file are not scored
    return shots, items[:limit] if limit else items


# ---- log-likelihood scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def continuation_logprobs(model: Transformer, requests: list[tuple[list[int], list[int]]], batch_size: int,
                          device, max_len: int) -> list[tuple[float, int]]:
    """(sum of log-probs, token count) of each continuation given its context, batched with right padding."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = []
        for i in idx:
            ctx, cont = requests[i]
            if not cont:
                raise ValueError("a continuation must have at least one token")
            seq = (ctx + cont)[-(max_len + 1):]  # keep the continuation; cut the context on the left
            rows.append((seq, len(cont)))
        T = max(len(s) for s, _ in rows) - 1
        ids = torch.full((len(rows), T), PAD_ID, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (seq, n_cont) in enumerate(rows):
            ids[r, :len(seq) - 1] = torch.tensor(seq[:-1])
            labels[r, len(seq) - 1 - n_cont:len(seq) - 1] = torch.tensor(seq[-n_cont:])
        nll = labelled_nll(model, ids.to(device), labels.to(device))
        for r, i in enumerate(idx):
            out[i] = (-float(nll[r].sum()), rows[r][1])
    return out


def labelled_nll(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (B, T), 0 off-label, with the LM head applied to the labelled positions only (a multiple-choice
    continuation is a few tokens of a long prompt: this skips almost all of the V-wide head)."""
    hidden = model(ids, return_hidden=True)  # (B, T, D)
    mask = labels != IGNORE_INDEX
    picked = model.output(hidden[mask][None], labels[mask][None], reduction="none")[0]  # (N,) via the module (ZeRO-3)
    return torch.zeros(labels.shape, dtype=torch.float32, device=ids.device).masked_scatter(mask, picked.float())


def mc_prompt(item: dict, shots: list[dict], fmt: str) -> tuple[str, list[str]]:
    """(context, one continuation per choice): 'Question: ...\\nAnswer:' + ' <choice>' (text) or ' <letter>'."""
    def block(row: dict) -> str:
        if fmt == "letters":
            options = "".join(f"\n{chr(65 + j)}. {c}" for j, c in enumerate(row["choices"]))
            return f"Question: {row['question']}{options}\nAnswer:"
        return f"Question: {row['question']}\nAnswer:"

    def answer(row: dict, j: int) -> str:
        return f" {chr(65 + j)}" if fmt == "letters" else f" {row['choices'][j]}"

    context = "".join(block(s) + answer(s, int(s["answer"])) + "\n\n" for s in shots) + block(item)
    return context, [answer(item, j) for j in range(len(item["choices"]))]


def eval_multiple_choice(model, tok, task: MultipleChoiceTask, cfg: EvalConfig, device) -> dict:
    shots, items = _shots_and_items(task.path, task.fewshot_path, task.k_shot, task.limit,
                                    ("question", "choices", "answer"))
    requests, owner = [], []
    for n, item in enumerate(items):
        context, conts = mc_prompt(item, shots, task.format)
        ctx_ids = tok.encode(context)
        requests += [(ctx_ids, tok.encode(c)) for c in conts]
        owner += [n] * len(conts)
    scores = continuation_logprobs(model, requests, cfg.batch_size, device, _max_len(model, cfg))
    per_item: list[list[tuple[float, int]]] = [[] for _ in items]
    for n, s in zip(owner, scores):
        per_item[n].append(s)
    samples, hits = [], {"sum": 0, "mean": 0}
    for item, sc in zip(items, per_item):
        pred = {"sum": int(np.argmax([s for s, _ in sc])), "mean": int(np.argmax([s / n for s, n in sc]))}
        for key in hits:
            hits[key] += int(pred[key] == int(item["answer"]))
        samples.append({"id": item.get("id"), "answer": int(item["answer"]), "pred_sum": pred["sum"],
                        "pred_mean": pred["mean"], "logprob_sum": [s for s, _ in sc], "tokens": [n for _, n in sc]})
    n = max(len(items), 1)
    metrics = {"accuracy": hits[task.primary] / n, "acc_sum": hits["sum"] / n, "acc_mean": hits["mean"] / n,
               "items": len(items), "k_shot": task.k_shot}
    return {"task": task.name, "kind": "multiple_choice", "metrics": metrics, "samples": samples}


# ---- generation -------------------------------------------------------------------------------------------------
def _is_zero3(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def generate_texts(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                   cfg: EvalConfig, device, seed_offset: int = 0) -> list[str]:
    """Completions (decoded, cut before the first stop token) of every prompt, in batches of cfg.batch_size."""
    uniform = _is_zero3(model)  # same number of decode steps on every rank
    generator = torch.Generator(device=device).manual_seed(cfg.seed + seed_offset)
    keep = model.cfg.max_seq_len - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")
    if any(len(p) > keep for p in prompts):
        log.warning("%d prompts longer than %d tokens were cut on the left", sum(len(p) > keep for p in prompts), keep)
        prompts = [p[-keep:] for p in prompts]
    texts = []
    for start in range(0, len(prompts), cfg.batch_size):
        outs = generate(model, prompts[start:start + cfg.batch_size], max_new_tokens, temperature, top_p,
                        eos_ids=() if uniform else STOP_IDS, generator=generator, return_logprobs=False)
        for o in outs:
            ids = o.tokens
            cut = next((j for j, t in enumerate(ids) if t in STOP_IDS), len(ids))
            texts.append(tok.decode(ids[:cut]))
    return texts


def _solution(row: dict) -> str:
    if row.get("solution"):
        return row["solution"]
    assistant = [m["content"] for m in row.get("messages", []) if m.get("role") == "assistant"]
    return assistant[-1] if assistant else f"The answer is {row['answer']}."


def _question(row: dict) -> str:
    if "question" in row:
        return row["question"]
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")


def generative_prompt(tok, item: dict, shots: list[dict], style: str) -> list[int]:
    if style == "chat":
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": _question(s)}, {"role": "assistant", "content": _solution(s)}]
        own = [m for m in item.get("messages", []) if m["role"] != "assistant"] or \
            [{"role": "user", "content": item["question"]}]
        return tok.apply_chat_template(messages + own, add_generation_prompt=True)
    text = "".join(f"Question: {_question(s)}\nAnswer: {_solution(s)}\n\n" for s in shots)
    return tok.encode(text + f"Question: {_question(item)}\nAnswer:")


def eval_generative(model, tok, task: GenerativeTask, cfg: EvalConfig, device) -> dict:
    shots, items = _shots_and_items(task.path, task.fewshot_path, task.k_shot, task.limit, ("answer",))
    prompts = [generative_prompt(tok, item, shots, task.prompt) for item in items]
    rows = [(n, s) for s in range(task.num_samples) for n in range(len(items))]
    texts = generate_texts(model, tok, [prompts[n] for n, _ in rows], task.max_new_tokens, task.temperature,
                           task.top_p, cfg, device)
    if task.prompt == "plain":  # a base model continues with the next few-shot block: keep the first answer only
        texts = [t.split("\nQuestion:")[0] for t in texts]
    correct = [False] * len(rows)
    code = [j for j, (n, _) in enumerate(rows) if items[n].get("oracle") == "code"]
    for j, ok in zip(code, check_code_many([texts[j] for j in code], [items[rows[j][0]]["tests"] for j in code])):
        correct[j] = ok
    for j, (n, _) in enumerate(rows):
        if items[n].get("oracle") != "code":
            correct[j] = check_answer(texts[j], str(items[n]["answer"]))
    samples = [{"id": items[n].get("id"), "sample": s, "oracle": items[n].get("oracle", "math"),
                "answer": items[n]["answer"], "completion": texts[j], "extracted": extract_answer(texts[j]),
                "correct": correct[j]} for j, (n, s) in enumerate(rows)]
    metrics = {"accuracy": sum(correct) / max(len(rows), 1), "items": len(items), "k_shot": task.k_shot,
               "samples_per_item": task.num_samples, "temperature": task.temperature,
               "answer_found": sum(s["extracted"] is not None for s in samples) / max(len(rows), 1)}
    for oracle in sorted({s["oracle"] for s in samples}):
        hits = [s["correct"] for s in samples if s["oracle"] == oracle]
        metrics[f"accuracy_{oracle}"] = sum(hits) / len(hits)
    return {"task": task.name, "kind": "generative", "metrics": metrics, "samples": samples}


# ---- perplexity -------------------------------------------------------------------------------------------------
def perplexity_documents(src: PerplexitySource, tok) -> tuple[str, list[np.ndarray]]:
    """(provenance, token arrays each ending with eod) of the documents a source contributes."""
    path = Path(src.path)
    if path.is_dir():
        from data.mixture import held_out_mask
        from data.shards import ShardedSource

        sharded = ShardedSource(path)
        if src.provenance and src.provenance != sharded.provenance:
            raise ConfigError(f"perplexity source {src.name}: provenance {src.provenance!r} but "
                              f"{path}/manifest.json says {sharded.provenance!r}")
        provenance = sharded.provenance
        doc_ids = range(sharded.num_docs)
        if src.held_out_fraction > 0:
            doc_ids = np.flatnonzero(held_out_mask(sharded.num_docs, src.held_out_fraction, src.seed)).tolist()
        docs = (np.asarray(sharded.doc(int(i)), dtype=np.int64) for i in doc_ids)
    else:
        if not src.provenance:
            raise ConfigError(f"perplexity source {src.name}: a jsonl source needs provenance (synthetic|organic)")
        provenance = src.provenance
        rows = read_jsonl(path, (src.text_field,))
        docs = (np.array(tok.encode(r[src.text_field]) + [EOD_ID], dtype=np.int64) for r in rows)
    out, tokens = [], 0  # tokens = predicted tokens (a document's first is never predicted)
    for d in docs:
        if (src.max_docs and len(out) >= src.max_docs) or (src.max_tokens and tokens >= src.max_tokens):
            break
        if src.max_tokens:
            d = d[:src.max_tokens - tokens + 1]  # the last document may be cut to land on the cap
        if len(d) >= 2:
            out.append(d)
            tokens += len(d) - 1
    return provenance, out


@torch.no_grad()
def document_nll(model, docs: list[np.ndarray], seq_len: int, batch_size: int, device) -> tuple[float, int]:
    """(summed NLL in nats, predicted tokens) over documents, each scored alone in windows of seq_len inputs
    (windows overlap by one token, so every token but a document's first is predicted once)."""
    windows = [d[s:s + seq_len + 1] for d in docs for s in range(0, len(d) - 1, seq_len)]
    windows.sort(key=len, reverse=True)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        T = len(batch[0]) - 1
        ids = torch.full((len(batch), T), PAD_ID, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for r, w in enumerate(batch):
            ids[r, :len(w) - 1] = torch.from_numpy(w[:-1])
            labels[r, :len(w) - 1] = torch.from_numpy(w[1:])
        nll = model(ids.to(device), labels=labels.to(device), reduction="none")
        total += float(nll.double().sum())
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


def eval_perplexity(model, tok, sources: list[PerplexitySource], cfg: EvalConfig, device) -> list[dict]:
    """One record per source, then one per provenance (token-weighted over its sources)."""
    records, by_prov = [], {}
    for src in sources:
        t0 = time.perf_counter()
        provenance, docs = perplexity_documents(src, tok)
        nll, n = document_nll(model, docs, _max_len(model, cfg), cfg.batch_size, device)
        agg = by_prov.setdefault(provenance, [0.0, 0, []])
        agg[0], agg[1] = agg[0] + nll, agg[1] + n
        agg[2].append(src.name)
        records.append({"task": src.name, "kind": "perplexity", "metrics": _ppl(nll, n, len(docs)),
                        "provenance": provenance, "time_s": time.perf_counter() - t0})
    for provenance, (nll, n, names) in sorted(by_prov.items()):
        records.append({"task": provenance, "kind": "perplexity_by_provenance", "metrics": _ppl(nll, n),
                        "sources": names})
    return records


def _ppl(nll: float, n: int, docs: int | None = None) -> dict:
    mean = nll / n if n else float("nan")
    out = {"nll": mean, "perplexity": math.exp(mean) if n else float("nan"), "tokens": n}
    return {**out, "documents": docs} if docs is not None else out


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


def eval_recall(model, tok, probe: RecallProbe, cfg: EvalConfig, device) -> dict:
    context = model.cfg.max_seq_len
    per_length, samples = {}, []
    for length in probe.lengths:
        probes = [build_recall_prompt(tok, length, probe.seed * 1_000_003 + i, probe.prompt == "chat")
                  for i in range(probe.samples)]
        max_new = max(len(tok.encode(f' "{p["value"]}"')) for p in probes) + 4
        if length + max_new > context and not probe.allow_beyond_context:
            per_length[f"len_{length}"] = {"skipped": f"beyond the model's max_seq_len={context}"}
            continue
        with _context_at_least(model, length + max_new):
            texts = generate_texts(model, tok, [p["ids"] for p in probes], max_new, 0.0, 1.0, cfg, device)
        scores = [recall_scores(t, p["value"]) for t, p in zip(texts, probes)]
        per_length[f"len_{length}"] = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}
        samples += [{"length": length, "key": p["key"], "value": p["value"], "position": p["position"],
                     "pairs": p["pairs"], "completion": t, **s} for p, t, s in zip(probes, texts, scores)]
    metrics = {f"{name}/{k}": v for name, m in per_length.items() for k, v in m.items() if k != "skipped"}
    done = [m for m in per_length.values() if "skipped" not in m]
    if done:
        metrics["mean/substring_match"] = sum(m["substring_match"] for m in done) / len(done)
    skipped = {name: m["skipped"] for name, m in per_length.items() if "skipped" in m}
    return {"task": "json_kv", "kind": "recall", "metrics": metrics, "skipped": skipped, "samples": samples}


@contextmanager
def _context_at_least(model, n: int):
    """Temporarily raise cfg.max_seq_len (a guard in generate; RoPE itself has no length limit)."""
    old = model.cfg.max_seq_len
    model.cfg.max_seq_len = max(old, n)
    try:
        yield
    finally:
        model.cfg.max_seq_len = old


# ---- running ----------------------------------------------------------------------------------------------------
def _max_len(model, cfg: EvalConfig) -> int:
    return cfg.seq_len or model.cfg.max_seq_len


KIND_PREFIX = {"multiple_choice": "mc", "generative": "gen", "perplexity": "ppl",
               "perplexity_by_provenance": "ppl_by_provenance", "recall": "recall"}


def run_tasks(model, tok, cfg: EvalConfig, device) -> list[dict]:
    """Every configured task; one record each (with per-item `samples` where they exist)."""
    was_training = model.training
    model.eval()
    records = []
    try:
        jobs = [(eval_multiple_choice, t) for t in cfg.multiple_choice] + \
               [(eval_generative, t) for t in cfg.generative]
        for fn, task in jobs:
            t0 = time.perf_counter()
            records.append({**fn(model, tok, task, cfg, device), "time_s": time.perf_counter() - t0})
        if cfg.perplexity:
            records += eval_perplexity(model, tok, cfg.perplexity, cfg, device)
        if cfg.recall.lengths:
            t0 = time.perf_counter()
            records.append({**eval_recall(model, tok, cfg.recall, cfg, device), "time_s": time.perf_counter() - t0})
    finally:
        model.train(was_training)
    return records


def flatten(records: list[dict]) -> dict[str, float]:
    """eval/<kind>/<task>/<metric> -> value, the names logged to wandb and metrics.jsonl."""
    return {f"eval/{KIND_PREFIX[r['kind']]}/{r['task']}/{k}": v for r in records for k, v in r["metrics"].items()}


def evaluate(model: Transformer, tokenizer, cfg: EvalConfig, device) -> dict[str, float]:
    """In-loop entry point: every task of `cfg` on `model` (a plain Transformer, or the engine's module)."""
    return flatten(run_tasks(model, tokenizer, cfg, device))


def check_inputs(cfg: EvalConfig) -> None:
    """Fail before loading a model when an input is missing or a jsonl row is malformed (file and line named)."""
    if not cfg.model_path or not Path(cfg.model_path).exists():
        raise ConfigError(f"model_path={cfg.model_path!r} does not exist (a run dir, a checkpoint dir or an HF dir)")
    required = {"multiple_choice": ("question", "choices", "answer"), "generative": ("answer",), "perplexity": ()}
    for section, keys in required.items():
        for i, t in enumerate(getattr(cfg, section)):
            for key in ("path", "fewshot_path"):
                p = getattr(t, key, "")
                if p and not Path(p).exists():
                    raise ConfigError(f"{section}[{i}] ({t.name}).{key}={p!r} does not exist")
            if section != "perplexity":
                read_jsonl(t.path, keys)
            elif not Path(t.path).is_dir():
                read_jsonl(t.path, (t.text_field,))


def write_results(cfg: EvalConfig, records: list[dict], info: dict, label: str) -> Path:
    """Append one line per task to results.jsonl (rewritten atomically); per-item samples beside it."""
    out = Path(cfg.output_dir)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    lines = []
    for r in records:
        record = {"label": label, "model": info["source"], "step": info["step"], "time": stamp,
                  **{k: v for k, v in r.items() if k != "samples"}}
        if r.get("samples"):
            sample_path = out / "samples" / f"{label.replace('/', '_')}.{KIND_PREFIX[r['kind']]}.{r['task']}.jsonl"
            atomic_write(sample_path, "".join(json.dumps(s) + "\n" for s in r["samples"]))
            record["samples_path"] = str(sample_path)
        lines.append(json.dumps(record) + "\n")
    results = out / "results.jsonl"
    previous = results.read_text() if results.exists() else ""
    atomic_write(results, previous + "".join(lines))
    return results


def _log_wandb(cfg: EvalConfig, metrics: dict, info: dict, label: str) -> None:
    import wandb

    w = cfg.wandb
    run = wandb.init(project=w.project, entity=w.entity or None, name=w.name or label, group=w.group or None,
                     tags=list(w.tags) or None, dir=w.dir or cfg.output_dir, mode=w.mode, job_type="eval",
                     config={**to_dict(cfg), "model_source": info["source"]})
    run.define_metric("step")
    run.define_metric("eval/*", step_metric="step")
    run.log({"step": info["step"] or 0, **metrics})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m train.eval <config.yaml> [key=value ...]   (e.g. model_path=runs/smoke/sft)")
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args[0], args[1:], schema=EvalConfig)
        if not cfg.output_dir:
            raise ConfigError(f"{args[0]}: output_dir is empty")
        check_inputs(cfg)
    except (ConfigError, ValueError) as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cfg.precision == "bf16" or (cfg.precision == "auto" and cuda) else torch.float32
    model, info = load_model(cfg.model_path, device, dtype)
    label = cfg.label or (f"{Path(info['source']).name}" if info["step"] is None else f"step_{info['step']}")
    records = run_tasks(model, Phi4Tokenizer(), cfg, device)
    path = write_results(cfg, records, info, label)
    metrics = flatten(records)
    if cfg.wandb.mode != "disabled":
        _log_wandb(cfg, metrics, info, label)
    for key, value in metrics.items():
        log.info("%s = %s", key, f"{value:.4f}" if isinstance(value, float) else value)
    print(f"{len(records)} results -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
