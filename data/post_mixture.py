"""Weighted post-training mixtures: several SFT conversation files, or DPO pair files, drawn by weight.

Config (`data.sft_sources` / `data.dpo_sources`, `PostSourceConfig`): each source is a jsonl file with a `weight`,
the fraction of the stage's *examples* (conversations / pairs; `data.post_weight_unit: examples`, the default) or
of its *training tokens* (`tokens`: for SFT the labelled assistant tokens, for DPO the completion tokens of both
sides). `data.sft_path` / `data.dpo_path` remain a single source of weight 1 (and are read exactly as before);
giving a path and sources together is an error. A source's `role` (main | safety | hallucination) says what counts
towards the safety + hallucination share, which the Phi-4 report keeps at 1-5% of each DPO round (Table 9
caption); a declared DPO mixture outside that range is WARNED about (logged, and flagged in the metrics), not refused.

Order (`Interleave`): position n of the stage's example stream goes to the source with the largest deficit
w_s (D + c_s) - d_s, where D is what all sources drew so far, d_s what source s drew, and c_s the cost of source
s's next example (1 for examples, its training tokens for tokens); ties go to the earlier source. For examples that
is w_s (n + 1) - d_s and every prefix holds w_s n of each source to within one example (within 1% from 100 on);
for tokens, every source's drawn tokens stay within about one example of w_s D. Each source walks its own
permutation of its training examples, seeded by (seed, source name, source epoch), and starts its next epoch when
it runs out (per-source epochs, as in the pretraining mixture). The stream is a pure function of the configuration,
so the resumable state stays the number of samples consumed (data/order.py) plus a fingerprint.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from data.config import POST_ROLES, POST_WEIGHT_UNITS, DataConfig, PostSourceConfig
from data.configfile import ConfigError
from data.mixture import WEIGHT_TOLERANCE, name_key

PAPER_SAFETY_SHARE = (0.01, 0.05)  # safety + hallucination share of a DPO round (Phi-4 report, Table 9 caption)
SAFETY_ROLES = ("safety", "hallucination")
MIX_SALT = 0x3A1C  # separates mixture permutations from the single-file streams seeded with data.seed
CHUNK = 8192  # stream positions computed at a time
CHUNKS_CACHED = 4
EPOCHS_CACHED = 2


def post_sources(data: DataConfig, kind: str) -> list[PostSourceConfig]:
    """The sources of stage `kind` (sft | dpo): the declared list, or the single path as one source of weight 1."""
    path, sources = getattr(data, f"{kind}_path"), getattr(data, f"{kind}_sources")
    if sources:
        return list(sources)
    return [PostSourceConfig(name=kind, path=path, weight=1.0)] if path else []


def check_post_config(data: DataConfig, where: str) -> None:
    """ConfigError naming the key unless the post-training sources are well-formed (files are checked later)."""
    if data.post_weight_unit not in POST_WEIGHT_UNITS:
        raise ConfigError(f"{where}: data.post_weight_unit={data.post_weight_unit!r}; expected one of "
                          f"{list(POST_WEIGHT_UNITS)} (fractions of examples, or of training tokens)")
    for kind in ("sft", "dpo"):
        key, sources = f"data.{kind}_sources", getattr(data, f"{kind}_sources")
        if not sources:
            continue
        if getattr(data, f"{kind}_path"):
            raise ConfigError(f"{where}: both data.{kind}_path and {key} are given; use one (a path is a single "
                              f"source of weight 1)")
        names = [s.name for s in sources]
        if any(not n for n in names):
            raise ConfigError(f"{where}: every entry of {key} needs a name; got {names}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}: {key}: duplicate source names {dup}")
        for s in sources:
            if not s.path:
                raise ConfigError(f"{where}: {key}[{s.name}].path is empty (a jsonl file)")
            if not (math.isfinite(s.weight) and s.weight > 0):
                raise ConfigError(f"{where}: {key}[{s.name}].weight={s.weight}; expected a fraction in (0, 1] "
                                  "(remove the source instead of giving it weight 0)")
            if s.role not in POST_ROLES:
                raise ConfigError(f"{where}: {key}[{s.name}].role={s.role!r}; expected one of {list(POST_ROLES)}")
        total = sum(s.weight for s in sources)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            listing = ", ".join(f"{s.name}={s.weight:g}" for s in sources)
            raise ConfigError(f"{where}: {key} weights sum to {total:.6g}, expected 1 (fractions of the stage's "
                              f"{data.post_weight_unit}): {listing}")


def safety_share(sources: list[PostSourceConfig]) -> float:
    """The configured weight of the safety and hallucination sources together."""
    return float(sum(s.weight for s in sources if s.role in SAFETY_ROLES))


def dpo_share_warning(data: DataConfig) -> str | None:
    """The warning for a declared DPO mixture whose safety + hallucination share is outside the paper's 1-5%.

    A single `dpo_path` declares no share (its file may hold such pairs), so it gets no warning."""
    if not data.dpo_sources:
        return None
    share = safety_share(data.dpo_sources)
    lo, hi = PAPER_SAFETY_SHARE
    if lo - WEIGHT_TOLERANCE <= share <= hi + WEIGHT_TOLERANCE:
        return None
    return (f"data.dpo_sources: safety + hallucination share is {100 * share:.3g}% of the {data.post_weight_unit} "
            f"(roles {list(SAFETY_ROLES)}), outside the Phi-4 report's 1-5% per DPO round (Table 9 caption)")


class SourceWalk:
    """One source's k-th draw -> its example: epoch k // n is a permutation seeded by (seed, name, epoch).

    tokens: the training tokens of every example of the source (indexed by example id); by_tokens: whether a draw
    costs its tokens (data.post_weight_unit=tokens) or 1."""

    def __init__(self, name: str, train_ids: np.ndarray, tokens: np.ndarray, seed: int, by_tokens: bool):
        self.name, self.train_ids, self.tokens, self.seed = name, np.asarray(train_ids), np.asarray(tokens), seed
        self.by_tokens, self.n = by_tokens, len(self.train_ids)
        self.epoch_tokens = int(self.tokens[self.train_ids].sum())
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, e: int) -> np.ndarray:
        if e in self._perms:
            self._perms.move_to_end(e)
            return self._perms[e]
        rng = np.random.default_rng([self.seed, MIX_SALT, name_key(self.name), e])
        self._perms[e] = rng.permutation(self.train_ids)
        if len(self._perms) > EPOCHS_CACHED:
            self._perms.popitem(last=False)
        return self._perms[e]

    def example(self, k: int) -> int:
        e, j = divmod(int(k), self.n)
        return int(self.permutation(e)[j])

    def cost(self, k: int) -> int:
        """What the k-th draw counts in the weight unit: 1 example, or its training tokens."""
        return int(self.tokens[self.example(k)]) if self.by_tokens else 1

    def tokens_drawn(self, draws: int) -> int:
        """Training tokens of the source's first `draws` draws."""
        e, j = divmod(int(draws), self.n)
        return e * self.epoch_tokens + int(self.tokens[self.permutation(e)[:j]].sum())


