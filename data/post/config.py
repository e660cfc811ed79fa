"""Config of the post-training data builders (python -m train.post): which model plays which role, and each builder.

Roles (each a backend of data/synth: an OpenAI-compatible server, vLLM offline, or our own model in process):
- `generator`: the stronger model that writes responses (the report: GPT-4o / GPT-4-Turbo);
- `judge`: scores responses with the rubric (the report: GPT-4o);
- `policy`: the model being trained (the SFT or round-1 checkpoint), for judge-guided pairs and to probe what it knows
  (hallucination data). Unset roles fall back to `generator`.
Numbers the report does not give are ASSUMPTION (spec: ../shared/spec/phi4-recipe.md §5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.configfile import ConfigError, load_typed
from data.synth.config import BACKENDS, BackendConfig, Sampling

DOMAINS = ("math", "code", "reasoning", "conversation", "model_identity", "safety", "multilingual")
ROLES = ("generator", "judge", "policy")


@dataclass
class JudgedSFTConfig:
    enabled: bool = True
    prompts: list[str] = field(default_factory=list)  # jsonl: {messages: [...]} or {prompt: str}, optional domain
    responses: int = 4  # candidates per prompt (report: "several"; ASSUMPTION: 4)
    min_overall: float = 3.0  # drop the prompt when its best response scores below this (ASSUMPTION)


@dataclass
class JudgePairsConfig:
    enabled: bool = True
    prompts: list[str] = field(default_factory=list)  # jsonl as for SFT
    policy_samples: int = 2  # responses of the model being trained
    generator_samples: int = 2  # responses of the stronger model
    pairs_per_prompt: int = 1  # the pairs with the widest judged gaps (ASSUMPTION; the report pairs "any vs any")


@dataclass
class HallucinationConfig:
    enabled: bool = True
    questions: list[str] = field(default_factory=list)  # jsonl {question, answer}: trivia seeds (TriviaQA-style)
    samples: int = 5  # policy samples per question to estimate whether it knows (ASSUMPTION: "several")
    usually_right: float = 0.5  # p(correct) at or above which the model "usually knows" (ASSUMPTION)
    checker: str = "judge"  # judge (the answer-check prompt: matches_key True/False/Uncertain) | rule (answers.py)
    dpo_tokens: int = 5  # the report's truncation of both DPO responses


@dataclass
class SafetyConfig:
    enabled: bool = True
    prompts: list[str] = field(default_factory=list)  # jsonl {prompt, category}: your red-team / RAI prompts
    categories: list[str] = field(default_factory=list)  # or: prompts written by the generator per category
    per_category: int = 4
    judge_pairs: bool = True  # keep a DPO pair only when the judge rates the safe response safer than the policy's


@dataclass
class PostDataConfig:
    output_dir: str = ""
    make: list[str] = field(default_factory=lambda: ["sft", "dpo"])  # which files: what SFT reads, what DPO reads
    seed: int = 0
    sampling: Sampling = field(default_factory=Sampling)
    judge_max_tokens: int = 512  # of a judge's reply: the faults list, then the scores
    generator: BackendConfig = field(default_factory=BackendConfig)
    judge: BackendConfig = field(default_factory=lambda: BackendConfig(kind=""))  # kind "" = the generator
    policy: BackendConfig = field(default_factory=lambda: BackendConfig(kind=""))
    sft: JudgedSFTConfig = field(default_factory=JudgedSFTConfig)
    judge_pairs: JudgePairsConfig = field(default_factory=JudgePairsConfig)
    hallucination: HallucinationConfig = field(default_factory=HallucinationConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def role(self, name: str) -> BackendConfig:
        b = getattr(self, name)
        return b if b.kind else self.generator

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if not self.make or set(self.make) - {"sft", "dpo"}:
            raise ConfigError(f"make={self.make}; expected a non-empty list of sft, dpo")
        for name in ROLES:
            b = getattr(self, name)
            if b.kind == "" and name == "generator":
                raise ConfigError("generator.kind is required")
            if b.kind and b.kind not in BACKENDS:
                raise ConfigError(f"{name}.kind={b.kind!r}; expected one of {list(BACKENDS)} (or \"\" = generator)")
            if b.kind == "openai" and not b.openai.model:
                raise ConfigError(f"{name}.openai.model is required")
            if b.kind == "inprocess" and not b.inprocess.model:
                raise ConfigError(f"{name}.inprocess.model is required")
        if self.sft.enabled and (self.sft.responses < 2 or not self.sft.prompts):
            raise ConfigError("sft: needs prompts and responses >= 2 (the judge picks the best of several)")
        jp = self.judge_pairs
        if jp.enabled and (not jp.prompts or jp.policy_samples + jp.generator_samples < 2 or jp.pairs_per_prompt < 1):
            raise ConfigError("judge_pairs: needs prompts, at least 2 responses per prompt and pairs_per_prompt >= 1")
        h = self.hallucination
        if h.enabled and (not h.questions or h.samples < 1 or not 0 < h.usually_right <= 1 or h.dpo_tokens < 1):
            raise ConfigError("hallucination: needs questions, samples >= 1, usually_right in (0, 1], dpo_tokens >= 1")
        if h.checker not in ("judge", "rule"):
            raise ConfigError(f"hallucination.checker={h.checker!r}; expected 'judge' or 'rule'")
        s = self.safety
        if s.enabled and not (s.prompts or s.categories):
            raise ConfigError("safety: give prompts (jsonl) or categories to write prompts for")


def load_post_config(path, overrides=()) -> PostDataConfig:
    return load_typed(path, overrides, PostDataConfig)
