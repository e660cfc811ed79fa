"""Data configuration dataclasses: plain values, validated by the loaders that use them."""
from __future__ import annotations

from dataclasses import dataclass, field

PROVENANCES = ("synthetic", "organic")
POST_ROLES = ("main", "safety", "hallucination")  # safety + hallucination: the share Phi-4 keeps at 1-5% per DPO round
POST_WEIGHT_UNITS = ("examples", "tokens")


@dataclass
class SourceConfig:
    """One source of a stage's mixture."""
    name: str = ""
    provenance: str = "organic"  # synthetic | organic
    path: str = ""  # prepared shard directory (holds manifest.json); empty only for planning-only mixtures
    weight: float = 0.0  # fraction of the stage's *training tokens* (Phi-4 Table 5 semantics), not of the corpus
    unique_tokens: int = 0  # declared size for planning; when 0 it is read from the manifest
    # Midtraining long-context selection (Phi-4 report §3.3): keep documents longer than min_doc_tokens and
    # up-weight those of at least upweight_min_tokens by upweight_factor. 0 / 1.0 = no selection.
    min_doc_tokens: int = 0
    upweight_min_tokens: int = 0
    upweight_factor: float = 1.0


@dataclass
class PostSourceConfig:
    """One jsonl source of an SFT (conversations) or DPO (preference pairs) mixture (data/post_mixture.py)."""
    name: str = ""
    path: str = ""  # jsonl file
    weight: float = 0.0  # fraction of the stage's examples, or of its training tokens (data.post_weight_unit)
    role: str = "main"  # main | safety | hallucination (what counts towards the paper's 1-5% DPO share)


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    total_tokens: int = 0  # the stage's training tokens; in a run it is derived from the train section
    seed: int = 1234
    held_out_fraction: float = 0.0  # documents per source kept out of training for held-out loss
    # Post-training inputs (jsonl): conversations for SFT, preference pairs for DPO.
    # One file each (a single source of weight 1), or weighted sources: `sft_sources` / `dpo_sources` (not both).
    sft_path: str = ""
    dpo_path: str = ""
    sft_sources: list[PostSourceConfig] = field(default_factory=list)
    dpo_sources: list[PostSourceConfig] = field(default_factory=list)
    # Post-training weights count examples (conversations / pairs) or training tokens (SFT: labelled assistant
    # tokens; DPO: completion tokens of both sides).
    post_weight_unit: str = "examples"
    pack: bool = True  # SFT: pack several conversations per sequence (with document masking)
