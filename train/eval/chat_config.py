"""The `chat:` section of the eval config: one OpenAI simple-evals benchmark per entry (run by train/eval/chat.py).

Kept apart from chat.py so train/eval/config.py can import it without an import circle (chat.py imports tasks.py,
which imports config.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data.synth.config import BackendConfig
from train.config import ConfigError
from train.eval.chat_prompts import MGSM_LANGUAGES

BENCHMARKS = ("mmlu", "gpqa", "math", "humaneval", "mgsm", "simpleqa", "drop")


@dataclass
class ChatTask:
    name: str = ""
    benchmark: str = ""  # mmlu | gpqa | math | humaneval | mgsm | simpleqa | drop
    # the published file simple-evals downloads, or a directory holding it (train/eval/chat_data.py: FILES)
    path: str = ""
    temperature: float = 0.5  # simple-evals' ChatCompletionSampler default, the report's setting
    top_p: float = 1.0
    max_new_tokens: int = 1024  # simple-evals' sampler max_tokens
    system: str = ""  # a system message before the user turn; empty = none
    # completions per item: simple-evals' n_repeats (GPQA: each repeat with its own choice order) or HumanEval's
    # num_samples_per_task; the metrics average over them
    num_samples: int = 1
    limit: int = 0  # simple-evals' num_examples (a seeded random subset, as it draws it; MGSM: per language); 0 = all
    languages: list[str] = field(default_factory=lambda: list(MGSM_LANGUAGES))  # mgsm only
    drop_shots: int = 3  # drop only: train examples stuffed before each question (train_samples_per_prompt)
    timeout_s: float = 3.0  # humaneval only: per program in the sandbox (human-eval's check_correctness default)
    # simpleqa (and math with equality_grader): the grader model behind an OpenAI-compatible server (or vllm /
    # inprocess), asked with simple-evals' GRADER_TEMPLATE (EQUALITY_TEMPLATE for math)
    grader: BackendConfig = field(default_factory=BackendConfig)
    equality_grader: bool = False  # math only: grade equivalence with `grader` as simple-evals does (else our oracle)
    grader_temperature: float = 0.5  # simple-evals' grading sampler: its default temperature, max_tokens 2048
    grader_max_tokens: int = 2048
    # the paper's number for this protocol, in the paper's units (percent); compared with the task's primary metric
    # (accuracy; f1 for simpleqa and drop), which is a fraction
    paper_score: Optional[float] = None


def validate_chat(tasks: list[ChatTask]) -> None:
    """ConfigError naming `chat[i].key` for the first bad value."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"eval config: every chat entry needs a unique name; got {names}")
    for i, t in enumerate(tasks):
        key = f"chat[{i}]"
        if t.benchmark not in BENCHMARKS:
            raise ConfigError(f"eval config: {key}.benchmark={t.benchmark!r}; expected one of {list(BENCHMARKS)}")
        if not t.path:
            raise ConfigError(f"eval config: {key}.path is empty (the benchmark's file or its directory)")
        for name in ("max_new_tokens", "num_samples", "top_p", "timeout_s"):
            if getattr(t, name) <= 0:
                raise ConfigError(f"eval config: {key}.{name}={getattr(t, name)} must be > 0")
        if t.temperature < 0 or t.top_p > 1:
            raise ConfigError(f"eval config: {key}: temperature={t.temperature} must be >= 0 and top_p={t.top_p} "
                              "at most 1")
        if t.limit < 0 or t.drop_shots < 0:
            raise ConfigError(f"eval config: {key}: limit={t.limit} and drop_shots={t.drop_shots} must be >= 0")
        if t.benchmark == "mgsm":
            bad = [x for x in t.languages if x not in MGSM_LANGUAGES]
            if bad or not t.languages:
                raise ConfigError(f"eval config: {key}.languages={t.languages}: expected a non-empty list of "
                                  f"{list(MGSM_LANGUAGES)}")
        if t.equality_grader and t.benchmark != "math":
            raise ConfigError(f"eval config: {key}.equality_grader is for benchmark math only")
        if t.benchmark == "simpleqa" or t.equality_grader:
            t.grader.validate(f"eval config: {key}.grader")
            if t.grader_temperature < 0 or t.grader_max_tokens <= 0:
                raise ConfigError(f"eval config: {key}: grader_temperature must be >= 0 and grader_max_tokens > 0")
