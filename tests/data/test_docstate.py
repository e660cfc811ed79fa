"""Large-source loader state: memory-mapped once-built arrays, the block-wise epoch order, resume (CPU, tiny)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.docstate import MappedStream
from data.loader import LoaderError, MixtureLoader, SourceStream
from data.shards import ShardedSource
from data.tokenizer import EOD_ID as EOD
from tests.data.test_loader import FIELDS, assert_batches_equal, decode, lengths_for, make_source, rows

BLOCK = 7  # 45 and 60 documents: several blocks, the last one short


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocked")
    spec = {0: ("synthetic", 60), 1: ("organic", 45)}
    return {sid: make_source(root / f"s{sid}", sid, lengths_for(sid, n), prov) for sid, (prov, n) in spec.items()}


def mixture(corpus, weights=(0.6, 0.4), **kw) -> DataConfig:
    provs = ("synthetic", "organic")
    return DataConfig(sources=[SourceConfig(name=f"s{i}", provenance=provs[i], path=corpus[i], weight=w)
                               for i, w in enumerate(weights)], **kw)


def loader(cfg, state_dir, *args, **kw) -> MixtureLoader:
    return MixtureLoader(cfg, *args, state_dir=str(state_dir), blocked_min_docs=1, block_docs=BLOCK, **kw)


def stream_epoch_docs(stream, e) -> list[int]:
    """Documents of epoch e as the stream's tokens show them (read through `read`, not through `epoch`)."""
    L = stream.epoch_tokens
    out = np.empty(L, dtype=np.int64)
    starts = stream.read(e * L, L, out)
    docs = [decode(int(out[s]))[1] if out[s] != EOD else None for s in starts]
    # every document starts at a recorded start and ends with its eod right before the next start
    assert starts[0] == 0 and all(out[s - 1] == EOD for s in starts[1:]) and out[-1] == EOD
    return docs


def test_state_is_built_once_and_memory_mapped(corpus, tmp_path):
    cfg = mixture(corpus)
    ld = loader(cfg, tmp_path, 16, 1, 1)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 2 and all((f / "meta.json").is_file() for f in folders)  # one per source
    mtimes = {p: p.stat().st_mtime_ns for f in folders for p in f.glob("*.npy")}
    again = loader(cfg, tmp_path, 16, 1, 1)  # a second rank: maps what the first wrote
    assert {p: p.stat().st_mtime_ns for f in folders for p in f.glob("*.npy")} == mtimes
    for st in again.streams + list(again._held_out.values()):
        assert isinstance(st, MappedStream)
        for arr in (st.entries, st.cum):
            assert isinstance(arr, np.memmap) and not arr.flags.writeable  # mapped, not a copy in RAM
    # the arrays are the training selection: every document once (no selection, no held-out here)
    assert sorted(np.asarray(ld.streams[1].entries).tolist()) == list(range(45))
    lengths = ShardedSource(corpus[1]).doc_lengths()
    assert np.array_equal(np.diff(np.asarray(ld.streams[1].cum)), lengths)
    assert ld.streams[1].epoch_tokens == int(lengths.sum())


def test_threshold_picks_the_scheme_and_small_sources_keep_their_fingerprint(corpus, tmp_path):
    cfg = mixture(corpus)
    old = MixtureLoader(cfg, 16, 1, 1)  # defaults: both sources far below BLOCKED_MIN_DOCS
    assert all(isinstance(s, SourceStream) for s in old.streams)
    mixed = MixtureLoader(cfg, 16, 1, 1, state_dir=str(tmp_path), blocked_min_docs=50, block_docs=BLOCK)
    assert [type(s) for s in mixed.streams] == [MappedStream, SourceStream]  # 60 >= 50 > 45 documents
    assert MixtureLoader(cfg, 16, 1, 1, blocked_min_docs=61).fingerprint == old.fingerprint
    assert mixed.fingerprint != old.fingerprint  # a resume across a scheme change is refused
    with pytest.raises(LoaderError, match="fingerprint"):
        mixed.load_state_dict(old.state_dict())
    with pytest.raises(LoaderError, match="'s0'.*writable state_dir"):
        MixtureLoader(cfg, 16, 1, 1, state_dir="/proc/no_such_dir", blocked_min_docs=1)


