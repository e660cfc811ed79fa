"""MixtureLoader: resume, rank layout, exactly-once epochs, ratios, packing, selection, held-out (CPU, tiny)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.loader import LoaderError, MixtureLoader
from data.mixture import epoch_entries
from data.shards import ShardWriter
from data.tokenizer import EOD_ID as EOD
from data.tokenizer import IGNORE_INDEX
from model.transformer import position_ids_from_cu_seqlens

FIELDS = ("input_ids", "labels", "position_ids", "cu_seqlens")


def encode(sid: int, doc: int, j: int) -> int:
    """Token j of document `doc` of source `sid`: unique, never the eod."""
    return 200_000 + sid * 10_000_000 + doc * 1_000 + j


def decode(tok: int) -> tuple[int, int, int] | None:
    if tok == EOD:
        return None
    v = tok - 200_000
    return v // 10_000_000, (v % 10_000_000) // 1_000, v % 1_000


def make_source(path, sid: int, lengths, provenance="organic", name=None) -> str:
    """A prepared source whose document d has lengths[d] tokens (eod included), written by the real ShardWriter."""
    w = ShardWriter(path, name or f"s{sid}", provenance, "test-tokenizer", shard_tokens=97)  # several shards
    for d, n in enumerate(lengths):
        w.add([encode(sid, d, j) for j in range(n - 1)] + [EOD])
    w.close()
    return str(path)


def lengths_for(sid: int, n_docs: int, lo=2, hi=40) -> list[int]:
    return [int(x) for x in np.random.default_rng(sid).integers(lo, hi, n_docs)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    spec = {0: ("synthetic", 60), 1: ("organic", 45), 2: ("organic", 30)}
    paths = {sid: make_source(root / f"s{sid}", sid, lengths_for(sid, n), prov) for sid, (prov, n) in spec.items()}
    return root, paths


def mixture(corpus, weights=(0.5, 0.3, 0.2), **kw) -> DataConfig:
    _, paths = corpus
    provs = ("synthetic", "organic", "organic")
    return DataConfig(sources=[SourceConfig(name=f"s{i}", provenance=provs[i], path=paths[i], weight=w)
                               for i, w in enumerate(weights)], **kw)


def rows(batch) -> list[dict]:
    """Split a micro-batch into per-row fields (cu_seqlens re-based to the row) for layout-free comparison."""
    T = batch["input_ids"].shape[1]
    cu = batch["cu_seqlens"].long()
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = cu[(cu >= r * T) & (cu <= (r + 1) * T)] - r * T
        out.append({"input_ids": batch["input_ids"][r], "labels": batch["labels"][r],
                    "position_ids": batch["position_ids"][r], "cu_seqlens": seg})
    return out


def assert_batches_equal(a, b):
    for k in FIELDS:
        assert torch.equal(a[k], b[k]), k
    assert a["max_seqlen"] == b["max_seqlen"] and a["source_tokens"] == b["source_tokens"]


@pytest.mark.parametrize("doc_masking", [True, False])
def test_resume_yields_the_same_next_batches(corpus, doc_masking):
    cfg = mixture(corpus)
    for rank in range(2):
        make = lambda: MixtureLoader(cfg, 16, 2, 8, rank, 2, doc_masking=doc_masking)  # A = 2
        ref = make()
        for _ in range(3):  # stop in the middle of a step
            next(ref)
        state = ref.state_dict()
        assert state["samples_consumed"] == 8 + 4  # one step of 8 + one micro-batch of 2 ranks x 2
        restored = make()
        restored.load_state_dict(state)
        assert restored.tokens_by_source() == ref.tokens_by_source()
        for _ in range(40):  # crosses several epochs of the 30-document source
            assert_batches_equal(next(ref), next(restored))


def test_resume_on_a_different_world_size_keeps_the_global_order(corpus):
    cfg = mixture(corpus)
    ref = MixtureLoader(cfg, 16, 4, 8, 0, 1)  # W=1, b=4, A=2
    expected = [row for _ in range(12) for row in rows(next(ref))]  # 6 steps x 8 samples

    def step_rows(loaders):
        """One optimizer step: micro-batch m of every rank r, in (m, r) order = the global batch's order."""
        out = []
        for _ in range(loaders[0].grad_accum):
            for ld in loaders:
                out += rows(next(ld))
        return out

    two = [MixtureLoader(cfg, 16, 2, 8, r, 2) for r in range(2)]  # W=2, b=2, A=2
    got = step_rows(two) + step_rows(two)
    states = [ld.state_dict() for ld in two]
    assert states[0] == states[1]  # every rank saves the same global state
    four = [MixtureLoader(cfg, 16, 1, 8, r, 4) for r in range(4)]  # W=4, b=1, A=2
    for ld in four:
        ld.load_state_dict(states[0])
    for _ in range(4):
        got += step_rows(four)
    assert len(got) == len(expected) == 48
    for g, e in zip(got, expected):
        for k in FIELDS:
            assert torch.equal(g[k], e[k]), k


