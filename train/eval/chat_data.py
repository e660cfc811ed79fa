"""Readers of the files OpenAI simple-evals downloads (openaipublic.blob.core.windows.net/simple-evals/ and
human-eval's data file), from a local path, into chat-task items; and the per-item user prompts built from them.

A task's `path` is the file itself or a directory holding it under its published name (FILES). Items are drawn as
simple-evals draws them: with `limit`, the same seeded random subset (random.Random(0), DROP's Random(42); MGSM: the
first `limit` of each language); GPQA's choice order per repeat from one Random(0) after that draw; DROP's three
train shots per question from a fresh Random(42), question after question in order.
CSV cells are read as text (simple-evals' pandas would turn an all-numeric column into numbers: no MMLU, GPQA, MATH or
SimpleQA column the evals format is one).
"""
from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

from data.benchmarks import BenchmarkError, humaneval_tests
from data.verify.checks import UncheckableTests, parse_tests
from train.eval.chat_prompts import (DROP_INTRO, DROP_TASK_TAIL, HUMANEVAL_INSTRUCTION, MATH_TEMPLATE,
                                     MGSM_INSTRUCTIONS, MULTICHOICE_TEMPLATE)

# benchmark -> its published file names (the first found is read) and the columns the eval reads
FILES = {"mmlu": ("mmlu.csv",), "gpqa": ("gpqa_diamond.csv",), "math": ("math_500_test.csv", "math_test.csv"),
         "humaneval": ("HumanEval.jsonl.gz", "HumanEval.jsonl"), "simpleqa": ("simple_qa_test_set.csv",),
         "drop": ("drop_v0_dev.jsonl.gz",), "mgsm": ("mgsm_<lang>.tsv",)}
DROP_TRAIN = "drop_v0_train.jsonl.gz"
COLUMNS = {"mmlu": ("Question", "A", "B", "C", "D", "Answer", "Subject"),
           "gpqa": ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
           "math": ("Question", "Answer"),  # simple-evals formats {Question}; "Problem" is read where it is named so
           "humaneval": ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
           "simpleqa": ("metadata", "problem", "answer"),
           "drop": ("context", "completion", "ref_text"),
           "mgsm": ("<question>\\t<integer answer>, no header",)}


def expected(benchmark: str) -> str:
    files = " or ".join(FILES[benchmark]) + (f" with {DROP_TRAIN} beside it" if benchmark == "drop" else "")
    return f"{files} (simple-evals' published file) with columns {', '.join(COLUMNS[benchmark])}"


def find_file(benchmark: str, path: str | Path, key: str = "") -> Path:
    """The benchmark's file: `path` itself, or its published name inside the directory `path`."""
    p = Path(path)
    if p.is_file():
        return p
    where = f"{key}: " if key else ""
    if p.is_dir():
        for name in FILES[benchmark]:
            if (p / name).is_file():
                return p / name
        raise BenchmarkError(f"{where}{p}: no {' or '.join(FILES[benchmark])} in this directory; expected "
                             f"{expected(benchmark)}")
    raise BenchmarkError(f"{where}{p} does not exist; expected {expected(benchmark)}")


