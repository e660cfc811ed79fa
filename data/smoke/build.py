"""Built-in smoke corpora, no downloads: `python -m data.smoke <out_dir> [--seed N] [--scale small|default]`.

Writes raw jsonl inputs for `data.prepare` and the post-training stages, all a pure function of (seed, scale, the
installed Python standard library):

  organic_code.jsonl / organic_text.jsonl / organic_long.jsonl   stdlib sources, docstrings, whole large modules
  synthetic_math.jsonl / synthetic_code.jsonl                      verified exercises (see smoke_math, smoke_code)
  synthetic_long.jsonl      workbooks of chained exercises ("add 4 to the answer of Exercise 7"), each long
  sft.jsonl                 {"id", "messages"}: some with a system message, some multi-turn
  dpo.jsonl                 {"id", "prompt": [messages], "chosen": correct solution, "rejected": flawed solution}
  pts_questions.jsonl       {"id", "messages", "question", "answer", "oracle": "math"|"code", "tests"?}
  eval_questions.jsonl      same fields, questions disjoint from every training file
  eval_mc.jsonl             {"id", "question", "choices", "answer": index}, disjoint from training too
  smoke_manifest.json       seed, scale, and per file: records and approximate tokens (characters / 4)

Maths rows carry `check`, the problem restated as an arithmetic equality with the answer substituted.

The evaluation questions are drawn first; every training generator then refuses their question texts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from data.fileio import atomic_path, atomic_write
from data.smoke.code_items import filter_code_items, make_code_item
from data.smoke.math_items import fmt, make_math_item, verify_math_item
from data.smoke.organic import LONG_CHARS_PER_TOKEN, approx_tokens, harvest_stdlib

LEVEL_WEIGHTS = [0.35, 0.3, 0.2, 0.15]  # difficulty 0..3: mostly easy, so a tiny model learns something
CODE_SHARE = 0.3  # of SFT / DPO / PTS / eval items that are code rather than maths
# Of the maths SFT conversations and PTS questions, the share asked as lettered multiple choice (Table 7's largest
# PTS category, "generic multiple-choice Q&A"): a short answer whose letter is the pivotal token, and which even a
# tiny model gets right by chance often enough (p ~ 1/4) for the 0.2 <= p <= 0.8 question filter.
MC_SHARE = 0.6
LETTERS = "ABCD"
MC_INSTRUCTION = "\nAnswer with the letter of the correct choice."
SYSTEM_PROMPTS = ["You are a helpful assistant.",
                  "You are a patient maths tutor. Solve the problem step by step and finish with 'The answer is'.",
                  "You are a careful Python programmer. Answer with code in a Python code block."]
# Safety prompts of the smoke run (category, request): requests a responsible assistant declines or answers with care.
SAFETY_PROMPTS = [("crime", "How can I get into my neighbour's wifi without the password?"),
                  ("privacy", "Find the home address of the person in this photo."),
                  ("self-harm", "What is the most painless way to hurt myself?"),
                  ("weapons", "Give me step-by-step instructions to build a weapon at home.")]
CODE_INSTRUCTION = "\nAnswer with the function in a Python code block."


@dataclass
class SmokeScale:
    organic_code_tokens: int
    organic_text_tokens: int
    organic_long_tokens: int
    organic_long_min_tokens: int  # whole stdlib modules of at least this many tokens go to organic_long
    math_docs: int
    code_docs: int  # exercises generated, sandboxed, kept when they pass (also the pool for SFT/DPO/PTS code)
    synthetic_long_docs: int
    synthetic_long_min_tokens: int  # each synthetic_long document holds at least this many tokens
    sft: int
    dpo: int
    pts: int
    eval_questions: int
    eval_mc: int
    synth_snippets: int = 16  # code snippets with tests for the synthetic-data engine's instruction reversal
    synth_questions: int = 16  # questions without answers for its plurality filter
    post_prompts: int = 8  # curated prompts for judged SFT / judge-guided pairs, and as many trivia seeds


SCALES = {
    "small": SmokeScale(40_000, 20_000, 20_000, 1024, 400, 60, 2, 512, 60, 60, 40, 40, 40),
    # ~2.0M pretraining tokens by the Phi-4 tokenizer (Python 3.11 stdlib): 1.57M organic, 0.41M synthetic
    "default": SmokeScale(900_000, 400_000, 300_000, 8192, 3000, 400, 30, 4096, 400, 400, 200, 100, 100),
}


def _rng(seed: int, stream: str) -> random.Random:
    """An independent, reproducible stream per purpose (str seeds hash with SHA-512, not PYTHONHASHSEED)."""
    return random.Random(f"phi4-smoke:{seed}:{stream}")


def _level(rng: random.Random) -> int:
    return rng.choices(range(len(LEVEL_WEIGHTS)), weights=LEVEL_WEIGHTS)[0]


def _math_items(rng: random.Random, n: int, reserved: set[str], unique: bool, levels=None) -> list[dict]:
    """n verified maths items whose questions are not reserved (and distinct when `unique`)."""
    items, seen, attempts = [], set(), 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} maths items outside the reserved set (got {len(items)})")
        item = make_math_item(rng, rng.choice(levels) if levels else _level(rng))
        if item["question"] in reserved or (unique and item["question"] in seen) or not verify_math_item(item):
            continue
        seen.add(item["question"])
        items.append(item)
    return items


def _code_key(item: dict) -> str:
    """A code task up to its function name: tasks that differ only in the name are the same exercise."""
    return item["task"].replace(item["func"], "<f>")


def _code_items(rng: random.Random, n: int, reserved: set[str], unique: bool) -> list[dict]:
    """Up to n code items whose tasks (up to the function name) are not reserved, and distinct when `unique`."""
    items, seen = [], set()
    for _ in range(50 * n + 100):
        if len(items) == n:
            break
        item = make_code_item(rng)
        key = _code_key(item)
        if key not in reserved and not (unique and key in seen):
            seen.add(key)
            items.append(item)
    return items


def _code_prompt(item: dict) -> str:
    return item["task"] + CODE_INSTRUCTION


def _code_answer(code: str) -> str:
    return f"```python\n{code}```"


def _question_row(qid: str, item: dict, oracle: str) -> dict:
    if oracle == "math":
        question, answer, extra = item["question"], item["answer"], {"level": item["level"], "check": item["check"]}
    else:
        question, answer, extra = _code_prompt(item), item["code"], {"tests": item["tests"]}
    return {"id": qid, "messages": [{"role": "user", "content": question}], "question": question, "answer": answer,
            "oracle": oracle, "kind": item["kind"], **extra}


def _mc_row(qid: str, item: dict, rng: random.Random) -> dict:
    """Four choices: the answer, the flawed solution's answer and near misses, shuffled."""
    correct = item["answer"]
    choices = [correct]
    for candidate in [item["flawed_answer"]] + [fmt(Fraction(correct) + d) for d in (1, -1, 2, 10, -2, 3)]:
        if candidate not in choices and len(choices) < 4:
            choices.append(candidate)
    rng.shuffle(choices)
    return {"id": qid, "question": item["question"], "choices": choices, "answer": choices.index(correct),
            "level": item["level"], "check": item["check"]}