def test_each_document_once_per_block_permuted_epoch(corpus, tmp_path):
    ld = loader(mixture(corpus), tmp_path, 16, 1, 1)
    for s, n in ((0, 60), (1, 45)):
        st = ld.streams[s]
        assert st.num_blocks == -(-n // BLOCK)
        epochs = [stream_epoch_docs(st, e) for e in range(3)]
        for e, docs in enumerate(epochs):
            assert sorted(docs) == list(range(n))  # each document exactly once per epoch
            assert docs == st.epoch(e)[0].tolist()  # `epoch` describes what `read` produces
            # blocked: consecutive runs of the epoch are whole blocks of entries (ids b*BLOCK ..)
            order = st.epoch_blocks(e)[0]
            pos = 0
            for b in order:
                size = min(BLOCK, n - b * BLOCK)
                assert sorted(docs[pos:pos + size]) == list(range(b * BLOCK, b * BLOCK + size))
                pos += size
        assert epochs[0] != epochs[1] != epochs[2]
        assert epochs[0] != sorted(epochs[0])  # shuffled, not the index order


def test_order_is_a_pure_function_of_seed_source_and_epoch(corpus, tmp_path):
    a = loader(mixture(corpus), tmp_path / "a", 16, 1, 1)
    b = loader(mixture(corpus), tmp_path / "b", 16, 1, 1)  # built again elsewhere: the same arrays
    other_seed = loader(mixture(corpus, seed=99), tmp_path / "c", 16, 1, 1)
    swapped = DataConfig(sources=list(reversed(mixture(corpus).sources)))  # list order and weights do not matter
    c = loader(swapped, tmp_path / "a", 16, 1, 1)
    for e in range(3):
        for s in range(2):
            assert np.array_equal(a.streams[s].epoch(e)[0], b.streams[s].epoch(e)[0])
            assert np.array_equal(a.streams[s].epoch(e)[0], c.streams[1 - s].epoch(e)[0])
            assert not np.array_equal(a.streams[s].epoch(e)[0], other_seed.streams[s].epoch(e)[0])
    for _ in range(20):
        assert_batches_equal(next(a), next(b))


@pytest.mark.parametrize("doc_masking", [True, False])
def test_resume_and_world_size_give_the_same_batches(corpus, tmp_path, doc_masking):
    cfg = mixture(corpus)
    ref = loader(cfg, tmp_path, 16, 4, 8, 0, 1, doc_masking=doc_masking)  # W=1, b=4, A=2
    expected = [row for _ in range(80) for row in rows(next(ref))]  # 40 steps: 2-3 epochs of each source
    two = [loader(cfg, tmp_path, 16, 2, 8, r, 2, doc_masking=doc_masking) for r in range(2)]
    got = []
    for _ in range(3 * two[0].grad_accum):  # 3 steps on W=2
        for ld in two:
            got += rows(next(ld))
    state = two[0].state_dict()
    assert state == two[1].state_dict()
    four = [loader(cfg, tmp_path, 16, 1, 8, r, 4, doc_masking=doc_masking) for r in range(4)]  # fresh processes
    for ld in four:
        ld.load_state_dict(state)
    for _ in range(37 * four[0].grad_accum):
        for ld in four:
            got += rows(next(ld))
    assert len(got) == len(expected) == 320
    for g, e in zip(got, expected):
        for k in FIELDS:
            assert torch.equal(g[k], e[k]), k


def test_an_epoch_boundary_costs_blocks_not_documents(tmp_path):
    n, block = 3000, 50
    path = make_source(tmp_path / "big", 0, [2 + (d % 3) for d in range(n)])
    ld = MixtureLoader(DataConfig(sources=[SourceConfig(name="big", path=path, weight=1.0)]), 16, 1, 1,
                       state_dir=str(tmp_path / "state"), blocked_min_docs=1, block_docs=block)
    st = ld.streams[0]
    assert st.num_blocks == n // block
    L, out = st.epoch_tokens, np.empty(33, dtype=np.int64)
    st.read(0, 33, out)  # epoch 0 drawn before the first boundary, as in a run
    for e in range(1, 4):
        before = Counter(st.work)
        st.read(e * L - 16, 33, out)  # the last tokens of epoch e-1 and the first of epoch e
        grew = Counter(st.work)
        grew.subtract(before)
        assert grew["epoch"] == st.num_blocks  # one new epoch order: O(blocks)
        assert 0 < grew["block"] <= 2 * block  # the last block of e-1 and the first block of e, nothing of size n
    # Walking a whole epoch window by window draws each block order once and the epoch order once.
    st2 = MixtureLoader(DataConfig(sources=[SourceConfig(name="big", path=path, weight=1.0)]), 16, 1, 1,
                        state_dir=str(tmp_path / "state"), blocked_min_docs=1, block_docs=block).streams[0]
    for k in range(L // 16 + 1):
        st2.read(k * 16, 17, out)
    assert st2.work["epoch"] in (st2.num_blocks, 2 * st2.num_blocks)  # epoch 0 (and 1, if the last window reaches it)
    assert n <= st2.work["block"] <= n + block


def test_held_out_documents_of_a_large_source(corpus, tmp_path):
    cfg = mixture(corpus, held_out_fraction=0.2)
    ld = loader(cfg, tmp_path, 16, 2, 4, 0, 1, doc_masking=False)
    ref = MixtureLoader(cfg, 16, 2, 4, 0, 1, doc_masking=False)  # the old scheme holds out the same documents
    for s in range(2):
        assert sorted(np.asarray(ld.streams[s].entries).tolist()) == ref.streams[s].entries.tolist()
        held = set(np.asarray(ld._held_out[f"s{s}"].entries).tolist())
        assert held == set(range(len(ref.streams[s].lengths))) - set(ref.streams[s].entries.tolist())
        assert ld.held_out_windows(f"s{s}") == ref.held_out_windows(f"s{s}") > 0
        for a, b in zip(ld.held_out_batches(f"s{s}", 5), ref.held_out_batches(f"s{s}", 5)):
            assert_batches_equal(a, b)  # held-out reads the held documents in index order in both schemes
    for _ in range(100):
        for t in next(ld)["input_ids"].flatten().tolist():
            if t != EOD:
                sid, d, _ = decode(t)
                assert d not in set(np.asarray(ld._held_out[f"s{sid}"].entries).tolist())


def test_a_damaged_state_is_named_and_an_incomplete_one_rebuilt(corpus, tmp_path):
    cfg = mixture(corpus)
    loader(cfg, tmp_path, 16, 1, 1)
    ref = loader(cfg, tmp_path / "ref", 16, 1, 1)
    for f in tmp_path.glob("*/train_cum.npy"):
        f.write_bytes(f.read_bytes()[:-8])  # truncated
    with pytest.raises(LoaderError, match="'s0'.*train_cum.npy"):
        loader(cfg, tmp_path, 16, 1, 1)
    for f in tmp_path.glob("*/meta.json"):
        f.unlink()  # a folder without meta.json is incomplete (a builder was killed): rebuilt
    again = loader(cfg, tmp_path, 16, 1, 1)
    for _ in range(10):
        assert_batches_equal(next(ref), next(again))
