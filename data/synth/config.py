"""The synthetic-data pipeline's config: which backend answers, which seeds, and each step's numbers.

The paper gives the steps and few numbers (report §2.2-2.3, App. D); what it leaves open is marked ASSUMPTION here and
in configs/phi4-14b/synth/. Loaded with data.configfile (unknown keys and bad values name the file and key).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.benchmarks import SOURCES as BENCHMARK_SOURCES
from data.configfile import ConfigError, load_typed
from data.decontaminate import BenchmarkSpec
from data.synth.backend import OpenAIBackendConfig, VLLMOfflineConfig
from data.synth.prompts import REWRITE_STYLES

BACKENDS = ("openai", "vllm", "inprocess")
SCORERS = ("llm", "classifier", "none")


@dataclass
class InProcessConfig:
    """Our own model in this process (train/synth/inprocess.py): a checkpoint or HF directory, or `init:<model
    yaml>` for a freshly initialised one (the smoke test: no teacher model exists on a CPU)."""
    model: str = ""
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 16  # requests per generate() call
    init_seed: int = 0  # for init: models
    max_seq_len: int = 0  # init: models only; 0 = the model yaml's


@dataclass
class BackendConfig:
    kind: str = "openai"  # openai | vllm | inprocess
    concurrency: int = 32  # requests in flight (openai); batch backends batch instead
    openai: OpenAIBackendConfig = field(default_factory=OpenAIBackendConfig)
    vllm: VLLMOfflineConfig = field(default_factory=VLLMOfflineConfig)
    inprocess: InProcessConfig = field(default_factory=InProcessConfig)

    def validate(self, key: str = "backend") -> None:
        """ConfigError naming `key`.<field> for a backend that cannot run."""
        if self.kind not in BACKENDS:
            raise ConfigError(f"{key}.kind={self.kind!r}; expected one of {list(BACKENDS)}")
        if self.kind == "openai" and not self.openai.model:
            raise ConfigError(f"{key}.openai.model is required: the name the server serves (GET /v1/models)")
        if self.kind == "vllm" and not self.vllm.model:
            raise ConfigError(f"{key}.vllm.model is required")
        if self.kind == "inprocess" and not self.inprocess.model:
            raise ConfigError(f"{key}.inprocess.model is required: a checkpoint, an HF directory or init:<yaml>")
        if self.concurrency < 1 or self.inprocess.batch_size < 1:
            raise ConfigError(f"{key}.concurrency and {key}.inprocess.batch_size must be >= 1")


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024


@dataclass
class SeedsConfig:
    inputs: list[str] = field(default_factory=list)  # .txt/.md, jsonl (text_field), or data.prepare shard dirs
    text_field: str = "text"
    passage_chars: int = 2000  # passages are whole paragraphs packed up to this many characters
    min_chars: int = 200  # shorter passages are dropped (too_short)
    max_passages: int = 0  # per shard; 0 = all
    score: str = "llm"  # llm (the rubric prompt) | classifier (a linear model, .npz) | none (keep every passage)
    classifier: str = ""  # .npz with w_educational, w_reasoning (dim,) and b (2,): see data/synth/seeds.py
    min_educational: int = 3  # ASSUMPTION: the report filters for "educational potential" without a threshold
    min_reasoning: int = 2  # ASSUMPTION
    max_tokens: int = 200  # of the scoring reply


@dataclass
class RewriteConfig:
    enabled: bool = True
    styles: list[str] = field(default_factory=lambda: list(REWRITE_STYLES))
    samples: int = 1  # per seed and style
    drop_truncated: bool = True  # a reply cut by max_tokens teaches the model to stop mid-sentence


@dataclass
class RevisionConfig:
    enabled: bool = True
    styles: list[str] = field(default_factory=list)  # the rewrite styles revised; [] = all
    rounds: int = 2  # K: critique -> revise rounds at most (ASSUMPTION: the report says "repeated")
    target_score: int = 4  # stop revising once every rubric score reaches this
    min_final_score: int = 3  # drop a record whose last critique scores below this (ASSUMPTION)
    max_tokens: int = 300  # of a critique


@dataclass
class QuestionsConfig:
    enabled: bool = True
    organic: list[str] = field(default_factory=list)  # jsonl with question_field (organic questions come first)
    question_field: str = "question"
    synthetic_per_seed: int = 1  # questions written from each kept seed (0 = organic only)
    answers: int = 5  # N independent samples per question (report: "several"; ASSUMPTION: 5)
    answer_temperature: float = 0.8  # independent samples need temperature > 0
    question_max_tokens: int = 200


@dataclass
class ReversalConfig:
    enabled: bool = True
    inputs: list[str] = field(default_factory=list)  # jsonl of {code_field, tests_field}: snippets with their tests
    code_field: str = "code"
    tests_field: str = "tests"
    instruction_max_tokens: int = 300


@dataclass
class ValidationConfig:
    timeout_s: float = 5.0  # per program in the sandbox
    memory_mb: int = 512


@dataclass
class DedupConfig:
    exact: bool = True  # identical normalised text
    near: bool = True  # MinHash + LSH over word shingles
    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 16  # 16 bands x 8 rows: pairs at Jaccard 0.8 collide with p ~0.97, at 0.5 with p ~0.06
    threshold: float = 0.8  # estimated Jaccard at or above which a later record is a near duplicate


@dataclass
class DecontamConfig:
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)  # none: the records are not checked (warned)
    long_n: int = 13
    short_n: int = 7
    contaminated_threshold: float = 0.4
    info_threshold: float = 0.2


@dataclass
class SynthConfig:
    output_dir: str = ""
    name: str = "synth"  # prefix of the output files
    seed: int = 0  # base of every request's seed
    backend: BackendConfig = field(default_factory=BackendConfig)
    sampling: Sampling = field(default_factory=Sampling)
    seeds: SeedsConfig = field(default_factory=SeedsConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    revision: RevisionConfig = field(default_factory=RevisionConfig)
    questions: QuestionsConfig = field(default_factory=QuestionsConfig)
    reversal: ReversalConfig = field(default_factory=ReversalConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        self.backend.validate()
        s = self.sampling
        if s.temperature < 0 or not 0 < s.top_p <= 1 or s.max_tokens < 1:
            raise ConfigError(f"sampling: temperature >= 0, top_p in (0, 1], max_tokens >= 1 expected; got {s}")
        if self.seeds.score not in SCORERS:
            raise ConfigError(f"seeds.score={self.seeds.score!r}; expected one of {list(SCORERS)}")
        if self.seeds.score == "classifier" and not self.seeds.classifier:
            raise ConfigError("seeds.score=classifier needs seeds.classifier: an .npz file")
        if self.seeds.passage_chars < self.seeds.min_chars or self.seeds.min_chars < 1:
            raise ConfigError("seeds: need 1 <= min_chars <= passage_chars")
        bad = [st for st in self.rewrite.styles + self.revision.styles if st not in REWRITE_STYLES]
        if bad:
            raise ConfigError(f"rewrite.styles: unknown {bad}; expected some of {list(REWRITE_STYLES)}")
        if self.rewrite.samples < 1 or self.revision.rounds < 0:
            raise ConfigError("rewrite.samples must be >= 1 and revision.rounds >= 0")
        if not 1 <= self.revision.min_final_score <= 5 or not 1 <= self.revision.target_score <= 5:
            raise ConfigError("revision.target_score and min_final_score are rubric scores in 1..5")
        q = self.questions
        if q.enabled and q.answers < 3:
            raise ConfigError(f"questions.answers={q.answers}: a plurality needs at least 3 samples")
        if q.enabled and q.answer_temperature <= 0:
            raise ConfigError("questions.answer_temperature must be > 0: independent samples, not N copies")
        d = self.dedup
        if d.num_perm % d.bands or not 0 < d.threshold <= 1 or d.shingle_words < 1:
            raise ConfigError(f"dedup: num_perm ({d.num_perm}) must be a multiple of bands ({d.bands}), "
                              f"threshold in (0, 1], shingle_words >= 1")
        for i, bm in enumerate(self.decontaminate.benchmarks):
            if bm.source not in BENCHMARK_SOURCES or not bm.path:
                raise ConfigError(f"decontaminate.benchmarks[{i}]: source={bm.source!r}, path={bm.path!r}; expected "
                                  f"a path and a source of {list(BENCHMARK_SOURCES)}")
        names = [bm.name for bm in self.decontaminate.benchmarks]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"decontaminate.benchmarks need unique names; got {names}")


def load_synth_config(path, overrides=()) -> SynthConfig:
    return load_typed(path, overrides, SynthConfig)