def _csv_rows(file: Path, columns: tuple[str, ...], alias: dict | None = None) -> list[dict]:
    with open(file, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        published = list(reader.fieldnames or [])
        header = list(published)
        for want, other in (alias or {}).items():  # e.g. MATH's Problem read as Question
            if want not in header and other in header:
                header[header.index(other)] = want
                reader.fieldnames = header
        missing = [c for c in columns if c not in header]
        if missing:
            raise BenchmarkError(f"{file}: the header lacks {missing}; got {published}, expected columns "
                                 f"{', '.join(columns)}")
        return list(reader)


def _jsonl_rows(file: Path, columns: tuple[str, ...]) -> list[dict]:
    rows = []
    try:
        with (gzip.open(file, "rt", encoding="utf-8") if file.suffix == ".gz" else open(file, encoding="utf-8")) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
                missing = [c for c in columns if c not in row]
                if missing:
                    raise BenchmarkError(f"{file}:{lineno}: the row lacks {missing}; expected {', '.join(columns)}")
                rows.append(row)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise BenchmarkError(f"{file}: not a readable {'gzip ' if file.suffix == '.gz' else ''}file ({e})") from None
    return rows


def _mgsm_rows(directory: Path, lang: str, key: str) -> list[dict]:
    file = directory / f"mgsm_{lang}.tsv"
    if not file.is_file():
        raise BenchmarkError(f"{key}: {file} does not exist; expected mgsm_<lang>.tsv for every language of "
                             f"`languages` in {directory}, lines <question>\\t<integer answer>")
    rows = []
    for lineno, raw in enumerate(file.read_bytes().splitlines(), 1):
        line = raw.decode("utf-8").strip()
        parts = line.split("\t")
        if len(parts) != 2 or "." in parts[1]:
            raise BenchmarkError(f"{file}:{lineno}: expected <question>\\t<integer answer>; got {line[:80]!r}")
        rows.append({"inputs": parts[0], "targets": parts[1], "lang": lang})
    return rows


def load_chat_items(task, key: str = "") -> list[dict]:
    """The task's items in simple-evals' order (its `limit` subset drawn as simple-evals draws it)."""
    b, key = task.benchmark, key or f"chat ({task.name})"
    if b == "mgsm":
        p = Path(task.path)
        directory = p.parent if p.is_file() else p
        if not directory.is_dir():
            raise BenchmarkError(f"{key}: {p} does not exist; expected a directory of mgsm_<lang>.tsv files")
        items = []
        for lang in task.languages:
            rows = _mgsm_rows(directory, lang, key)
            items += rows[:task.limit] if task.limit else rows
        return items
    file = find_file(b, task.path, key)
    if b in ("humaneval", "drop"):
        rows = _jsonl_rows(file, COLUMNS[b])
    else:
        rows = _csv_rows(file, COLUMNS[b], {"Question": "Problem"} if b == "math" else None)
    if b == "drop":
        train_file = file.parent / DROP_TRAIN
        if not train_file.is_file():
            raise BenchmarkError(f"{key}: {train_file} does not exist; DROP's shots come from it (expected "
                                 f"{expected('drop')})")
        train = _jsonl_rows(train_file, COLUMNS["drop"])
        if len(train) < task.drop_shots:
            raise BenchmarkError(f"{train_file}: {len(train)} rows, fewer than drop_shots={task.drop_shots}")
        items = random.Random(42).sample(rows, task.limit) if task.limit else rows
        rng = random.Random(42)  # DropEval.__call__'s, drawn once per question in order
        return [{**row, "shots": rng.sample(train, task.drop_shots)} for row in items]
    rng = random.Random(0)
    if task.limit and task.limit < len(rows):
        rows = rng.sample(rows, task.limit)
    if b == "gpqa":  # examples * n_repeats, each with rng.sample(range(4), 4) in that order
        perms = [rng.sample(range(4), 4) for _ in range(task.num_samples * len(rows))]
        return [{**row, "permutations": [perms[r * len(rows) + n] for r in range(task.num_samples)]}
                for n, row in enumerate(rows)]
    if b == "humaneval":
        for row in rows:
            row["tests"] = humaneval_tests(row["test"], row["entry_point"])
            try:
                parse_tests(row["tests"])
            except UncheckableTests as e:
                row["uncheckable"] = str(e)
    return rows


def gpqa_choices(item: dict, sample: int) -> tuple[dict, str]:
    """(the format fields Question, A-D of repeat `sample`, the correct letter), as GPQAEval orders them."""
    choices = [item["Correct Answer"], item["Incorrect Answer 1"], item["Incorrect Answer 2"],
               item["Incorrect Answer 3"]]
    choices = [choices[i] for i in item["permutations"][sample]]
    letter = "ABCD"[choices.index(item["Correct Answer"])]
    return {"Question": item["Question"], **dict(zip("ABCD", choices))}, letter


def drop_prompt(item: dict) -> str:
    """DropEval's user message: the intro, the shots (context + completion), then the question and the tail."""
    text = DROP_INTRO + "\n\n# Examples"
    for shot in item["shots"]:
        text += f"\n---\n{shot['context']} " + shot["completion"] + "\n"
    return text + "\n# Your Task\n" + f"\n---\n{item['context']} " + DROP_TASK_TAIL


def user_prompt(benchmark: str, item: dict, sample: int) -> str:
    """The user message simple-evals sends for this item (and repeat: GPQA's choice order changes with it)."""
    if benchmark == "mmlu":
        return MULTICHOICE_TEMPLATE.format(**{k: item[k] for k in ("Question", "A", "B", "C", "D")})
    if benchmark == "gpqa":
        return MULTICHOICE_TEMPLATE.format(**gpqa_choices(item, sample)[0])
    if benchmark == "math":
        return MATH_TEMPLATE.format(Question=item["Question"])
    if benchmark == "humaneval":
        return HUMANEVAL_INSTRUCTION + item["prompt"]
    if benchmark == "mgsm":
        return MGSM_INSTRUCTIONS[item["lang"]].format(input=item["inputs"])
    if benchmark == "simpleqa":
        return item["problem"]
    if benchmark == "drop":
        return drop_prompt(item)
    raise ValueError(f"benchmark {benchmark!r}")


def reference(benchmark: str, item: dict, sample: int):
    """What a completion is graded against: a letter, an answer text, DROP's answers split on '|', or '' (code)."""
    if benchmark == "mmlu":
        return item["Answer"]
    if benchmark == "gpqa":
        return gpqa_choices(item, sample)[1]
    if benchmark == "math":
        return item["Answer"]
    if benchmark == "mgsm":
        return item["targets"]
    if benchmark == "simpleqa":
        return item["answer"]
    if benchmark == "drop":
        return item["ref_text"].split("|")
    return ""
