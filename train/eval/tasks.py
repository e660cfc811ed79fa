"""Multiple-choice, generative and perplexity evaluation tasks (see `train.eval.run` for the overview and the CLI).

Each `eval_*` function takes (model, tokenizer, task config, EvalConfig, device) and returns a result record
{"task", "kind", "metrics", "samples"?}; every rank runs the same items, so forwards match rank for rank (ZeRO-3 safe).
"""
from __future__ import annotations

import logging
import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from data.verify.answers import check_answer, check_code_many, extract_answer
from data.verify.sandbox import run_python_many
from data.fileio import read_jsonl as iter_jsonl
from data.tokenizer import EOD_ID, EOS_ID, IGNORE_INDEX, PAD_ID
from model.generate import generate
from model.transformer import Transformer
from train.config import ConfigError
from train.distributed import is_zero3
from data.benchmarks import check_alias, cut_completion, load_benchmark
from train.eval.config import EvalConfig, GenerativeTask, MultipleChoiceTask, PerplexitySource

log = logging.getLogger("eval")
STOP_IDS = (EOS_ID, EOD_ID)  # <|im_end|> ends a chat turn, <|endoftext|> a plain document


# ---- inputs -----------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    return [row for _, row in iter_jsonl(path, required)]


def task_rows(task, required: tuple[str, ...] = (), shots: bool = True) -> tuple[list[dict], list[dict] | None]:
    """(the scored split's rows, the few-shot pool, or None when the shots are the first rows of the scored split; []
    when `shots` is False): jsonl files as they are, or a benchmark's published files (`source`, see
    data/benchmarks.py; the pool is `fewshot_split` of fewshot_path or path, else `split` of fewshot_path)."""
    if task.source == "jsonl":
        items = read_jsonl(task.path, required)
        pool = read_jsonl(task.fewshot_path) if task.fewshot_path and shots else None
    else:
        items = load_benchmark(task.source, task.path, task.split)
        pool = None
        if shots and task.fewshot_split:
            pool = load_benchmark(task.source, task.fewshot_path or task.path, task.fewshot_split)
        elif shots and task.fewshot_path:
            pool = load_benchmark(task.source, task.fewshot_path, task.split)
    return items, (pool if shots else [])


def fewshot_where(task) -> str:
    """Where a task's shots come from, for messages."""
    if task.fewshot_split:
        return f"{task.fewshot_path or task.path} (split {task.fewshot_split})"
    return task.fewshot_path or task.path


def _shots_and_items(task, required) -> tuple[list[dict], list[dict]]:
    items, pool = task_rows(task, required, shots=task.k_shot > 0)
    source = items if pool is None else pool
    if len(source) < task.k_shot:
        raise ValueError(f"{fewshot_where(task)}: {len(source)} rows, fewer than k_shot={task.k_shot}")
    if pool is None:
        items = items[task.k_shot:]  # shots drawn from the evaluation split are not scored
    return source[:task.k_shot], items[:task.limit] if task.limit else items


def _max_len(model, cfg: EvalConfig) -> int:
    return cfg.seq_len or model.cfg.max_seq_len


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


def mc_prompt(item: dict, shots: list[dict], fmt: str, subject: str = "") -> tuple[str, list[str]]:
    """(context, one continuation per choice). text: 'Question: ...\\nAnswer:' + ' <choice>'; letters: the choices
    listed as A-D, + ' <letter>'; mmlu: lm-eval's `mmlu` prompt (subject header, no 'Question: ', stripped question)."""
    if fmt == "mmlu":
        return mmlu_prompt(item, shots, subject or item.get("subject", ""))

    def block(row: dict) -> str:
        if fmt == "letters":
            options = "".join(f"\n{chr(65 + j)}. {c}" for j, c in enumerate(row["choices"]))
            return f"Question: {row['question']}{options}\nAnswer:"
        return f"Question: {row['question']}\nAnswer:"

    def answer(row: dict, j: int) -> str:
        return f" {chr(65 + j)}" if fmt == "letters" else f" {row['choices'][j]}"

    context = "".join(block(s) + answer(s, int(s["answer"])) + "\n\n" for s in shots) + block(item)
    return context, [answer(item, j) for j in range(len(item["choices"]))]


def mmlu_prompt(item: dict, shots: list[dict], subject: str) -> tuple[str, list[str]]:
    """lm-evaluation-harness's `mmlu` (default) prompt: 'The following are multiple choice questions (with answers)
    about <subject, _ as spaces>.\\n\\n', then each shot as '<question>\\nA. ..\\nB. ..\\nAnswer: <letter>\\n\\n',
    then the item's block ending 'Answer:'; continuations ' A', ' B', ..."""
    if not subject:
        raise ValueError("format=mmlu needs the subject: set the task's `subject` or give each row a \"subject\"")

    def block(row: dict) -> str:
        options = "".join(f"\n{chr(65 + j)}. {c}" for j, c in enumerate(row["choices"]))
        return f"{row['question'].strip()}{options}\nAnswer:"

    header = f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"
    shots_text = "".join(f"{block(s)} {chr(65 + int(s['answer']))}\n\n" for s in shots)
    return header + shots_text + block(item), [f" {chr(65 + j)}" for j in range(len(item["choices"]))]


