"""Pivotal Token Search (spec section 6): single-token DPO pairs at the tokens that swing p(success).

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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.fileio import atomic_path, atomic_write
from train.config import ConfigError, load_config, to_dict, to_yaml
# The search itself (pure, no model) lives in train/pts_search.py; its names are part of this module's interface.
from train.pts.search import PivotalToken, find_pivotal_tokens, split_point  # noqa: F401

SOLUTION_CHOICES = ("sampled", "success", "failure", "both")


@dataclass
class PTSConfig:
    model: str = ""  # a run dir / checkpoint dir (train.checkpoint) or a Hugging Face directory
    questions: str = ""  # jsonl: {"id", "messages" | "question", "oracle": "math"|"code", "answer", "tests"?}
    output: str = ""  # pairs jsonl; .state.jsonl, .summary.json and .config.yaml are written beside it
    p_gap: float = 0.2  # ASSUMPTION: |delta p| threshold; 0.2 is only the paper's figure highlight
    rollouts: int = 64  # completions per prefix estimate (UNCONFIRMED; the figure used 529 with GPT-4o)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024  # budget of a whole response; a rollout from a prefix of k tokens gets the rest
    max_questions: int = 0  # 0 = every question (of this shard)
    p_low: float = 0.2  # keep questions with p_low <= p(success) <= p_high, measured at the empty prefix
    p_high: float = 0.8
    solution: str = "sampled"  # which rollout is T_full: sampled (the first) | success | failure | both
    seed: int = 1234
    batch_size: int = 64  # rollouts per generate() batch
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eos_ids: list[int] = field(default_factory=lambda: [100265, 100257])  # <|im_end|>, <|endoftext|>
    code_timeout_s: float = 5.0  # sandbox limits of the code oracle, per rollout
    code_memory_mb: int = 512
    num_shards: int = 1  # question k goes to shard k % num_shards (one process per GPU, separate outputs)
    shard_index: int = 0

    def validate(self) -> None:
        checks = [
            (bool(self.model and self.questions and self.output), "model, questions and output must be set"),
            (0 < self.p_gap <= 1, f"p_gap={self.p_gap} must be in (0, 1]"),
            (0 <= self.p_low <= self.p_high <= 1, f"need 0 <= p_low={self.p_low} <= p_high={self.p_high} <= 1"),
            (self.rollouts > 0 and self.batch_size > 0 and self.max_new_tokens > 0,
             "rollouts, batch_size and max_new_tokens must be > 0"),
            (self.temperature >= 0 and 0 < self.top_p <= 1, "need temperature >= 0 and 0 < top_p <= 1"),
            (self.solution in SOLUTION_CHOICES, f"solution={self.solution!r}; expected one of {SOLUTION_CHOICES}"),
            (self.device in ("auto", "cpu", "cuda"), f"device={self.device!r}; expected auto | cpu | cuda"),
            (self.precision in ("auto", "bf16", "fp32"), f"precision={self.precision!r}; expected auto|bf16|fp32"),
            (0 <= self.shard_index < self.num_shards, f"need 0 <= shard_index < num_shards={self.num_shards}"),
            (self.max_questions >= 0, f"max_questions={self.max_questions} must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"pts config: {message}")


# ---------------------------------------------------------------------------------------------------------------
# One question: filter, search, pairs. `sample` and `judge` are the model and the oracle (injected for testing).

@dataclass
class Estimate:
    p: float  # fraction of rollouts the oracle accepted (exact 0/1 for a complete response)
    first_tokens: list[int]  # first new token of each rollout
    successes: list[bool]
    rollouts: list = field(default_factory=list)  # model.generate.Generation of each (empty prefix only)


@dataclass
class QuestionResult:
    status: str  # kept | too_easy | too_hard | too_long
    p: float | None
    pairs: list[dict] = field(default_factory=list)
    pivotal: int = 0  # pivotal tokens found
    no_contrast: int = 0  # pivotal tokens without an opposite token among the prefix's rollouts (no pair)
    estimates: int = 0  # p(success | prefix) evaluations
    rollouts: int = 0
    generated_tokens: int = 0


def classify(p: float, p_low: float, p_high: float) -> str:
    return "too_hard" if p < p_low else "too_easy" if p > p_high else "kept"


def contrast_token(before: Estimate, pivot: PivotalToken) -> int | None:
    """The other side of a pair, from the first tokens of the rollouts sampled at the pivot's prefix: for a token
    that raises p, a first token of failed rollouts whose empirical success rate is below p_before (the lowest rate,
    then the most frequent); for one that lowers p, a successful first token with a rate above p_before."""
    raising = pivot.p_after > pivot.p_before
    counts, wins = Counter(before.first_tokens), Counter()
    for token, ok in zip(before.first_tokens, before.successes):
        wins[token] += ok
    candidates = []
    for token, ok in zip(before.first_tokens, before.successes):
        rate = wins[token] / counts[token]
        if token != pivot.token and ok != raising and (rate < pivot.p_before if raising else rate > pivot.p_before):
            candidates.append((rate if raising else -rate, -counts[token], token))
    return min(candidates)[2] if candidates else None


def search_question(qid: str, prompt_ids: list[int], sample, judge, cfg: PTSConfig) -> QuestionResult:
    """sample(prompt_ids, n, max_new_tokens) -> list[Generation]; judge(responses: list[list[int]]) -> list[bool]
    on whole assistant responses (token ids, eos included when produced)."""
    eos = set(cfg.eos_ids)
    memo: dict[tuple[int, ...], Estimate] = {}
    result = QuestionResult("kept", None)

    def estimate(prefix: tuple[int, ...]) -> Estimate:
        if prefix in memo:
            return memo[prefix]
        budget = cfg.max_new_tokens - len(prefix)
        if budget <= 0 or (prefix and prefix[-1] in eos):  # a complete response: the oracle decides exactly
            est = Estimate(float(judge([list(prefix)])[0]), [], [])
        else:
            gens = sample(list(prompt_ids) + list(prefix), cfg.rollouts, budget)
            ok = judge([list(prefix) + g.tokens for g in gens])
            # Whole rollouts are kept at the root only (T_full is one of them); elsewhere first tokens suffice.
            est = Estimate(sum(ok) / len(ok), [g.tokens[0] for g in gens], list(ok), gens if not prefix else [])
            result.rollouts += len(gens)
            result.generated_tokens += sum(len(g.tokens) for g in gens)
        result.estimates += 1
        memo[prefix] = est
        return est

    root = estimate(())
    result.p = root.p
    result.status = classify(root.p, cfg.p_low, cfg.p_high)
    if result.status != "kept":
        return result
    wanted = {"sampled": [None], "success": [True], "failure": [False], "both": [True, False]}[cfg.solution]
    solutions = []
    for outcome in wanted:  # None: the first rollout, whatever its outcome
        for gen, ok in zip(root.rollouts, root.successes):
            if outcome is None or ok == outcome:
                solutions.append(gen)
                break
    seen = set()
    for gen in solutions:
        pivots = find_pivotal_tokens(gen.tokens, gen.logprobs, lambda pre: estimate(tuple(pre)).p, cfg.p_gap)
        for pivot in pivots:
            prefix = tuple(gen.tokens[:pivot.position])
            if (prefix, pivot.token) in seen:  # both solutions share this prefix: one pair
                continue
            seen.add((prefix, pivot.token))
            result.pivotal += 1
            other = contrast_token(estimate(prefix), pivot)
            if other is None:
                result.no_contrast += 1
                continue
            chosen, rejected = (pivot.token, other) if pivot.p_after > pivot.p_before else (other, pivot.token)
            result.pairs.append({"question_id": qid, "prompt_ids": list(prompt_ids) + list(prefix),
                                 "chosen_ids": [chosen], "rejected_ids": [rejected], "position": pivot.position,
                                 "p_before": pivot.p_before, "p_after": pivot.p_after})
    return result


# ---------------------------------------------------------------------------------------------------------------
# Files: questions in, pairs out, resumable.

def read_questions(path: str | os.PathLike) -> list[dict]:
    """Question rows, validated; errors name the file and line."""
    from data.tokenizer import validate_messages

    rows, ids = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            if not isinstance(row, dict) or "id" not in row:
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

def load_policy(path: str, device: torch.device, dtype: torch.dtype):
    """Our Transformer from a Hugging Face directory, or from a run/checkpoint dir (model config in meta.json)."""
    from model.transformer import Transformer
    from train.checkpoint import consolidated_state_dict, resolve_checkpoint_dir
    from train.config import from_dict

    if (Path(path) / "config.json").is_file():
        from train.export.hf import from_hf

        return from_hf(path, dtype=dtype, device=device).eval()
    tag_dir, meta = resolve_checkpoint_dir(path)
    if "model" not in meta.get("config", {}):
        raise ValueError(f"{tag_dir}/meta.json has no config.model: cannot rebuild the model")
    with torch.device("meta"):
        model = Transformer(from_dict(meta["config"]).model)
    model.load_state_dict(consolidated_state_dict(tag_dir), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def make_judge(item: dict, tokenizer, cfg: PTSConfig):
    """The question's oracle on response token ids, cached per response text."""
    from data.verify.answers import check_answer, check_code_many

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

    if not Path(cfg.model).exists():
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
        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                              "cpu" if cfg.device == "auto" else cfg.device)
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        model = load_policy(cfg.model, device, torch.bfloat16 if precision == "bf16" else torch.float32)
        tokenizer = Phi4Tokenizer()
        bar = tqdm(todo, desc="PTS", unit="question", file=sys.stderr, dynamic_ncols=True)
        with open(output, "a", encoding="utf-8") as out, open(state_path, "a", encoding="utf-8") as state:
            for item in bar:
                prompt_ids = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True)
                if len(prompt_ids) + cfg.max_new_tokens > model.cfg.max_seq_len:
                    result = QuestionResult("too_long", None)
                else:
                    generator = torch.Generator(device=device).manual_seed(question_seed(cfg.seed, item["id"]))
                    result = search_question(item["id"], prompt_ids, make_sampler(model, cfg, generator),
                                             make_judge(item, tokenizer, cfg), cfg)
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
    wall_s = time.monotonic() - start
    summary = {**summarize(done, len(questions)), "this_run": {
        "questions": len(todo), "wall_s": round(wall_s, 3),
        "generated_tokens_per_s": round(generated / wall_s, 1) if wall_s > 0 else 0.0}, "output": str(output)}
    atomic_write(sidecar(output, ".summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


USAGE = "usage: python -m train.pts <config.yaml> [key=value ...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n")[1], file=sys.stderr)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:], schema=PTSConfig)
        summary = run(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "this_run"}), file=sys.stderr)
    return 0
