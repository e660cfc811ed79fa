"""Pivotal Token Search configuration (`python -m train.pts CONFIG`), validated at load."""
from __future__ import annotations

from dataclasses import dataclass, field

from data.synth.config import BackendConfig
from train.config import ConfigError

SOLUTION_CHOICES = ("sampled", "success", "failure", "both")


@dataclass
class PTSConfig:
    model: str = ""  # a run dir / checkpoint dir (train.checkpoint) or a Hugging Face directory
    # who samples the rollouts: model = `model` in this process (model/generate.py) | backend = the synthetic-data
    # engine's backends (train/pts/sampling.py): a vLLM server per node (kind openai, token-id prompts, prefix
    # caching: every rollout of a prefix shares its KV blocks), vLLM in process (kind vllm), or our model (inprocess)
    sampler: str = "model"
    backend: BackendConfig = field(default_factory=BackendConfig)
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
            (bool((self.model or self.sampler == "backend") and self.questions and self.output),
             "model (or sampler: backend), questions and output must be set"),
            (self.sampler in ("model", "backend"), f"sampler={self.sampler!r}; expected model | backend"),
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
        if self.sampler == "backend":
            self.backend.validate("pts config: backend")
