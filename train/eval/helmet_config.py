"""The `long_context` section of the eval config: HELMET's categories (train/eval/helmet.py), one entry per category.
Kept apart from helmet.py so train/eval/config.py can import it without an import circle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from train.config import ConfigError

CATEGORIES = ("rag", "rerank", "icl", "qa", "summ")
# HELMET's datasets per category (scripts/collect_results.py `custom_avgs`; QA and Summ: the Phi-4 report's
# NarrativeQA and Multi-LexSum only)
DEFAULT_DATASETS = {"rag": ["nq", "triviaqa", "hotpotqa", "popqa"], "rerank": ["msmarco_rerank_psg"],
                    "icl": ["trec_coarse", "trec_fine", "banking77", "clinic150", "nlu"],
                    "qa": ["narrativeqa"], "summ": ["multi_lexsum"]}
DEFAULT_SAMPLES = {"rag": 100, "rerank": 100, "icl": 500, "qa": 100, "summ": 100}  # HELMET's max_test_samples


@dataclass
class LongContextTask:
    name: str = ""
    category: str = ""  # rag | rerank | icl | qa | summ
    # rag / rerank: HELMET's data root as scripts/download_data.sh unpacks it (kilt/, msmarco/); icl / qa / summ: a
    # directory of Hugging Face dataset directories (trec, banking77, clinc_oos, nlu_evaluation_data, narrativeqa,
    # multi_lexsum; see train/eval/helmet_data.py)
    path: str = ""
    datasets: list[str] = field(default_factory=list)  # empty = the category's HELMET datasets
    # total tokens, prompt + answer (HELMET's input_max_length): the prompt is cut to length - generation budget
    lengths: list[int] = field(default_factory=lambda: [8192, 16384])
    samples: int = 0  # items per dataset and length (HELMET's max_test_samples); 0 = HELMET's default
    seed: int = 42  # HELMET's --seed (item selection, demos, label maps)
    prompt: str = ""  # plain | chat; empty = HELMET's use_chat_template for the category (chat for qa / summ)
    allow_beyond_context: bool = False  # lengths above the model's max_seq_len too (else they are skipped)
    # the paper's category score per length (percent; ours are fractions); None = no comparable number (qa / summ)
    paper_score: Optional[dict[int, float]] = None


def validate_long_context(tasks: list[LongContextTask]) -> None:
    """Raise ConfigError naming long_context[i].key for the first bad value."""
    from train.eval.helmet_data import check_dataset_length  # the per-length tables live with the readers

    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval config: long_context names must be unique; got {names}")
    for i, t in enumerate(tasks):
        key = f"eval config: long_context[{i}]"
        if not t.name or not t.path:
            raise ConfigError(f"{key}.name and .path must be set; got name={t.name!r} path={t.path!r}")
        if t.category not in CATEGORIES:
            raise ConfigError(f"{key}.category={t.category!r}; expected one of {list(CATEGORIES)}")
        if t.prompt not in ("", "plain", "chat"):
            raise ConfigError(f"{key}.prompt={t.prompt!r}; expected one of ['', 'plain', 'chat']")
        for j, d in enumerate(t.datasets):
            if d not in DEFAULT_DATASETS[t.category]:
                raise ConfigError(f"{key}.datasets[{j}]={d!r}; expected one of {DEFAULT_DATASETS[t.category]}")
        if not t.lengths:
            raise ConfigError(f"{key}.lengths is empty")
        for j, n in enumerate(t.lengths):
            problem = check_dataset_length(t.category, n)
            if problem:
                raise ConfigError(f"{key}.lengths[{j}]={n}: {problem}")
        if t.samples < 0:
            raise ConfigError(f"{key}.samples={t.samples} must be >= 0 (0 = HELMET's default)")
        for n in (t.paper_score or {}):
            if int(n) not in t.lengths:
                raise ConfigError(f"{key}.paper_score has length {n}, not one of lengths={t.lengths}")