class Interleave:
    """The deficit interleaving of the module docstring: stream position -> (source, its k-th draw)."""

    def __init__(self, weights, walks: list[SourceWalk]):
        self.weights = [float(w) for w in weights]
        self.walks = walks
        zeros = tuple(0 for _ in walks)
        self._starts = [(zeros, zeros)]  # (draws, cost drawn) per source before each computed chunk
        self._chunks: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _build(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        drawn, spent = list(self._starts[c][0]), list(self._starts[c][1])
        w, walks, S = self.weights, self.walks, len(self.weights)
        src, kth, cost = (np.empty(CHUNK, dtype=np.int64) for _ in range(3))
        nxt = [walks[s].cost(drawn[s]) for s in range(S)]
        total = sum(spent)
        for p in range(CHUNK):
            best, pick = -math.inf, 0
            for s in range(S):
                deficit = w[s] * (total + nxt[s]) - spent[s]
                if deficit > best:  # strict: ties keep the earlier source
                    best, pick = deficit, s
            src[p], kth[p], cost[p] = pick, drawn[pick], nxt[pick]
            spent[pick] += nxt[pick]
            total += nxt[pick]
            drawn[pick] += 1
            nxt[pick] = walks[pick].cost(drawn[pick])
        if c + 1 == len(self._starts):
            self._starts.append((tuple(drawn), tuple(spent)))
        return src, kth, cost

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, k-th draw of that source, cost) of the positions of chunk c."""
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        for earlier in range(len(self._starts) - 1, c):  # every chunk starts where the one before ended
            self._build(earlier)
        arrays = self._build(c)
        self._chunks[c] = arrays
        if len(self._chunks) > CHUNKS_CACHED:
            self._chunks.popitem(last=False)
        return arrays

    def at(self, n: int) -> tuple[int, int]:
        """Stream position n -> (source, the source's example id)."""
        c, j = divmod(int(n), CHUNK)
        src, kth, _ = self.chunk(c)
        s = int(src[j])
        return s, self.walks[s].example(int(kth[j]))

    def drawn_before(self, n: int) -> np.ndarray:
        """(S,) int64 draws per source over stream positions [0, n)."""
        c, j = divmod(int(n), CHUNK)
        src = self.chunk(c)[0]
        return np.asarray(self._starts[c][0], dtype=np.int64) + np.bincount(src[:j], minlength=len(self.walks))