def mmlu_shots(item: dict, pool: list[dict], k: int, subject: str, path: str) -> list[dict]:
    """The first k dev rows of the item's subject (lm-eval's `first_n` sampler on that subject's dev split)."""
    subject = subject or item.get("subject", "")
    same = [r for r in pool if (r.get("subject") or subject) == subject][:k]
    if len(same) < k:
        raise ValueError(f"{path}: {len(same)} few-shot rows for subject {subject!r}, fewer than k_shot={k}")
    return same


# lm-evaluation-harness's names and definitions, so a number called acc / acc_norm is comparable to the one users
# quote; the per-token mean is ours and is reported only under its own name.
MC_METRICS = ("acc", "acc_norm", "acc_per_token")


def mc_predictions(logprobs: list[float], tokens: list[int], continuations: list[str]) -> dict[str, int]:
    """Chosen index per metric: acc = argmax of the summed log-prob; acc_norm = argmax of log-prob per character of
    the choice (lm-eval's len() of the choice string, without the space joining it to the prompt); acc_per_token =
    argmax of log-prob per token. Ties go to the first choice, as np.argmax does in lm-eval."""
    chars = [len(c[1:] if c.startswith(" ") else c) for c in continuations]
    return {"acc": int(np.argmax(logprobs)),
            "acc_norm": int(np.argmax([lp / max(n, 1) for lp, n in zip(logprobs, chars)])),
            "acc_per_token": int(np.argmax([lp / n for lp, n in zip(logprobs, tokens)]))}


def shard_indices(count: int, shard: tuple[int, int]) -> list[int]:
    """The item indices array task I of N scores: n % N == I (every shard draws the same shots)."""
    i, n = shard
    return list(range(i, count, n))


def eval_multiple_choice(model, tok, task: MultipleChoiceTask, cfg: EvalConfig, device,
                         shard: tuple[int, int] = (0, 1)) -> dict:
    if task.format == "mmlu":  # shots per subject, from the dev split (fewshot_path), never from the scored rows
        items, pool = task_rows(task, ("question", "choices", "answer"), shots=task.k_shot > 0)
        items = items[:task.limit] if task.limit else items
    else:
        shots, items = _shots_and_items(task, ("question", "choices", "answer"))
    indices = shard_indices(len(items), shard)
    requests, owner, item_conts = [], [], []
    for n in indices:
        item = items[n]
        if task.format == "mmlu":
            shots = mmlu_shots(item, pool, task.k_shot, task.subject, fewshot_where(task))
        context, conts = mc_prompt(item, shots, task.format, task.subject)
        item_conts.append(conts)
        ctx_ids = tok.encode(context)
        requests += [(ctx_ids, tok.encode(c)) for c in conts]
        owner += [len(item_conts) - 1] * len(conts)
    scores = continuation_logprobs(model, requests, cfg.batch_size, device, _max_len(model, cfg))
    per_item: list[list[tuple[float, int]]] = [[] for _ in indices]
    for k, s in zip(owner, scores):
        per_item[k].append(s)
    samples = []
    for n, conts, sc in zip(indices, item_conts, per_item):
        pred = mc_predictions([s for s, _ in sc], [k for _, k in sc], conts)
        samples.append({"index": n, "id": items[n].get("id"), "answer": int(items[n]["answer"]),
                        **{f"pred_{k}": v for k, v in pred.items()},
                        "logprob_sum": [s for s, _ in sc], "tokens": [k for _, k in sc]})
    return {"task": task.name, "kind": "multiple_choice", "metrics": mc_metrics(task, samples), "samples": samples}


def mc_metrics(task: MultipleChoiceTask, samples: list[dict]) -> dict:
    """The task's metrics from its per-item samples alone (one process, or the merge of array shards)."""
    hits = {k: sum(int(s[f"pred_{k}"] == s["answer"]) for s in samples) for k in MC_METRICS}
    n = max(len(samples), 1)
    primary = "acc_per_token" if task.primary == "per_token" else task.primary
    return {"accuracy": hits[primary] / n, **{k: v / n for k, v in hits.items()},
            "items": len(samples), "k_shot": task.k_shot}


# ---- generation -------------------------------------------------------------------------------------------------
def row_generators(seed: int, task: str, rows: list[tuple[int, int]], device) -> list[torch.Generator]:
    """One generator per (item index, sample), seeded from the eval seed, the task and the row alone: a completion is
    the same whichever array shard, batch or batch size it is generated in."""
    return [torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{task}:{n}:{s}".encode()))
            for n, s in rows]


