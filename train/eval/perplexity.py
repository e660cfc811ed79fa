"""Perplexity per source (prepared shards or jsonl text), token-weighted, aggregated per provenance (synthetic vs
organic): each document is scored alone, in windows of seq_len, every token after its first once."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from data.tokenizer import EOD_ID, IGNORE_INDEX, PAD_ID
from train.config import ConfigError
from train.eval.config import EvalConfig, PerplexitySource
from train.eval.tasks import _max_len, read_jsonl, shard_indices


# ---- perplexity -------------------------------------------------------------------------------------------------
def perplexity_documents(src: PerplexitySource, tok) -> tuple[str, list[np.ndarray]]:
    """(provenance, token arrays each ending with eod) of the documents a source contributes."""
    path = Path(src.path)
    if path.is_dir():
        from data.mixture import held_out_mask
        from data.shards import ShardedSource

        sharded = ShardedSource(path)
        if src.provenance and src.provenance != sharded.provenance:
            raise ConfigError(f"perplexity source {src.name}: provenance {src.provenance!r} but "
                              f"{path}/manifest.json says {sharded.provenance!r}")
        provenance = sharded.provenance
        doc_ids = range(sharded.num_docs)
        if src.held_out_fraction > 0:
            doc_ids = np.flatnonzero(held_out_mask(sharded.num_docs, src.held_out_fraction, src.seed)).tolist()
        docs = (np.asarray(sharded.doc(int(i)), dtype=np.int64) for i in doc_ids)
    else:
        if not src.provenance:
            raise ConfigError(f"perplexity source {src.name}: a jsonl source needs provenance (synthetic|organic)")
        provenance = src.provenance
        rows = read_jsonl(path, (src.text_field,))
        docs = (np.array(tok.encode(r[src.text_field]) + [EOD_ID], dtype=np.int64) for r in rows)
    out, tokens = [], 0  # tokens = predicted tokens (a document's first is never predicted)
    for d in docs:
        if (src.max_docs and len(out) >= src.max_docs) or (src.max_tokens and tokens >= src.max_tokens):
            break
        if src.max_tokens:
            d = d[:src.max_tokens - tokens + 1]  # the last document may be cut to land on the cap
        if len(d) >= 2:
            out.append(d)
            tokens += len(d) - 1
    return provenance, out


@torch.no_grad()
def document_nll(model, docs: list[np.ndarray], seq_len: int, batch_size: int, device) -> list[tuple[float, int]]:
    """(summed NLL in nats, predicted tokens) of each document, scored alone in windows of seq_len inputs (windows
    overlap by one token, so every token but a document's first is predicted once)."""
    windows = [(k, d[s:s + seq_len + 1]) for k, d in enumerate(docs) for s in range(0, len(d) - 1, seq_len)]
    windows.sort(key=lambda w: len(w[1]), reverse=True)
    per_doc = [[] for _ in docs]
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        T = len(batch[0][1]) - 1
        ids = torch.full((len(batch), T), PAD_ID, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for r, (_, w) in enumerate(batch):
            ids[r, :len(w) - 1] = torch.from_numpy(w[:-1])
            labels[r, :len(w) - 1] = torch.from_numpy(w[1:])
        nll = model(ids.to(device), labels=labels.to(device), reduction="none").double().sum(dim=-1)
        for r, (k, w) in enumerate(batch):
            per_doc[k].append(float(nll[r]))
    return [(math.fsum(parts), len(d) - 1) for parts, d in zip(per_doc, docs)]


def eval_perplexity(model, tok, sources: list[PerplexitySource], cfg: EvalConfig, device,
                    shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """One record per source (its documents' NLL as samples), then one per provenance (token-weighted)."""
    records = []
    for src in sources:
        t0 = time.perf_counter()
        provenance, docs = perplexity_documents(src, tok)
        indices = shard_indices(len(docs), shard)
        scored = document_nll(model, [docs[k] for k in indices], _max_len(model, cfg), cfg.batch_size, device)
        samples = [{"index": k, "nll": nll, "tokens": n} for k, (nll, n) in zip(indices, scored)]
        records.append({"task": src.name, "kind": "perplexity", "metrics": ppl_metrics(src, samples),
                        "provenance": provenance, "samples": samples, "time_s": time.perf_counter() - t0})
    return records + provenance_records(records)


def ppl_metrics(src: PerplexitySource | None, samples: list[dict]) -> dict:
    """NLL per token (exact sum, so any shard split gives the same), perplexity, tokens, documents."""
    nll, n = math.fsum(s["nll"] for s in samples), sum(s["tokens"] for s in samples)
    mean = nll / n if n else float("nan")
    out = {"nll": mean, "perplexity": math.exp(mean) if n else float("nan"), "tokens": n}
    return {**out, "documents": len(samples)} if src is not None else out


def provenance_records(records: list[dict]) -> list[dict]:
    """One record per provenance: its sources' documents together (token-weighted)."""
    by_prov: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == "perplexity":
            by_prov.setdefault(r["provenance"], []).append(r)
    return [{"task": prov, "kind": "perplexity_by_provenance",
             "metrics": ppl_metrics(None, [s for r in rs for s in r["samples"]]), "sources": [r["task"] for r in rs]}
            for prov, rs in sorted(by_prov.items())]