def test_every_document_once_per_epoch_across_two_ranks_and_a_resume(corpus):
    cfg = mixture(corpus)
    T, b, W, G = 16, 2, 2, 8
    loaders = [MixtureLoader(cfg, T, b, G, r, W, doc_masking=False) for r in range(W)]
    seen = []  # (global sample index, input row, labels row)

    def run(n_micro):
        for n in range(n_micro):  # n: micro-batches since the loaders were built (or restored)
            for ld in loaders:
                first = ld.sample_index(n)
                batch = next(ld)
                for j in range(b):
                    seen.append((first + j, batch["input_ids"][j].tolist(), batch["labels"][j].tolist()))

    run(9)
    state = loaders[0].state_dict()
    loaders = [MixtureLoader(cfg, T, b, G, r, W, doc_masking=False) for r in range(W)]
    for ld in loaders:
        ld.load_state_dict(state)
    run(60)
    indices = sorted(i for i, _, _ in seen)
    assert indices == list(range(len(seen)))  # ranks disjoint, nothing skipped or repeated over the resume

    sched = loaders[0].schedule
    for s, stream in enumerate(loaders[0].streams):
        L = stream.epoch_tokens
        by_stream_pos = {}
        windows = sorted((int(sched.locate(i)[1]), inp, lab) for i, inp, lab in seen if int(sched.locate(i)[0]) == s)
        assert [k for k, _, _ in windows] == list(range(len(windows)))  # the source's windows, each once
        assert len(windows) * T > L  # the draw covered this source's whole first epoch
        for k, inp, lab in windows:
            assert inp[1:] == lab[:-1]  # labels are the next tokens
            for t, tok in enumerate(inp + lab[-1:]):  # stream positions kT .. kT+T (one token of overlap)
                assert by_stream_pos.setdefault(k * T + t, tok) == tok
        epoch0 = [by_stream_pos[p] for p in range(L)]
        ids = [decode(t) for t in epoch0 if t != EOD]
        assert all(x[0] == s for x in ids)
        counts = Counter((d, j) for _, d, j in ids)
        lengths = stream.lengths
        expected = {(d, j) for d in range(len(lengths)) for j in range(lengths[d] - 1)}
        assert set(counts) == expected and set(counts.values()) == {1}  # every token of every document once
        assert epoch0.count(EOD) == len(lengths)


def test_each_epoch_is_a_fresh_seeded_permutation(corpus):
    cfg = mixture(corpus)
    a, b = MixtureLoader(cfg, 16, 1, 1), MixtureLoader(cfg, 16, 1, 1)
    other = MixtureLoader(mixture(corpus, seed=99), 16, 1, 1)
    for s in range(3):
        e0, e1 = a.streams[s].epoch(0)[0], a.streams[s].epoch(1)[0]
        n = len(a.streams[s].lengths)
        assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(n))
        assert not np.array_equal(e0, e1)
        assert np.array_equal(e1, b.streams[s].epoch(1)[0])  # deterministic
        assert not np.array_equal(e0, other.streams[s].epoch(0)[0])  # seeded


def test_drawn_fractions_hold_at_every_checkpoint_of_a_long_draw(corpus):
    weights = (0.55, 0.3, 0.15)
    ld = MixtureLoader(mixture(corpus, weights), 16, 4, 16, 0, 1)
    drawn = Counter()
    for step in range(1, 501):  # 2000 micro-batches = 8000 samples
        for _ in range(ld.grad_accum):
            drawn.update(next(ld)["source_tokens"])
        counters = ld.tokens_by_source()
        assert counters == dict(drawn)  # the counters are the tokens actually handed out
        total = sum(counters.values())
        assert total == step * 16 * 16
        if step * 16 >= 200:
            for name, w in zip(ld.names, weights):
                assert abs(counters[name] / total - w) <= 0.01, (step, name)
    prov = ld.tokens_by_provenance()
    assert prov["synthetic"] == counters["s0"] and prov["organic"] == counters["s1"] + counters["s2"]
    assert abs(prov["synthetic"] / total - 0.55) < 1e-3
    state = ld.state_dict()
    again = MixtureLoader(mixture(corpus, weights), 16, 4, 16, 0, 1)
    again.load_state_dict(state)
    assert again.tokens_by_provenance() == prov