def generate_texts(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                   cfg: EvalConfig, device, generators: list[torch.Generator] | None = None) -> list[str]:
    """Completions (decoded, cut before the first stop token) of every prompt, in batches of cfg.batch_size.
    `generators`: one per prompt (see row_generators); else one for all, seeded by cfg.seed."""
    uniform = is_zero3(model)  # same number of decode steps on every rank
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    keep = model.cfg.max_seq_len - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")
    if any(len(p) > keep for p in prompts):
        log.warning("%d prompts longer than %d tokens were cut on the left", sum(len(p) > keep for p in prompts), keep)
        prompts = [p[-keep:] for p in prompts]
    texts = []
    for start in range(0, len(prompts), cfg.batch_size):
        gen = generators[start:start + cfg.batch_size] if generators is not None else generator
        outs = generate(model, prompts[start:start + cfg.batch_size], max_new_tokens, temperature, top_p,
                        eos_ids=() if uniform else STOP_IDS, generator=gen, return_logprobs=False)
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
    if style == "completion":  # the item's text continued as it is (HumanEval); a shot is its text + its solution
        return tok.encode("".join(f"{_question(s)}{_solution(s)}\n\n" for s in shots) + _question(item))
    if style == "chat":
        messages = []
        for s in shots:
            messages += [{"role": "user", "content": _question(s)}, {"role": "assistant", "content": _solution(s)}]
        own = [m for m in item.get("messages", []) if m["role"] != "assistant"] or \
            [{"role": "user", "content": item["question"]}]
        return tok.apply_chat_template(messages + own, add_generation_prompt=True)
    text = "".join(f"Question: {_question(s)}\nAnswer: {_solution(s)}\n\n" for s in shots)
    return tok.encode(text + f"Question: {_question(item)}\nAnswer:")


def grade_completions(items: list[dict], rows: list[tuple[int, int]], texts: list[str]) -> list[bool]:
    """Whether each completion (rows[j] = (item index, sample)) is right, by its item's oracle: math (answer match),
    alias (exact match with any alias, TriviaQA), code (the item's tests in the sandbox; with `code_prefix`, the
    program is the prefix + the completion cut at the next top-level statement, HumanEval)."""
    correct = [False] * len(rows)
    oracle = [items[n].get("oracle", "math") for n, _ in rows]
    code = [j for j, (n, _) in enumerate(rows) if oracle[j] == "code" and not items[n].get("uncheckable")]
    fenced = [j for j in code if "code_prefix" not in items[rows[j][0]]]
    for j, ok in zip(fenced, check_code_many([texts[j] for j in fenced], [items[rows[j][0]]["tests"] for j in fenced])):
        correct[j] = ok
    prefixed = [j for j in code if "code_prefix" in items[rows[j][0]]]
    programs = [(items[rows[j][0]]["code_prefix"] + cut_completion(texts[j]), items[rows[j][0]]["tests"])
                for j in prefixed]
    for j, result in zip(prefixed, run_python_many(programs) if programs else []):
        correct[j] = result.passed
    for j, (n, _) in enumerate(rows):
        if oracle[j] == "alias":
            correct[j] = check_alias(texts[j], items[n]["aliases"])
        elif oracle[j] != "code":
            correct[j] = check_answer(texts[j], str(items[n]["answer"]))
    return correct


def eval_generative(model, tok, task: GenerativeTask, cfg: EvalConfig, device,
                    shard: tuple[int, int] = (0, 1)) -> dict:
    shots, items = _shots_and_items(task, ("answer",))
    indices = shard_indices(len(items), shard)
    prompts = {n: generative_prompt(tok, items[n], shots, task.prompt) for n in indices}
    rows = [(n, s) for n in indices for s in range(task.num_samples)]  # (item index, sample), the samples' order
    texts = generate_texts(model, tok, [prompts[n] for n, _ in rows], task.max_new_tokens, task.temperature,
                           task.top_p, cfg, device, generators=row_generators(cfg.seed, task.name, rows, device))
    if task.prompt == "plain":  # a base model continues with the next few-shot block: keep the first answer only
        texts = [t.split("\nQuestion:")[0] for t in texts]
    correct = grade_completions(items, rows, texts)
    samples = [{"index": n, "id": items[n].get("id"), "sample": s, "oracle": items[n].get("oracle", "math"),
                "answer": items[n]["answer"], "completion": texts[j], "extracted": extract_answer(texts[j]),
                "correct": correct[j], **({"uncheckable": True} if items[n].get("uncheckable") else {})}
               for j, (n, s) in enumerate(rows)]
    return {"task": task.name, "kind": "generative", "metrics": gen_metrics(task, samples), "samples": samples}


def gen_metrics(task: GenerativeTask, samples: list[dict]) -> dict:
    """The task's metrics from its per-completion samples alone (one process, or the merge of array shards)."""
    n = max(len(samples), 1)
    metrics = {"accuracy": sum(s["correct"] for s in samples) / n, "items": len({s["index"] for s in samples}),
               "k_shot": task.k_shot, "samples_per_item": task.num_samples, "temperature": task.temperature,
               "answer_found": sum(s["extracted"] is not None for s in samples) / n}
    uncheckable = {s["index"] for s in samples if s.get("uncheckable")}
    if uncheckable:  # scored as not passed: the accuracy is a lower bound
        metrics["items_uncheckable"] = len(uncheckable)
    for oracle in sorted({s["oracle"] for s in samples}):
        hits = [s["correct"] for s in samples if s["oracle"] == oracle]
        metrics[f"accuracy_{oracle}"] = sum(hits) / len(hits)
    return metrics
