"""Evaluation configuration: the task lists (multiple choice, generative, perplexity sources, recall probe), validated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data.config import PROVENANCES
from train.config import ConfigError, WandbConfig
from data.benchmarks import GENERATIVE_SOURCES, MULTIPLE_CHOICE_SOURCES
from train.eval.chat_config import ChatTask, validate_chat
from train.eval.helmet_config import LongContextTask, validate_long_context


PRIMARY = ("acc", "acc_norm", "per_token")
RENAMED_PRIMARY = {"sum": "acc", "mean": "per_token"}  # the names before acc/acc_norm followed lm-eval's


@dataclass
class MultipleChoiceTask:
    name: str = ""
    path: str = ""  # jsonl rows {"question", "choices": [...], "answer": index}
    k_shot: int = 0
    fewshot_path: str = ""  # shots = its first k rows; empty = the first k rows of `path` (then not scored)
    # text: score each choice's text (ARC) | letters: list choices as A-D, score the letter | mmlu: lm-eval's `mmlu`
    # prompt (subject header; shots: the first k rows of the item's subject in fewshot_path, the dev split)
    format: str = "text"
    subject: str = ""  # format mmlu: every row's subject, e.g. high_school_us_history; empty = each row's "subject"
    # the score `accuracy` repeats: acc (summed log-prob) | acc_norm (per character of the choice), both as
    # lm-evaluation-harness defines them | per_token (our per-token mean, reported as acc_per_token)
    primary: str = "acc_norm"
    limit: int = 0  # 0 = every item
    # jsonl: `path` holds the rows above | a benchmark's own published files (data/benchmarks.py): `path` is
    # the dataset's local directory (Hugging Face layout) or one of its files, read at `split`
    source: str = "jsonl"
    split: str = "test"
    # with a benchmark source: the split the shots come from (of fewshot_path, else of path), e.g. dev (MMLU);
    # empty = the first k rows of `split` (then not scored)
    fewshot_split: str = ""
    # the paper's number for exactly this protocol (shots, scoring, model kind); shown beside ours in the recipe
    # summary; unset where the paper reports none for it
    paper_score: Optional[float] = None


@dataclass
class GenerativeTask:
    name: str = ""
    path: str = ""  # jsonl rows {"question" or "messages", "answer", "oracle"?: math|code, "tests"?}
    k_shot: int = 0
    fewshot_path: str = ""  # rows with "question" and "solution" (or "answer"); empty = first k rows of `path`
    # plain few-shot text (base models) | chat (the chat template; chat models) | completion (the item's text as it
    # is, shots joined before it: HumanEval's function prompt, completed by a base model)
    prompt: str = "plain"
    temperature: float = 0.0  # 0 = greedy; simple-evals use 0.5
    top_p: float = 1.0
    max_new_tokens: int = 256
    num_samples: int = 1  # completions per item; accuracy is averaged over them
    limit: int = 0
    # jsonl: `path` holds the rows above | a benchmark's own published files (data/benchmarks.py): `path` is
    # the dataset's local directory (Hugging Face layout) or one of its files, read at `split`
    source: str = "jsonl"
    split: str = "test"
    # with a benchmark source: the split the shots come from (of fewshot_path, else of path), e.g. dev (MMLU);
    # empty = the first k rows of `split` (then not scored)
    fewshot_split: str = ""
    # the paper's number for exactly this protocol (shots, scoring, model kind); shown beside ours in the recipe
    # summary; unset where the paper reports none for it
    paper_score: Optional[float] = None


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
    # length -> the paper's recall (SubEM, percent) at it, shown beside len_<L>/substring_match in the recipe summary
    paper_score: dict[int, float] = field(default_factory=dict)


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
    chat: list[ChatTask] = field(default_factory=list)  # the simple-evals suite (train/eval/chat.py)
    perplexity: list[PerplexitySource] = field(default_factory=list)
    recall: RecallProbe = field(default_factory=RecallProbe)
    long_context: list[LongContextTask] = field(default_factory=list)  # HELMET categories (helmet.py)
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(mode="disabled"))

    def validate(self) -> None:
        """Raise ConfigError naming the key of the first bad value."""
        mc, gen, ppl = self.multiple_choice, self.generative, self.perplexity
        choices = [("device", self.device, ("auto", "cpu", "cuda")),
                   ("precision", self.precision, ("auto", "bf16", "fp32")),
                   ("wandb.mode", self.wandb.mode, ("online", "offline", "disabled")),
                   ("recall.prompt", self.recall.prompt, ("plain", "chat"))]
        choices += [(f"multiple_choice[{i}].format", t.format, ("text", "letters", "mmlu")) for i, t in enumerate(mc)]
        for i, t in enumerate(mc):
            if t.primary in RENAMED_PRIMARY:
                raise ConfigError(f"eval config: multiple_choice[{i}].primary={t.primary!r} was renamed: use "
                                  f"{RENAMED_PRIMARY[t.primary]!r} (the metric is now called "
                                  f"{'acc' if t.primary == 'sum' else 'acc_per_token'})")
        choices += [(f"multiple_choice[{i}].primary", t.primary, PRIMARY) for i, t in enumerate(mc)]
        choices += [(f"generative[{i}].prompt", t.prompt, ("plain", "chat", "completion")) for i, t in enumerate(gen)]
        choices += [(f"multiple_choice[{i}].source", t.source, ("jsonl",) + MULTIPLE_CHOICE_SOURCES)
                    for i, t in enumerate(mc)]
        choices += [(f"generative[{i}].source", t.source, ("jsonl",) + GENERATIVE_SOURCES) for i, t in enumerate(gen)]
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
        stray = [n for n in self.recall.paper_score if n not in self.recall.lengths]
        if stray:
            raise ConfigError(f"eval config: recall.paper_score has lengths {stray} that recall.lengths="
                              f"{list(self.recall.lengths)} does not probe")
        for section, tasks in (("multiple_choice", mc), ("generative", gen), ("perplexity", ppl)):
            names = [t.name for t in tasks]
            if len(set(names)) != len(names) or not all(names) or not all(t.path for t in tasks):
                raise ConfigError(f"eval config: every {section} entry needs a unique name and a path; got {names}")
        for section, tasks in (("multiple_choice", mc), ("generative", gen)):
            for i, t in enumerate(tasks):
                if t.source == "jsonl" and t.fewshot_split:
                    raise ConfigError(f"eval config: {section}[{i}] ({t.name}).fewshot_split={t.fewshot_split!r} "
                                      f"needs a benchmark source (source=jsonl reads fewshot_path as it is)")
                if not t.split:
                    raise ConfigError(f"eval config: {section}[{i}] ({t.name}).split is empty")
        for i, t in enumerate(mc):
            if t.format == "mmlu" and t.k_shot and not (t.fewshot_path or (t.source != "jsonl" and t.fewshot_split)):
                raise ConfigError(f"eval config: multiple_choice[{i}] ({t.name}): format=mmlu takes its shots from the "
                                  f"dev split: set fewshot_path (or, with a benchmark source, fewshot_split: dev)")
        for i, t in enumerate(gen):
            if t.temperature < 0 or t.top_p > 1:
                raise ConfigError(f"eval config: generative[{i}]: temperature={t.temperature} must be >= 0 and "
                                  f"top_p={t.top_p} at most 1")
        validate_chat(self.chat)
        validate_long_context(self.long_context)
