"""Readers for the benchmarks' own published files (the Hugging Face datasets layouts, real column names and splits),
turned into the evaluator's items. A task picks one with `source: <format>` and points `path` at the dataset's
local directory (as `huggingface-cli download <repo> --repo-type dataset --local-dir DIR` leaves it) or at one file.

Where the files of a split are looked for, in this order (parquet first, then jsonl):
  DIR/<split>-*.parquet | DIR/<split>.parquet | DIR/<split>.jsonl      (DIR is one config's directory)
  DIR/data/...                                                        (the layout of a one-config dataset)
  DIR/<config>/...                                                    (the format's default config, e.g. all, main)
  DIR/*/...                                                           (math_hf only: every subject's directory)

source        dataset (default config)                  columns read -> items
mmlu_hf       cais/mmlu (all)                           question, subject, choices, answer (int) -> multiple choice
arc_hf        allenai/ai2_arc (ARC-Challenge)           question, choices {text, label}, answerKey -> multiple choice
gsm8k_hf      openai/gsm8k (main)                       question, answer ('... #### N') -> generative, oracle math
math_hf       hendrycks/competition_math, or EleutherAI/hendrycks_math (a directory per subject)
                                                        problem, solution (\\boxed{}), level, type -> oracle math
triviaqa_hf   mandarjoshi/trivia_qa (rc.nocontext)      question, answer {value, aliases} -> oracle alias
mbpp_hf       google-research-datasets/mbpp (full)      task_id, text, code, test_list -> oracle code
humaneval_hf  openai/openai_humaneval                   task_id, prompt, canonical_solution, test, entry_point
                                                        -> oracle code, completed after the prompt

HumanEval's `test` defines `check(candidate)` with its asserts inside, which the sandbox cannot judge outside itself
(data/verify/checks.py takes top-level asserts only); the reader lifts the body of `check` to the top level after
`candidate = <entry_point>` (the same checks, as `check(<entry_point>)` would run them). A test whose asserts sit in a
loop still cannot be split: the item keeps `uncheckable` (the reason) and is scored as not passed.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from data.verify.answers import extract_answer
from data.verify.checks import UncheckableTests, parse_tests

COLUMNS = {"mmlu_hf": ("question", "subject", "choices", "answer"),
           "arc_hf": ("question", "choices", "answerKey"),
           "gsm8k_hf": ("question", "answer"),
           "math_hf": ("problem", "solution"),
           "triviaqa_hf": ("question", "answer"),
           "mbpp_hf": ("text", "code", "test_list"),
           "humaneval_hf": ("prompt", "canonical_solution", "test", "entry_point")}
DEFAULT_CONFIG = {"mmlu_hf": "all", "arc_hf": "ARC-Challenge", "gsm8k_hf": "main", "math_hf": "",
                  "triviaqa_hf": "rc.nocontext", "mbpp_hf": "full", "humaneval_hf": "openai_humaneval"}
SOURCES = ("jsonl",) + tuple(COLUMNS)  # jsonl = the evaluator's own rows (train/eval/config.py)
MULTIPLE_CHOICE_SOURCES = ("mmlu_hf", "arc_hf")
GENERATIVE_SOURCES = ("gsm8k_hf", "math_hf", "triviaqa_hf", "mbpp_hf", "humaneval_hf")


class BenchmarkError(ValueError):
    """A benchmark file that is missing or does not have the published layout; the message names the file."""


def expected_layout(source: str, path: str | Path, split: str) -> str:
    cols = ", ".join(COLUMNS[source])
    return f"{path}/{split}-*.parquet or {path}/{split}.jsonl with columns {cols}"


def _split_files_in(d: Path, split: str) -> list[Path]:
    return sorted(d.glob(f"{split}-*.parquet")) or sorted(d.glob(f"{split}.parquet")) or \
        sorted(d.glob(f"{split}.jsonl"))


def split_files(source: str, path: str | Path, split: str) -> list[Path]:
    """The files holding `split` of the dataset at `path` (a file is taken as it is, whatever the split)."""
    if source not in COLUMNS:
        raise BenchmarkError(f"source={source!r}; expected one of {list(COLUMNS)}")
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise BenchmarkError(f"{p} does not exist; expected {expected_layout(source, p, split)}")
    files = _split_files_in(p, split) or _split_files_in(p / "data", split)
    config = DEFAULT_CONFIG[source]
    if not files and config and (p / config).is_dir():
        files = _split_files_in(p / config, split)
    if not files and source == "math_hf":  # EleutherAI/hendrycks_math: one directory per subject
        files = [f for d in sorted(x for x in p.iterdir() if x.is_dir()) for f in _split_files_in(d, split)]
    if not files:
        where = f" (or in {p}/{config}/)" if config else " (or in its subject directories)"
        raise BenchmarkError(f"{p}: no file for split {split!r}; expected {expected_layout(source, p, split)}{where}")
    return files


def read_rows(file: Path) -> list[dict]:
    if file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BenchmarkError(f"{file}: reading parquet needs pyarrow (pip install pyarrow), or give the split "
                                 f"as jsonl") from None
        try:
            return pq.read_table(file).to_pylist()
        except Exception as e:  # pyarrow's errors have no common base class worth naming here
            raise BenchmarkError(f"{file}: not a readable parquet file ({e})") from None
    rows = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def load_benchmark(source: str, path: str | Path, split: str = "test") -> list[dict]:
    """The evaluator's items of one split of a benchmark in its published layout."""
    items = []
    for file in split_files(source, path, split):
        for n, row in enumerate(read_rows(file)):  # n: the row in its file; an item's id counts across the files
            missing = [c for c in COLUMNS[source] if c not in row]
            if missing:
                raise BenchmarkError(f"{file}: row {n} lacks {missing}; expected "
                                     f"{expected_layout(source, Path(path), split)}")
            try:
                items.append(CONVERT[source](row, len(items)))
            except (ValueError, KeyError, TypeError) as e:
                raise BenchmarkError(f"{file}: row {n}: {e}") from None
    return items


