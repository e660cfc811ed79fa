"""Mixture math: Phi-4 token fractions, per-source epochs, the interleaving schedule, document selection.

A source's `weight` is its fraction of the stage's *training tokens* (Phi-4 Table 5), not of the corpus:
    tokens_drawn_s = weight_s * total_tokens,   epochs_s = tokens_drawn_s / unique_tokens_s.
`python -m data.mixture <config.yaml> [--json]` prints that manifest without training. The config is either a
run config (its `data` section; total tokens = train.max_steps x global_batch x seq_len) or a bare data config
(schema `DataConfig`, with `total_tokens`).

The loader (`data/loader.py`) turns weights into an order of samples with `Schedule`: every sample is one
seq_len window of one source, so a fraction of samples is the same fraction of tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.config import PROVENANCES, DataConfig, SourceConfig
from data.configfile import ConfigError, load_typed, read_yaml

WEIGHT_TOLERANCE = 1e-6  # |sum of weights - 1| allowed (YAML decimals are not exact binary fractions)
MAX_PERIOD = 100_000  # longest schedule period: weights are realised to within 0.5 / MAX_PERIOD
HELD_OUT_SALT = 0x4E1D0  # keeps the held-out draw independent of the permutation draws


class MixtureError(ValueError):
    """A mixture that cannot be used as declared; the message names the sources and keys."""


def validate_mixture(cfg: DataConfig, where: str = "data") -> None:
    """Raise MixtureError unless names, provenances, weights and selection settings make sense."""
    if not cfg.sources:
        raise MixtureError(f"{where}: no sources declared (data.sources is empty)")
    names = [s.name for s in cfg.sources]
    if any(not n for n in names):
        raise MixtureError(f"{where}: every source needs a name; got {names}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MixtureError(f"{where}: duplicate source names {dup}")
    for s in cfg.sources:
        key = f"{where}: source '{s.name}'"
        if s.provenance not in PROVENANCES:
            raise MixtureError(f"{key}: provenance={s.provenance!r}; expected one of {list(PROVENANCES)}")
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise MixtureError(f"{key}: weight={s.weight}; expected a fraction of training tokens in (0, 1] "
                               f"(remove the source instead of giving it weight 0)")
        if s.unique_tokens < 0 or s.min_doc_tokens < 0 or s.upweight_min_tokens < 0:
            raise MixtureError(f"{key}: unique_tokens, min_doc_tokens and upweight_min_tokens must be >= 0")
        if not s.upweight_factor > 0:
            raise MixtureError(f"{key}: upweight_factor={s.upweight_factor}; expected > 0 (1.0 = no up-weighting)")
        if s.upweight_factor != 1.0 and s.upweight_min_tokens <= 0:
            raise MixtureError(f"{key}: upweight_factor={s.upweight_factor} needs upweight_min_tokens > 0")
    total = sum(s.weight for s in cfg.sources)
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        listing = ", ".join(f"{s.name}={s.weight:g}" for s in cfg.sources)
        raise MixtureError(f"{where}: source weights sum to {total:.6g}, expected 1 "
                           f"(weights are fractions of the stage's training tokens): {listing}")
    if not 0.0 <= cfg.held_out_fraction < 1.0:
        raise MixtureError(f"{where}: held_out_fraction={cfg.held_out_fraction}; expected a value in [0, 1)")


# ----------------------------------------------------------------------------------------------------------
# Document selection (midtraining) and held-out documents

def name_key(name: str) -> int:
    """A stable 63-bit integer for a source name (seeds its permutations independently of list order)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def held_out_mask(num_docs: int, fraction: float, seed: int) -> np.ndarray:
    """(num_docs,) bool: the documents kept out of training.

    round(fraction * num_docs) documents (at least 1 when fraction > 0 and there are 2+ documents), drawn by
    (seed, num_docs) only: two sources reading the same directory (a pretraining source and its long-context
    selection) hold out the same documents, so a held-out document is never trained on in either stage.
    """
    mask = np.zeros(num_docs, dtype=bool)
    if fraction <= 0 or num_docs < 2:
        return mask
    k = min(num_docs - 1, max(1, round(fraction * num_docs)))
    order = np.random.default_rng([seed, HELD_OUT_SALT, num_docs]).permutation(num_docs)
    mask[order[:k]] = True
    return mask