def expected_stream(loader, s, sid, n_tokens):
    """Source s's stream (written with id sid) built by hand from its epoch orders: tokens, doc-start flags."""
    toks, start = [], []
    e = 0
    while len(toks) < n_tokens:
        for d in loader.streams[s].epoch(e)[0]:
            n = int(loader.streams[s].lengths[d])
            toks += [encode(sid, int(d), j) for j in range(n - 1)] + [EOD]
            start += [True] + [False] * (n - 1)
        e += 1
    return toks, start


@pytest.mark.parametrize("doc_masking", [True, False])
def test_packing_token_by_token(corpus, doc_masking):
    T, B = 24, 3
    cfg = DataConfig(sources=[SourceConfig(name="s2", path=corpus[1][2], weight=1.0)], seed=7)
    ld = MixtureLoader(cfg, T, B, B, doc_masking=doc_masking)
    toks, start = expected_stream(ld, 0, 2, 12 * B * T + 1)
    for n in range(12):
        batch = next(ld)
        cu = batch["cu_seqlens"].tolist()
        exp_cu, exp_max = [], 0
        for r in range(B):
            k = n * B + r
            inp, lab, pos = (batch[f][r].tolist() for f in ("input_ids", "labels", "position_ids"))
            assert inp == toks[k * T:k * T + T]
            p = 0
            for t in range(T):
                g = k * T + t  # stream position of input t
                if doc_masking and t > 0 and start[g]:
                    p = 0
                    exp_cu.append(r * T + t)
                if t == 0:
                    exp_cu.append(r * T)
                assert pos[t] == (p if doc_masking else t), (n, r, t)
                crosses = start[g + 1]  # the target is the first token of the next document
                assert lab[t] == (IGNORE_INDEX if doc_masking and crosses else toks[g + 1]), (n, r, t)
                if doc_masking and crosses:
                    assert inp[t] == EOD  # only an eod's target is dropped; the eod itself is predicted
                p += 1
        exp_cu.append(B * T)
        assert cu == exp_cu
        assert batch["max_seqlen"] == max(np.diff(exp_cu))
        assert batch["cu_seqlens"].dtype == torch.int32 and batch["input_ids"].dtype == torch.int64
        # The model derives the same positions from cu_seqlens: loader and attention agree on segments.
        assert torch.equal(position_ids_from_cu_seqlens(batch["cu_seqlens"], B, T), batch["position_ids"])
    if doc_masking:
        assert any(IGNORE_INDEX in next(ld)["labels"].tolist()[0] for _ in range(5))


