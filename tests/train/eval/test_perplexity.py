"""Perplexity per source and per provenance (train/eval/perplexity.py) against the full-logit NLL by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.configfile import ConfigError
from data.tokenizer import EOD_ID
from tests.helpers.eval_models import full_logit_logprob, random_model
from tests.helpers.files import write_jsonl
from train.eval.config import EvalConfig, PerplexitySource
from train.eval.perplexity import eval_perplexity, perplexity_documents

CPU = torch.device("cpu")


def test_perplexity_matches_direct_computation(tok, tmp_path):
    """Token-weighted NLL per source (jsonl and shards, held-out only) == exp-mean of the full-logit NLL by hand."""
    from data.mixture import held_out_mask
    from data.shards import ShardWriter

    model = random_model(2)
    texts_a = ["The quick brown fox jumps over the lazy dog. " * k for k in (1, 3, 9)]
    texts_b = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n" * 6]
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts_a])
    b = write_jsonl(tmp_path / "b.jsonl", [{"body": t} for t in texts_b])
    rng = np.random.default_rng(0)
    shard_docs = [[int(t) for t in rng.integers(0, 5000, n)] + [EOD_ID] for n in (5, 60, 17, 33, 90, 8, 41, 12)]
    writer = ShardWriter(tmp_path / "org", "org", "organic", tok.fingerprint, shard_tokens=100)
    for d in shard_docs:
        writer.add(d)
    writer.close()
    seq_len = 32  # documents longer than this are scored in windows
    cfg = EvalConfig(batch_size=3, seq_len=seq_len, perplexity=[
        PerplexitySource(name="a", path=a, provenance="synthetic"),
        PerplexitySource(name="b", path=b, provenance="synthetic", text_field="body"),
        PerplexitySource(name="org", path=str(tmp_path / "org"), held_out_fraction=0.3, seed=7)])
    records = {r["task"]: r for r in eval_perplexity(model, tok, cfg.perplexity, cfg, CPU)}

    def by_hand(docs):
        total, count = 0.0, 0
        for d in docs:
            for s in range(0, len(d) - 1, seq_len):
                w = d[s:s + seq_len + 1]
                total -= full_logit_logprob(model, w, 1)
                count += len(w) - 1
        return total, count

    held = np.flatnonzero(held_out_mask(len(shard_docs), 0.3, 7))
    assert 0 < len(held) < len(shard_docs)
    expected = {"a": by_hand([tok.encode(t) + [EOD_ID] for t in texts_a]),
                "b": by_hand([tok.encode(t) + [EOD_ID] for t in texts_b]),
                "org": by_hand([shard_docs[i] for i in held])}
    for name, (nll, n) in expected.items():
        m = records[name]["metrics"]
        assert m["tokens"] == n
        assert m["nll"] == pytest.approx(nll / n, rel=1e-5)
        assert m["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert records["org"]["provenance"] == "organic" and records["org"]["metrics"]["documents"] == len(held)
    syn = records["synthetic"]["metrics"]  # token-weighted over a and b
    (na, ca), (nb, cb) = expected["a"], expected["b"]
    assert syn["tokens"] == ca + cb and syn["nll"] == pytest.approx((na + nb) / (ca + cb), rel=1e-5)
    assert records["organic"]["metrics"]["nll"] == pytest.approx(records["org"]["metrics"]["nll"])
    # a token cap cuts the last document and stops
    capped = PerplexitySource(name="a", path=a, provenance="synthetic", max_tokens=30)
    _, docs = perplexity_documents(capped, tok)
    assert sum(len(d) - 1 for d in docs) == 30
    with pytest.raises(ConfigError, match="provenance"):
        perplexity_documents(PerplexitySource(name="a", path=a), tok)