def epoch_entries(lengths: np.ndarray, src: SourceConfig, exclude: np.ndarray | None = None) -> np.ndarray:
    """Document indices making up one epoch of a source, repeats included, in index order: (entries,) int64.

    Lengths count the eod; selection compares the text length (length - 1):
    - `min_doc_tokens > 0`: keep only documents with more than min_doc_tokens text tokens;
    - `upweight_min_tokens > 0`: documents with at least that many text tokens appear `upweight_factor` times
      per epoch. A fractional factor f is rounded deterministically along the up-weighted documents in index
      order: the j-th gets floor((j+1) f) - floor(j f) copies, so n of them get floor(n f) copies in all.
    `exclude` (bool per document) removes held-out documents first.
    """
    text = lengths - 1
    keep = text > src.min_doc_tokens if src.min_doc_tokens > 0 else np.ones(len(lengths), dtype=bool)
    if exclude is not None:
        keep &= ~exclude
    docs = np.flatnonzero(keep)
    if src.upweight_min_tokens <= 0 or src.upweight_factor == 1.0:
        return docs
    up = text[docs] >= src.upweight_min_tokens
    j = np.cumsum(up) - 1  # rank among the up-weighted documents (valid where up)
    f = src.upweight_factor
    copies = np.where(up, np.floor((j + 1) * f) - np.floor(j * f), 1).astype(np.int64)
    return np.repeat(docs, copies)


# ----------------------------------------------------------------------------------------------------------
# The interleaving schedule

@dataclass
class Schedule:
    """Deterministic, low-discrepancy interleaving of sources: sample i -> (source, its k-th sample).

    Weights are realised as integer counts `counts[s]` per period of `period` samples (exact when the weights
    are multiples of 1/period, e.g. Table 5 gives period 20 = 3+3+8+4+2). Inside a period, source s takes its
    c-th sample at the ideal time (c + 1/2) / counts[s]; sorting those times (ties by source order) gives the
    order. Every prefix of n samples then holds n * counts[s] / period samples of s up to a few samples, at any
    scale, and the mapping is O(1) for any i: no state but the sample index.
    """
    period: int
    counts: np.ndarray  # (S,) int64 samples of each source per period
    order: np.ndarray  # (period,) int64 source of each position in the period
    rank: np.ndarray  # (period,) int64 how many earlier positions of the period hold the same source

    @staticmethod
    def from_weights(weights) -> "Schedule":
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        periods = np.arange(1, MAX_PERIOD + 1, dtype=np.float64)[:, None]
        scaled = periods * w[None, :]  # (MAX_PERIOD, S)
        exact = np.all(np.abs(scaled - np.round(scaled)) < 1e-6, axis=1) & np.all(np.round(scaled) >= 1, axis=1)
        if exact.any():
            period = int(np.argmax(exact)) + 1
            counts = np.round(period * w).astype(np.int64)
        else:  # largest remainders at the longest period
            period = MAX_PERIOD
            ideal = period * w
            counts = np.floor(ideal).astype(np.int64)
            short = period - int(counts.sum())
            counts[np.argsort(-(ideal - counts), kind="stable")[:short]] += 1
        if np.any(counts < 1):
            raise MixtureError(f"weights {list(w)}: a weight below 1/{MAX_PERIOD} cannot be scheduled")
        src = np.repeat(np.arange(len(counts)), counts)
        c = np.concatenate([np.arange(k) for k in counts])
        # (2c+1) / (2k) in float64: correctly rounded quotients of exact integers, so equal rationals tie exactly.
        times = (2 * c + 1).astype(np.float64) / (2 * counts[src]).astype(np.float64)
        pos = np.lexsort((src, times))
        order = src[pos]
        return Schedule(period, counts, order, c[pos])

    def locate(self, i) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source index, index of that sample within the source's samples)."""
        i = np.asarray(i, dtype=np.int64)
        q, j = np.divmod(i, self.period)
        s = self.order[j]
        return s, q * self.counts[s] + self.rank[j]

    def counts_before(self, n: int) -> np.ndarray:
        """(S,) samples of each source among global samples [0, n)."""
        q, j = divmod(int(n), self.period)
        return q * self.counts + np.bincount(self.order[:j], minlength=len(self.counts))


# ----------------------------------------------------------------------------------------------------------
# The manifest: what a stage draws from each source