# ---- conversions ------------------------------------------------------------------------------------------------
def _mmlu(row: dict, n: int) -> dict:
    return {"id": f"{row['subject']}/{n}", "question": row["question"], "choices": list(row["choices"]),
            "answer": int(row["answer"]), "subject": row["subject"]}


def _arc(row: dict, n: int) -> dict:
    labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
    if row["answerKey"] not in labels:
        raise ValueError(f"answerKey {row['answerKey']!r} is not one of the choice labels {labels}")
    return {"id": row.get("id", n), "question": row["question"], "choices": texts,
            "answer": labels.index(row["answerKey"])}


def gsm8k_final(answer: str) -> str:
    """The number after '#### ' in a GSM8K answer, commas dropped ('#### 1,234' -> '1234')."""
    if "####" not in answer:
        raise ValueError("the answer has no '#### N' line")
    return answer.split("####")[-1].strip().replace(",", "")


def _gsm8k(row: dict, n: int) -> dict:
    return {"id": n, "question": row["question"], "answer": gsm8k_final(row["answer"]),
            "solution": row["answer"], "oracle": "math"}


def _math(row: dict, n: int) -> dict:
    answer = extract_answer(row["solution"]) if "\\boxed" in row["solution"] or "\\fbox" in row["solution"] else None
    if answer is None:
        raise ValueError("the solution has no \\boxed{} answer")
    return {"id": n, "question": row["problem"], "answer": answer, "solution": row["solution"], "oracle": "math",
            "level": row.get("level"), "type": row.get("type")}


def _triviaqa(row: dict, n: int) -> dict:
    ans = row["answer"]
    aliases = [ans["value"]] + list(ans.get("aliases") or []) + list(ans.get("normalized_aliases") or [])
    return {"id": row.get("question_id", n), "question": row["question"], "answer": ans["value"],
            "aliases": list(dict.fromkeys(a for a in aliases if a)), "solution": ans["value"], "oracle": "alias"}


def _mbpp(row: dict, n: int) -> dict:
    tests = list(row["test_list"])
    setup = (row.get("test_setup_code") or "").strip()
    question = f"{row['text']} Your code should pass these tests:\n\n" + "\n".join(tests)
    code = row["code"].replace("\r\n", "\n")  # the published code has Windows line ends
    return {"id": row.get("task_id", n), "question": question, "answer": "", "solution": code,
            "tests": (setup + "\n" if setup else "") + "\n".join(tests), "oracle": "code"}


def humaneval_tests(test: str, entry_point: str) -> str:
    """HumanEval's `check(candidate)` suite as top-level statements: `candidate = <entry_point>`, then its body."""
    module = ast.parse(test)
    out = []
    for stmt in module.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "check":
            arg = stmt.args.args[0].arg if stmt.args.args else "candidate"
            out.append(f"{arg} = {entry_point}")
            out += [ast.unparse(s) for s in stmt.body]
        else:
            out.append(ast.unparse(stmt))
    return "\n".join(out) + "\n"


def _humaneval(row: dict, n: int) -> dict:
    if not re.fullmatch(r"[A-Za-z_]\w*", row["entry_point"]):
        raise ValueError(f"entry_point {row['entry_point']!r} is not a Python name")
    item = {"id": row.get("task_id", n), "question": row["prompt"], "code_prefix": row["prompt"], "answer": "",
            "solution": row["canonical_solution"], "tests": humaneval_tests(row["test"], row["entry_point"]),
            "entry_point": row["entry_point"], "oracle": "code"}
    try:
        parse_tests(item["tests"])
    except UncheckableTests as e:
        item["uncheckable"] = str(e)
    return item


CONVERT = {"mmlu_hf": _mmlu, "arc_hf": _arc, "gsm8k_hf": _gsm8k, "math_hf": _math, "triviaqa_hf": _triviaqa,
           "mbpp_hf": _mbpp, "humaneval_hf": _humaneval}


# ---- grading helpers --------------------------------------------------------------------------------------------
def normalize_qa(text: str) -> str:
    """SQuAD/TriviaQA answer normalisation: lowercase, punctuation and articles (a, an, the) dropped, spaces
    collapsed."""
    text = "".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def check_alias(completion: str, aliases: list[str]) -> bool:
    """Exact match of the completion's first line (normalised) against any alias (normalised)."""
    lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
    got = normalize_qa(lines[0]) if lines else ""
    return bool(got) and got in {normalize_qa(a) for a in aliases}


CODE_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # Codex's HumanEval stop sequences (column 0)


def cut_completion(text: str) -> str:
    """A function body completion up to the first line that starts a new top-level statement."""
    cut = min((i for i in (text.find(s) for s in CODE_STOPS) if i >= 0), default=len(text))
    return text[:cut]
