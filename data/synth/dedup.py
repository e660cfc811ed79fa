"""Exact and near-duplicate removal among generations: the first record of a group is kept, later ones dropped.

Exact: sha256 of the normalised words (lowercase, punctuation as spaces, as in data.decontaminate). Near: MinHash
over word 5-gram shingles (the n-gram hashes of data.decontaminate) with `num_perm` multiply-shift hash functions,
and LSH with `bands` bands of num_perm/bands rows: a record that shares a band with an earlier one and whose estimated
Jaccard similarity (the fraction of equal signature entries) reaches `threshold` is a near duplicate. Records are
offered in a fixed order (shard, then position), so which one survives never depends on timing.
"""
from __future__ import annotations

import hashlib

import numpy as np

from data.contamination import ngram_hashes, normalize


class Deduper:
    def __init__(self, exact: bool = True, near: bool = True, shingle_words: int = 5, num_perm: int = 128,
                 bands: int = 16, threshold: float = 0.8, seed: int = 0):
        self.exact, self.near = exact, near
        self.shingle_words, self.bands, self.threshold = shingle_words, bands, threshold
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.rows = num_perm // bands
        self.seen_exact: dict[str, str] = {}  # digest -> id of the kept record
        self.buckets: list[dict[bytes, int]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []
        self.ids: list[str] = []

    def signature(self, words: list[str]) -> np.ndarray | None:
        shingles = ngram_hashes(words, self.shingle_words) if len(words) >= self.shingle_words else \
            ngram_hashes(words, max(len(words), 1)) if words else np.zeros(0, np.uint64)
        if len(shingles) == 0:
            return None
        shingles = np.unique(shingles)
        with np.errstate(over="ignore"):  # multiply-shift hashing wraps mod 2**64 by design
            hashed = (shingles[None, :] * self.a[:, None] + self.b[:, None]) >> np.uint64(32)
        return hashed.min(axis=1).astype(np.uint32)

    def check(self, record_id: str, text: str) -> tuple[str, str]:
        """("", "") when `text` is new (and remember it), else ("exact" | "near", id of the record it repeats)."""
        words = normalize(text)
        if self.exact:
            digest = hashlib.sha256(" ".join(words).encode()).hexdigest()
            if digest in self.seen_exact:
                return "exact", self.seen_exact[digest]
        if self.near:
            sig = self.signature(words)
            if sig is not None:
                keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
                candidates = {self.buckets[i][k] for i, k in enumerate(keys) if k in self.buckets[i]}
                for c in sorted(candidates):
                    if float(np.mean(self.signatures[c] == sig)) >= self.threshold:
                        return "near", self.ids[c]
                index = len(self.ids)
                self.signatures.append(sig)
                self.ids.append(record_id)
                for i, k in enumerate(keys):
                    self.buckets[i].setdefault(k, index)
        if self.exact:
            self.seen_exact[digest] = record_id
        return "", ""