def test_midtraining_selection_keeps_long_documents_and_upweights(tmp_path):
    lengths = [5, 21, 22, 30, 41, 60, 50, 12, 45, 80]  # text tokens = length - 1
    path = make_source(tmp_path / "long", 0, lengths)
    src = SourceConfig(name="long", path=path, weight=1.0, min_doc_tokens=20, upweight_min_tokens=40,
                       upweight_factor=2.0)
    ld = MixtureLoader(DataConfig(sources=[src]), 16, 1, 1, doc_masking=False)
    stream = ld.streams[0]
    # kept: text > 20 -> docs 2 (21), 3, 4, 5, 6, 8, 9; up-weighted: text >= 40 -> docs 4 (40), 5, 6, 8, 9
    want = {2: 1, 3: 1, 4: 2, 5: 2, 6: 2, 8: 2, 9: 2}
    assert Counter(stream.epoch(0)[0].tolist()) == want
    L = stream.epoch_tokens
    assert L == sum(lengths[d] * c for d, c in want.items())
    # Read epoch 0 through the loader's windows and count each document's eods.
    toks = []
    for i in range(L // 16 + 1):
        toks += ld.window(i)[1][:16].tolist()
    seen = Counter()
    for t in toks[:L]:
        if t != EOD:
            seen[decode(t)[1]] += 1
    assert dict(seen) == {d: c * (lengths[d] - 1) for d, c in want.items()}
    # A fractional factor rounds deterministically along the up-weighted documents in index order.
    frac = SourceConfig(name="x", weight=1.0, min_doc_tokens=20, upweight_min_tokens=40, upweight_factor=1.5)
    e = epoch_entries(np.asarray(lengths, dtype=np.int64), frac)
    assert Counter(e.tolist()) == {2: 1, 3: 1, 4: 1, 5: 2, 6: 1, 8: 2, 9: 1}  # floor(5 x 1.5) = 7 copies


def test_held_out_documents_never_train(corpus):
    cfg = mixture(corpus, held_out_fraction=0.2)
    ld = MixtureLoader(cfg, 16, 2, 4, 0, 1, doc_masking=False)
    held = {s: set(range(len(st.lengths))) - set(st.entries.tolist()) for s, st in enumerate(ld.streams)}
    assert [len(h) for h in held.values()] == [12, 9, 6]
    for _ in range(150):  # several epochs of every source
        for t in next(ld)["input_ids"].flatten().tolist():
            if t != EOD:
                sid, d, _ = decode(t)
                assert d not in held[sid]
    for s, name in enumerate(ld.names):
        assert ld.held_out_windows(name) > 0
        first = list(ld.held_out_batches(name, 3))
        assert [torch.equal(a["input_ids"], b["input_ids"]) for a, b in
                zip(first, ld.held_out_batches(name, 3))] == [True] * len(first)  # the same at every call
        for batch in first:
            assert {decode(t)[1] for t in batch["input_ids"].flatten().tolist() if t != EOD} <= held[s]
    # Two ranks: the same number of batches, disjoint windows.
    ranks = [MixtureLoader(cfg, 16, 2, 4, r, 2) for r in range(2)]
    got = [list(r.held_out_batches("s0", 100)) for r in ranks]
    assert len(got[0]) == len(got[1]) == ld.held_out_windows("s0") // 4
    assert not torch.equal(got[0][0]["input_ids"], got[1][0]["input_ids"])
    # A long-context selection of the same directory holds out the same documents.
    long_src = SourceConfig(name="long_s0", provenance="synthetic", path=corpus[1][0], weight=1.0, min_doc_tokens=20)
    mid = MixtureLoader(DataConfig(sources=[long_src], held_out_fraction=0.2), 16, 1, 1)
    assert not set(mid.streams[0].entries.tolist()) & held[0]


def test_a_changed_mixture_is_refused(corpus, tmp_path):
    ld = MixtureLoader(mixture(corpus), 16, 2, 4)
    next(ld)
    state = ld.state_dict()
    with pytest.raises(LoaderError, match="weights"):
        MixtureLoader(mixture(corpus, (0.4, 0.4, 0.2)), 16, 2, 4).load_state_dict(state)
    with pytest.raises(LoaderError, match="seed"):
        MixtureLoader(mixture(corpus, seed=5), 16, 2, 4).load_state_dict(state)
    with pytest.raises(LoaderError, match="seq_len"):
        MixtureLoader(mixture(corpus), 32, 2, 4).load_state_dict(state)
    changed = mixture(corpus)
    changed.sources[2].path = make_source(tmp_path / "other", 2, [5, 6, 7, 8])  # same name, other data
    with pytest.raises(LoaderError, match="shards or selection"):
        MixtureLoader(changed, 16, 2, 4).load_state_dict(state)
    ok = MixtureLoader(mixture(corpus), 16, 1, 4, 1, 2, doc_masking=False)  # another layout is fine
    ok.load_state_dict(state)
    assert ok.samples_consumed == 2


def test_bad_setups_fail_with_clear_errors(corpus):
    with pytest.raises(ValueError, match="s0=0.5, s1=0.3, s2=0.3"):
        MixtureLoader(mixture(corpus, (0.5, 0.3, 0.3)), 16, 1, 1)
    plan = DataConfig(sources=[SourceConfig(name="web", weight=1.0, unique_tokens=10)])
    with pytest.raises(LoaderError, match="'web' has no path"):
        MixtureLoader(plan, 16, 1, 1)
    wrong = mixture(corpus)
    wrong.sources[0].provenance = "organic"
    with pytest.raises(LoaderError, match="provenance"):
        MixtureLoader(wrong, 16, 1, 1)
    with pytest.raises(LoaderError, match="not divisible"):
        MixtureLoader(mixture(corpus), 16, 2, 6, 0, 2)
    too_long = mixture(corpus)
    too_long.sources[1].min_doc_tokens = 10_000
    with pytest.raises(LoaderError, match="'s1'.*no training documents"):
        MixtureLoader(too_long, 16, 1, 1)
