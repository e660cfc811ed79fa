"""Pivotal Token Search: single-token DPO pairs at the tokens that swing p(success).

`python -m train.pts <config.yaml> [key=value ...]`. For each question: sample `rollouts` completions from the model,
p(success) = the fraction the oracle accepts (answer match for maths/QA, unit tests in the sandbox for code); keep the
question when p_low <= p <= p_high; search one sampled solution (the `solution` setting) for pivotal tokens; emit each
as a pair prompt = chat-formatted question + solution prefix (token ids), chosen / rejected = one token each, drawn
from the rollouts already sampled from that prefix (footnote 7). Output jsonl rows
`{"question_id", "prompt_ids", "chosen_ids", "rejected_ids", "position", "p_before", "p_after"}`, appended and
fsynced per question; `<output stem>.state.jsonl` lists finished questions (resume skips them),
`<output stem>.summary.json` holds the counts.
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import torch

from data.arrays import split_array_flags
from data.fileio import atomic_path, atomic_write, read_jsonl
from data.synth.backend import ServerUnavailable
from train.config import ConfigError, load_config, to_dict, to_yaml
from train.pts.config import PTSConfig
from train.pts.search import QuestionResult, search_question

def read_questions(path: str | os.PathLike) -> list[dict]:
    """Question rows, validated; errors name the file and line."""
    from data.tokenizer import validate_messages

    rows, ids = [], set()
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "id" not in row:
            raise ValueError(f"{where}: expected an object with an 'id'")
        row["id"] = str(row["id"])
        if row["id"] in ids:
            raise ValueError(f"{where}: duplicate question id {row['id']!r}")
        ids.add(row["id"])
        if "messages" not in row:
            if not isinstance(row.get("question"), str):
                raise ValueError(f"{where}: needs 'messages' (chat list) or 'question' (str)")
            row["messages"] = [{"role": "user", "content": row["question"]}]
        try:
            validate_messages(row["messages"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if row["messages"][-1]["role"] != "user":
            raise ValueError(f"{where}: the last message must be the user's question")
        oracle = row.get("oracle")
        need = {"math": "answer", "code": "tests"}.get(oracle)
        if need is None:
            raise ValueError(f"{where}: oracle={oracle!r}; expected 'math' or 'code'")
        if not isinstance(row.get(need), (str, int, float)) or (need == "tests" and not isinstance(row[need], str)):
            raise ValueError(f"{where}: oracle {oracle!r} needs '{need}'")
        rows.append(row)
    return rows


def sidecar(output: str | os.PathLike, suffix: str) -> Path:
    return Path(output).with_suffix(suffix)


def load_done(state_path: Path) -> dict[str, dict]:
    """Finished questions from the state file. A half-written last line (an interrupted write) is dropped and the
    file rewritten without it, so the next record does not get glued onto it."""
    done, lines = {}, []
    if state_path.is_file():
        lines = state_path.read_text(encoding="utf-8").splitlines(keepends=True)
        for line in lines:
            try:
                record = json.loads(line)
                if line.endswith("\n"):
                    done[record["id"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    if len(done) != len(lines):
        with atomic_path(state_path) as tmp:
            Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
    return done


def clean_output(output: Path, done: dict[str, dict]) -> None:
    """Keep only whole pair lines of finished questions (an interruption can leave a question's pairs without its
    state record, or half a line): rewrite the file atomically when anything must go."""
    if not output.is_file():
        return
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line)["question_id"] in done:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    if len(keep) != len(lines):
        with atomic_path(output) as tmp:
            Path(tmp).write_text("".join(keep), encoding="utf-8")


def check_resume_settings(cfg: PTSConfig) -> None:
    """A resumed run must continue the same search: every setting but max_questions has to match."""
    path = sidecar(cfg.output, ".config.yaml")
    current = {k: v for k, v in to_dict(cfg).items() if k != "max_questions"}
    if path.is_file():
        import yaml

        saved = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "max_questions"}
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"{cfg.output}: resuming with different settings {changed} than {path}; restore them "
                              "or write to a new output")
    atomic_write(path, to_yaml(cfg))


def summarize(done: dict[str, dict], selected: int) -> dict:
    statuses = Counter(r["status"] for r in done.values())
    totals = {k: sum(r.get(k, 0) for r in done.values())
              for k in ("pairs", "pivotal", "no_contrast", "estimates", "rollouts", "generated_tokens")}
    return {"questions_selected": selected, "questions_seen": len(done), "kept": statuses["kept"],
            "dropped_too_easy": statuses["too_easy"], "dropped_too_hard": statuses["too_hard"],
            "skipped_too_long": statuses["too_long"], "pairs_found": totals.pop("pairs"), **totals}


# ---------------------------------------------------------------------------------------------------------------
# The model and the oracle.

def make_judge(item: dict, tokenizer, cfg: PTSConfig):
    """The question's oracle on response token ids, cached per response text."""
    from data.verify.answers import check_answer, check_code_many
    from data.verify.checks import UncheckableTests, parse_tests

    if item["oracle"] == "code":  # tests that cannot be judged outside the sandbox: refuse before sampling
        try:
            parse_tests(item["tests"])
        except UncheckableTests as e:
            raise ValueError(f"question {item['id']}: tests: {e}") from None
    eos, cache = set(cfg.eos_ids), {}

    def judge(responses: list[list[int]]) -> list[bool]:
        texts = [tokenizer.decode(r[:-1] if r and r[-1] in eos else r) for r in responses]
        todo = sorted({t for t in texts if t not in cache})
        if item["oracle"] == "code":
            verdicts = check_code_many(todo, [item["tests"]] * len(todo), cfg.code_timeout_s, cfg.code_memory_mb)
        else:
            verdicts = [check_answer(t, str(item["answer"])) for t in todo]
        cache.update(zip(todo, verdicts))
        return [cache[t] for t in texts]

    return judge