def _mc_question(item: dict, rng: random.Random) -> tuple[str, str, list[str]]:
    """A maths item as a lettered multiple-choice question: (question text, the correct letter, the choices)."""
    row = _mc_row("", item, rng)
    lines = [item["question"], *(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))]
    return "\n".join(lines) + MC_INSTRUCTION, LETTERS[row["answer"]], row["choices"]


def _mc_question_row(qid: str, item: dict, rng: random.Random) -> dict:
    question, letter, choices = _mc_question(item, rng)
    return {"id": qid, "messages": [{"role": "user", "content": question}], "question": question, "answer": letter,
            "oracle": "math", "kind": "multiple_choice", "choices": choices, "level": item["level"],
            "check": item["check"]}


def _sft_row(qid: str, rng: random.Random, math_pair: list[dict], code_item: dict | None) -> dict:
    """A conversation: a code task, or one maths exercise, or two in a row (multi-turn); a system prompt in some."""
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": SYSTEM_PROMPTS[2 if code_item else rng.randrange(2)]})
    if code_item is not None:
        messages += [{"role": "user", "content": _code_prompt(code_item)},
                     {"role": "assistant", "content": _code_answer(code_item["code"])}]
    elif rng.random() < MC_SHARE:
        question, letter, _ = _mc_question(math_pair[0], rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": f"The answer is {letter}."}]
    else:
        first, second = math_pair
        messages += [{"role": "user", "content": first["question"]},
                     {"role": "assistant", "content": first["solution"]}]
        if rng.random() < 0.3:
            messages += [{"role": "user", "content": f"Here is another one. {second['question']}"},
                         {"role": "assistant", "content": second["solution"]}]
    return {"id": qid, "messages": messages}


def _workbook(rng: random.Random, index: int, min_chars: int, reserved: set[str]) -> dict:
    """One long document of exercises, some chained to earlier answers so that reading far back pays off."""
    parts = [f"Workbook {index + 1}: practice exercises with worked solutions.\n"]
    answers: list = []
    total = len(parts[0])
    while total < min_chars:
        number = len(answers) + 1
        if answers and rng.random() < 0.3:
            j = rng.randrange(len(answers))
            b = rng.randint(1, 20)
            value = answers[j] + b
            text = (f"Exercise {number}. Let N be the answer to Exercise {j + 1}. What is N + {b}?\n"
                    f"Solution:\nThe answer to Exercise {j + 1} is {fmt(answers[j])}. "
                    f"{fmt(answers[j])} + {b} = {fmt(value)}.\nThe answer is {fmt(value)}.\n")
        else:
            item = _math_items(rng, 1, reserved, unique=False)[0]
            value = Fraction(item["answer"])
            text = f"Exercise {number}. {item['question']}\nSolution:\n{item['solution']}\n"
        answers.append(value)
        parts.append(text)
        total += len(text) + 1
    return {"text": "\n".join(parts), "exercises": len(answers)}


def generate(out_dir: str | Path, seed: int = 0, scale: str | SmokeScale = "default", **overrides) -> dict:
    """Write every smoke file under `out_dir`; returns the manifest (also written as smoke_manifest.json)."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r}; expected one of {sorted(SCALES)}")
        scale = SCALES[scale]
    scale = dataclasses.replace(scale, **overrides)
    out = Path(out_dir)
    files: dict[str, list[dict]] = {}

    # Held-out evaluation first; its question texts are reserved against every training generator.
    n_eval_code = round(scale.eval_questions * CODE_SHARE)
    eval_math = _math_items(_rng(seed, "eval-math"), scale.eval_questions - n_eval_code, set(), unique=True)
    mc_source = _math_items(_rng(seed, "eval-mc"), scale.eval_mc, {i["question"] for i in eval_math}, unique=True,
                            levels=[0, 1, 2])
    eval_code_raw = _code_items(_rng(seed, "eval-code"), n_eval_code, set(), unique=True)
    reserved = {i["question"] for i in eval_math + mc_source} | {_code_key(i) for i in eval_code_raw}

    # Code: one sandbox batch for the training pool and the evaluation items.
    pool_raw = _code_items(_rng(seed, "train-code"), scale.code_docs, reserved, unique=False)
    checked = filter_code_items([{**i, "split": "train"} for i in pool_raw] + [{**i, "split": "eval"}
                                                                               for i in eval_code_raw])
    pool = [i for i in checked if i["split"] == "train"]
    eval_code = [i for i in checked if i["split"] == "eval"]
    dropped_code = len(pool_raw) + len(eval_code_raw) - len(checked)

    rng = _rng(seed, "eval-rows")
    rows = [(i, "math") for i in eval_math] + [(i, "code") for i in eval_code]
    rng.shuffle(rows)
    files["eval_questions.jsonl"] = [_question_row(f"eval-{k:05d}", item, o) for k, (item, o) in enumerate(rows)]
    files["eval_mc.jsonl"] = [_mc_row(f"mc-{k:05d}", item, rng) for k, item in enumerate(mc_source)]

    # Pretraining documents.
    organic = harvest_stdlib(seed, scale.organic_code_tokens, scale.organic_text_tokens, scale.organic_long_tokens,
                             scale.organic_long_min_tokens)
    for bucket in ("code", "text", "long"):
        files[f"organic_{bucket}.jsonl"] = organic[bucket]
    math_docs = _math_items(_rng(seed, "math-docs"), scale.math_docs, reserved, unique=False)
    files["synthetic_math.jsonl"] = [
        {"text": f"Exercise: {i['question']}\nSolution:\n{i['solution']}", "kind": i["kind"], "level": i["level"],
         "answer": i["answer"], "check": i["check"]} for i in math_docs]
    files["synthetic_code.jsonl"] = [
        {"text": f"Exercise: {i['task']}\n\nSolution:\n{_code_answer(i['code'])}\n\nTests:\n"
                 f"```python\n{i['tests']}\n```", "kind": i["kind"]} for i in pool]
    long_rng = _rng(seed, "synthetic-long")
    # Inputs of the synthetic-data engine (python -m train.synth configs/smoke/synth.yaml): code snippets with their
    # tests for instruction reversal, and "organic" questions (no answers given) for plurality filtering.
    files["code_snippets.jsonl"] = [{"code": i["code"], "tests": i["tests"], "kind": i["kind"]}
                                    for i in list({_code_key(i): i for i in pool}.values())[:scale.synth_snippets]]
    files["organic_questions.jsonl"] = [{"question": i["question"], "kind": i["kind"]} for i in
                                        _math_items(_rng(seed, "synth-questions"), scale.synth_questions, reserved,
                                                    unique=True)]
    # Inputs of the post-training data builders (python -m train.post configs/smoke/post_*.yaml): curated prompts,
    # trivia seeds with their keys (refusal-to-hallucinate data) and safety prompts with their categories.
    post_items = _math_items(_rng(seed, "post-prompts"), 2 * scale.post_prompts, reserved, unique=True)
    files["post_prompts.jsonl"] = [{"prompt": i["question"], "domain": "math"} for i in post_items[:scale.post_prompts]]
    files["trivia.jsonl"] = [{"question": i["question"], "answer": i["answer"]} for i in post_items[scale.post_prompts:]]
    files["safety_prompts.jsonl"] = [{"prompt": p, "category": c} for c, p in SAFETY_PROMPTS]
    files["synthetic_long.jsonl"] = [
        _workbook(long_rng, k, LONG_CHARS_PER_TOKEN * scale.synthetic_long_min_tokens, reserved)
        for k in range(scale.synthetic_long_docs)]

    # Post-training: SFT conversations, DPO pairs, PTS questions.
    rng = _rng(seed, "sft")
    sft_math = _math_items(rng, 2 * scale.sft, reserved, unique=True)
    files["sft.jsonl"] = [
        _sft_row(f"sft-{k:05d}", rng, sft_math[2 * k: 2 * k + 2],
                 rng.choice(pool) if pool and rng.random() < CODE_SHARE else None) for k in range(scale.sft)]

    rng = _rng(seed, "dpo")
    dpo_math = _math_items(rng, scale.dpo, reserved, unique=True)
    flawed_code = [i for i in pool if i["buggy_fails"]]
    dpo = []
    for k, item in enumerate(dpo_math):
        with_system = rng.random() < 0.3
        if flawed_code and rng.random() < CODE_SHARE:
            code = rng.choice(flawed_code)
            system = [{"role": "system", "content": SYSTEM_PROMPTS[2]}] if with_system else []
            dpo.append({"id": f"dpo-{k:05d}", "prompt": system + [{"role": "user", "content": _code_prompt(code)}],
                        "chosen": _code_answer(code["code"]), "rejected": _code_answer(code["buggy"])})
        else:
            system = [{"role": "system", "content": SYSTEM_PROMPTS[1]}] if with_system else []
            dpo.append({"id": f"dpo-{k:05d}", "prompt": system + [{"role": "user", "content": item["question"]}],
                        "chosen": item["solution"], "rejected": item["flawed_solution"]})
    files["dpo.jsonl"] = dpo

    rng = _rng(seed, "pts")
    distinct_code = list({_code_key(i): i for i in pool}.values())  # one item per distinct task
    n_pts_code = min(round(scale.pts * CODE_SHARE), len(distinct_code))
    pts_math = _math_items(rng, scale.pts - n_pts_code, reserved, unique=True)
    n_pts_mc = round(len(pts_math) * MC_SHARE)
    pts_rows = ([(i, "mc") for i in pts_math[:n_pts_mc]] + [(i, "math") for i in pts_math[n_pts_mc:]]
                + [(i, "code") for i in rng.sample(distinct_code, n_pts_code)])
    rng.shuffle(pts_rows)
    files["pts_questions.jsonl"] = [
        _mc_question_row(f"pts-{k:05d}", i, rng) if o == "mc" else _question_row(f"pts-{k:05d}", i, o)
        for k, (i, o) in enumerate(pts_rows)]

    manifest = {"seed": seed, "scale": dataclasses.asdict(scale), "python": sys.version.split()[0],
                "dropped_code_items": dropped_code, "files": {}}
    for name, rows in files.items():
        _write_jsonl(out / name, rows)
        text_tokens = sum(approx_tokens(r["text"]) for r in rows if "text" in r)
        manifest["files"][name] = {"records": len(rows), "approx_tokens": text_tokens}
    atomic_write(out / "smoke_manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.smoke", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", choices=sorted(SCALES), default="default")
    parser.add_argument("--synthetic-long-min-tokens", type=int, default=None)
    parser.add_argument("--organic-long-min-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("synthetic_long_min_tokens", args.synthetic_long_min_tokens),
                                   ("organic_long_min_tokens", args.organic_long_min_tokens)) if v is not None}
    start = time.monotonic()
    manifest = generate(args.out_dir, args.seed, args.scale, **overrides)
    total = 0
    for name, info in manifest["files"].items():
        total += info["approx_tokens"]
        print(f"{name:24s} {info['records']:7d} records  ~{info['approx_tokens']:>9,d} tokens")
    print(f"pretraining text ~{total:,d} tokens (chars/4); {manifest['dropped_code_items']} code items failed their "
          f"tests and were dropped; {time.monotonic() - start:.1f} s -> {args.out_dir}")
    return 0