def _source_tokens(src: SourceConfig, cfg: DataConfig) -> tuple[int | None, int | None]:
    """(unique training tokens, tokens per pass incl. up-weighting) of a source; None when unknown."""
    if src.unique_tokens > 0:
        return src.unique_tokens, src.unique_tokens
    if not src.path or not (Path(src.path) / "manifest.json").is_file():
        return None, None  # not prepared yet: planning needs no prepared data
    from data.shards import ShardedSource
    sharded = ShardedSource(src.path, verify="size")
    lengths = sharded.doc_lengths()
    entries = epoch_entries(lengths, src, held_out_mask(len(lengths), cfg.held_out_fraction, cfg.seed))
    unique = int(lengths[np.unique(entries)].sum())
    return unique, int(lengths[entries].sum())


def mixture_manifest(cfg: DataConfig, total_tokens: int | None = None) -> list[dict]:
    """One row per source: name, provenance, unique_tokens, fraction, tokens_drawn, epochs, pass_tokens, passes.

    unique_tokens: the declared size, else the training documents of the prepared source (after selection and
    held-out). epochs = tokens_drawn / unique_tokens (Table 5's column); passes = tokens_drawn / pass_tokens,
    where a pass is one epoch of the source's stream with up-weighted documents repeated. None when unknown.
    """
    validate_mixture(cfg)
    total = int(total_tokens if total_tokens is not None else cfg.total_tokens)
    if total <= 0:
        raise MixtureError("data.total_tokens must be > 0 to compute epochs (or give a run config with a train section)")
    rows = []
    for s in cfg.sources:
        unique, pass_tokens = _source_tokens(s, cfg)
        drawn = s.weight * total
        rows.append({"source": s.name, "provenance": s.provenance, "unique_tokens": unique, "fraction": s.weight,
                     "tokens_drawn": int(round(drawn)), "epochs": drawn / unique if unique else None,
                     "pass_tokens": pass_tokens, "passes": drawn / pass_tokens if pass_tokens else None})
    return rows


def _human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_manifest(rows: list[dict], total_tokens: int, title: str = "") -> str:
    head = f"{'source':<20} {'provenance':<10} {'unique tokens':>13} {'fraction':>9} {'tokens drawn':>13} {'epochs':>7}"
    lines = [f"mixture {title}  total {_human(total_tokens)} tokens".rstrip(), head, "-" * len(head)]
    for r in rows:
        e = r["epochs"]
        epochs = "?" if e is None else f"{e:.1f}" if e >= 0.95 else f"{e:.3f}"
        lines.append(f"{r['source']:<20} {r['provenance']:<10} {_human(r['unique_tokens']):>13} "
                     f"{100 * r['fraction']:>8.1f}% {_human(r['tokens_drawn']):>13} {epochs:>7}")
    by_prov = {p: sum(r["fraction"] for r in rows if r["provenance"] == p) for p in PROVENANCES}
    lines.append("by provenance: " + ", ".join(f"{p} {100 * f:.1f}%" for p, f in by_prov.items()))
    if any(r["epochs"] is None for r in rows):
        lines.append("?: unknown until the source is prepared (set `path`) or `unique_tokens` is declared")
    return "\n".join(lines)


def load_mixture_config(path: str) -> tuple[DataConfig, int]:
    """A data (mixture) config and its total tokens. A run config is refused with the way to its mixture."""
    raw = read_yaml(Path(path))
    if "sources" not in raw and "data" in raw:
        mixture = raw["data"].get("mixture") if isinstance(raw["data"], dict) else None
        raise ConfigError(f"{path} is a run config; pass its mixture file" + (f" ({mixture})" if mixture else "")
                          + ", or see the stage's plan with `python -m train.plan " + str(path) + "`")
    data = load_typed(path, schema=DataConfig)
    return data, data.total_tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.mixture", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="run config (uses its data section) or data config (schema DataConfig)")
    ap.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = ap.parse_args(argv)
    if not Path(args.config).is_file():
        print(f"error: config file not found: {args.config}", file=sys.stderr)
        return 2
    try:
        cfg, total = load_mixture_config(args.config)
        rows = mixture_manifest(cfg, total)
    except (ValueError, RuntimeError) as e:  # ConfigError, MixtureError, ShardError
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"config": args.config, "total_tokens": total, "seed": cfg.seed, "sources": rows}, indent=1))
    else:
        print(format_manifest(rows, total, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