def make_sampler(model, cfg: PTSConfig, generator: torch.Generator):
    from model.generate import generate

    def sample(prompt_ids: list[int], n: int, max_new_tokens: int):
        out = []
        for start in range(0, n, cfg.batch_size):
            out += generate(model, [prompt_ids] * min(cfg.batch_size, n - start), max_new_tokens,
                            cfg.temperature, cfg.top_p, tuple(cfg.eos_ids), generator)
        return out

    return sample


def question_seed(seed: int, qid: str) -> int:
    """Per-question seed: results do not depend on question order, sharding or resumption."""
    return zlib.crc32(f"{seed}:{qid}".encode())


def run(cfg: PTSConfig) -> dict:
    from tqdm import tqdm

    from data.tokenizer import Phi4Tokenizer

    if cfg.sampler == "model" and not Path(cfg.model).exists():
        raise FileNotFoundError(f"model={cfg.model}: no such run, checkpoint or Hugging Face directory")
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.touch(exist_ok=True)  # an empty pairs file when no question yields a pair
    state_path = sidecar(output, ".state.jsonl")
    questions = read_questions(cfg.questions)[cfg.shard_index::cfg.num_shards]
    if cfg.max_questions:
        questions = questions[:cfg.max_questions]
    check_resume_settings(cfg)
    done = load_done(state_path)
    clean_output(output, done)
    todo = [q for q in questions if q["id"] not in done]
    start = time.monotonic()
    generated = 0
    if todo:
        tokenizer = Phi4Tokenizer()
        model, backend_sampler, device = None, None, None
        if cfg.sampler == "backend":  # a serving engine samples; the context limit is the server's to enforce
            from train.pts.sampling import BackendSampler
            from train.synth.backends import make_backend

            backend_sampler = BackendSampler(make_backend(cfg.backend), cfg)
        else:
            from train.checkpoint import load_model
            from train.distributed import DTYPES, resolve_device, resolve_precision

            device = resolve_device(cfg.device)
            model, _ = load_model(cfg.model, device, DTYPES[resolve_precision(cfg.precision, device)])
        bar = tqdm(todo, desc="PTS", unit="question", file=sys.stderr, dynamic_ncols=True)
        with open(output, "a", encoding="utf-8") as out, open(state_path, "a", encoding="utf-8") as state:
            for item in bar:
                prompt_ids = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True)
                seed = question_seed(cfg.seed, item["id"])
                if model is not None and len(prompt_ids) + cfg.max_new_tokens > model.cfg.max_seq_len:
                    result = QuestionResult("too_long", None)
                else:
                    sample = backend_sampler.for_question(seed) if backend_sampler else \
                        make_sampler(model, cfg, torch.Generator(device=device).manual_seed(seed))
                    result = search_question(item["id"], prompt_ids, sample, make_judge(item, tokenizer, cfg), cfg)
                # Pairs first, then the record that marks the question done: a crash between them is cleaned up.
                for pair in result.pairs:
                    out.write(json.dumps(pair) + "\n")
                out.flush()
                os.fsync(out.fileno())
                record = {"id": item["id"], "status": result.status, "p": result.p, "pairs": len(result.pairs),
                          "pivotal": result.pivotal, "no_contrast": result.no_contrast,
                          "estimates": result.estimates, "rollouts": result.rollouts,
                          "generated_tokens": result.generated_tokens}
                state.write(json.dumps(record) + "\n")
                state.flush()
                os.fsync(state.fileno())
                done[item["id"]] = record
                generated += result.generated_tokens
                kept = sum(r["status"] == "kept" for r in done.values())
                bar.set_postfix(kept=kept, pairs=sum(r["pairs"] for r in done.values()))
        if backend_sampler is not None:
            backend_sampler.close()
    wall_s = time.monotonic() - start
    summary = {**summarize(done, len(questions)), "this_run": {
        "questions": len(todo), "wall_s": round(wall_s, 3),
        "generated_tokens_per_s": round(generated / wall_s, 1) if wall_s > 0 else 0.0}, "output": str(output)}
    atomic_write(sidecar(output, ".summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


USAGE = "usage: python -m train.pts <config.yaml> [key=value ...] [--shard I/N | --merge N]"


def shard_output(output: str | os.PathLike, shard: int, num_shards: int) -> Path:
    """Where shard I of N writes its pairs (and its .state.jsonl / .summary.json / .config.yaml beside them)."""
    out = Path(output)
    return out.with_name(f"{out.stem}.shard-{shard:05d}-of-{num_shards:05d}{out.suffix}")


def merge(cfg: PTSConfig, num_shards: int) -> dict:
    """The N shards' pairs in question order into `cfg.output` (what one process writes, pair for pair) and one
    summary; a shard whose summary does not cover all its questions is named and nothing is written."""
    questions = read_questions(cfg.questions)
    if cfg.max_questions:
        raise ValueError("--merge: max_questions must be 0 (a merge covers every question of every shard)")
    pairs_by_question: dict[str, list[str]] = {}
    done: dict[str, dict] = {}
    for i in range(num_shards):
        out = shard_output(cfg.output, i, num_shards)
        summary_path = sidecar(out, ".summary.json")
        expected = len(questions[i::num_shards])
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        if summary.get("questions_seen") != expected:
            raise FileNotFoundError(f"--merge {num_shards}: shard {i} is not complete ({summary_path}: "
                                    f"{summary.get('questions_seen', 0)} of {expected} questions); rerun it")
        done.update(load_done(sidecar(out, ".state.jsonl")))
        for line in out.read_text(encoding="utf-8").splitlines():
            if line.strip():
                pairs_by_question.setdefault(json.loads(line)["question_id"], []).append(line)
    lines = [line for q in questions for line in pairs_by_question.get(q["id"], [])]
    atomic_write(cfg.output, "".join(line + "\n" for line in lines))
    summary = {**summarize(done, len(questions)), "shards": num_shards, "output": str(cfg.output)}
    atomic_write(sidecar(cfg.output, ".summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[1], file=sys.stderr)
        return 0 if argv else 2
    try:
        rest, shard, merge_n = split_array_flags(argv[1:])
        cfg = load_config(argv[0], rest, schema=PTSConfig)
        if merge_n:
            print(json.dumps(merge(cfg, merge_n)), file=sys.stderr)
            return 0
        if shard:  # an array task: question k goes to shard k % N, into its own output
            cfg.shard_index, cfg.num_shards = shard
            cfg.output = str(shard_output(cfg.output, *shard))
        summary = run(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServerUnavailable as e:  # sampler: backend; finished questions are kept, a rerun resumes after them
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(json.dumps({k: v for k, v in summary.items() if k != "this_run"}), file=sys.stderr)
    return 0
