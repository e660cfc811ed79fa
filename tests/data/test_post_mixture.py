"""Weighted SFT / DPO mixtures: shares at every prefix (examples and tokens), the 1-5% DPO warning, config errors,
exact resume, global pair ids, and one source == the single-file loaders byte for byte."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from data.config import DataConfig, PostSourceConfig
from data.configfile import ConfigError
from data.pairs import PairBatches
from data.post_batches import ChatMixture, PairMixture, dpo_batches, sft_batches
from data.post_mixture import Interleave, SourceWalk, check_post_config, dpo_share_warning
from data.sft import ChatBatches
from tests.data.test_sft import conversation, write_chats
from tests.helpers.files import write_jsonl
from train.config import load_config

WEIGHTS = (0.9, 0.07, 0.03)


def pair_rows(n: int, tag: str, long: int = 0) -> list[dict]:
    """Token-id pairs (no tokenizer needed), distinct per tag; `long` adds tokens to vary the lengths."""
    base = sum(map(ord, tag)) % 500
    return [{"prompt_ids": [100264, 882, 100266, 1000 + base + k], "chosen_ids": [2000 + k] * (1 + (k + long) % 4),
             "rejected_ids": [3000 + k] * (1 + (k * 7 + long) % 5)} for k in range(n)]


def walks(lengths: list[np.ndarray], by_tokens: bool, seed: int = 3) -> list[SourceWalk]:
    return [SourceWalk(f"s{i}", np.arange(len(l)), l, seed, by_tokens) for i, l in enumerate(lengths)]


def prefix_shares(order: Interleave, n: int, costs: list[np.ndarray] | None) -> np.ndarray:
    """(n, S) drawn share of each source after every prefix, counted from the positions one by one."""
    S = len(order.walks)
    drawn = np.zeros((n, S))
    for p in range(n):
        s, ex = order.at(p)
        drawn[p, s] = 1 if costs is None else costs[s][ex]
    cum = np.cumsum(drawn, axis=0)
    return cum / cum.sum(axis=1, keepdims=True), cum


@pytest.mark.parametrize("unit", ["examples", "tokens"])
def test_shares_within_one_percent_at_every_prefix_of_100_or_more(unit):
    rng = np.random.default_rng(0)
    # three sources of unequal sizes (the small ones cycle through several epochs) and lengths
    lengths = [rng.integers(20, 60, 700), rng.integers(25, 55, 90), rng.integers(30, 50, 11)]
    order = Interleave(WEIGHTS, walks(lengths, unit == "tokens"))
    n = 20_000  # crosses chunk boundaries (8192)
    shares, cum = prefix_shares(order, n, lengths if unit == "tokens" else None)
    err = np.abs(shares[99:] - np.array(WEIGHTS))
    assert err.max() <= 0.01, (unit, err.max(), int(err.max(axis=1).argmax()) + 100)
    if unit == "tokens":  # the general guarantee: each source within about one example of its token target
        total = cum.sum(axis=1, keepdims=True)
        assert np.abs(cum - total * np.array(WEIGHTS)).max() <= max(l.max() for l in lengths)
    else:
        counts = np.arange(1, n + 1)[:, None] * np.array(WEIGHTS)
        assert np.abs(cum - counts).max() < 1.0
    # the counts the metrics use agree with the positions, at chunk boundaries and inside chunks
    for m in (0, 1, 99, 8191, 8192, 8193, 19_999):
        assert order.drawn_before(m).tolist() == (np.zeros(3) if m == 0 else
                                                   prefix_shares(order, m, None)[1][-1]).astype(int).tolist()
    # every source walks its own permutation: each epoch of the smallest one holds each example exactly once
    small = [ex for p in range(n) for s, ex in [order.at(p)] if s == 2]
    for e in range(len(small) // 11):
        assert sorted(small[11 * e:11 * (e + 1)]) == list(range(11))
    assert small[:11] != small[11:22]  # a fresh permutation per source epoch


def test_order_is_a_function_of_the_config_only():
    lengths = [np.full(50, 3), np.full(20, 5), np.full(7, 2)]
    a, b = Interleave(WEIGHTS, walks(lengths, True)), Interleave(WEIGHTS, walks(lengths, True))
    late = [b.at(p) for p in range(30_000, 30_050)]  # computed cold, far into the stream, out of order
    assert [a.at(p) for p in range(30_050)][30_000:] == late
    other = Interleave(WEIGHTS, walks(lengths, True, seed=4))
    assert [other.at(p) for p in range(200)] != [a.at(p) for p in range(200)]


def data_config(tmp_path, kind: str, weights=(0.97, 0.03), roles=("main", "safety"), **kw) -> DataConfig:
    return DataConfig(**{f"{kind}_sources": [PostSourceConfig(name=f"src{i}", path=str(tmp_path / f"{i}.jsonl"),
                                                              weight=w, role=r)
                                             for i, (w, r) in enumerate(zip(weights, roles))]}, **kw)


@pytest.mark.parametrize("share,warns", [(0.005, True), (0.08, True), (0.03, False), (0.01, False), (0.05, False)])
def test_safety_share_warning_outside_the_papers_1_to_5_percent(tmp_path, share, warns):
    cfg = data_config(tmp_path, "dpo", weights=(1 - share, share / 2, share / 2),
                      roles=("main", "safety", "hallucination"))
    check_post_config(cfg, "x.yaml")  # a warning, never an error
    warning = dpo_share_warning(cfg)
    assert (warning is not None) == warns
    if warns:
        assert "1-5%" in warning and "Table 9" in warning and f"{100 * share:.3g}%" in warning
    assert dpo_share_warning(DataConfig(dpo_path="p.jsonl")) is None  # a single file declares no share


def test_dpo_stage_logs_the_warning_and_puts_it_in_the_step_metrics(tmp_path, caplog):
    from train.stages.dpo import DPOStage

    for i in range(2):
        write_jsonl(tmp_path / f"{i}.jsonl", pair_rows(30, str(i)))
    for share, flagged in ((0.08, 1.0), (0.03, 0.0)):
        cfg = load_config("configs/smoke/dpo.yaml", [f"train.init_from={tmp_path}"])
        cfg.data = data_config(tmp_path, "dpo", weights=(1 - share, share), held_out_fraction=0.0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train.stages.dpo"):
            stage = DPOStage(cfg, batches=None)
        assert any("outside the Phi-4 report's 1-5%" in r.getMessage() for r in caplog.records) == bool(flagged)
        m = stage.step_metrics({"rewards_accuracy": 2.0}, 4)
        assert m["dpo/rewards_accuracy"] == 0.5 and m["data/safety_share"] == pytest.approx(share)
        assert m["data/safety_share_outside_paper_range"] == flagged


def test_config_errors_name_the_keys(tmp_path):
    base = ["train.init_from=''", "data.sft_path=''"]

    def load(*overrides):
        return load_config("configs/smoke/sft.yaml", [*base, *overrides])

    two = ["data.sft_sources=[{name: a, path: a.jsonl, weight: 0.9}, {name: b, path: b.jsonl, weight: 0.2}]"]
    with pytest.raises(ConfigError, match=r"data.sft_sources weights sum to 1.1, expected 1.*a=0.9, b=0.2"):
        load(*two)
    with pytest.raises(ConfigError, match=r"both data.dpo_path and data.dpo_sources"):
        load("data.dpo_path=p.jsonl", "data.dpo_sources=[{name: a, path: a.jsonl, weight: 1.0}]")
    with pytest.raises(ConfigError, match=r"data.post_weight_unit='bytes'; expected one of \['examples', 'tokens'\]"):
        load("data.post_weight_unit=bytes")
    with pytest.raises(ConfigError, match=r"data.sft_sources: duplicate source names \['a'\]"):
        load("data.sft_sources=[{name: a, path: a.jsonl, weight: 0.5}, {name: a, path: b.jsonl, weight: 0.5}]")
    with pytest.raises(ConfigError, match=r"data.dpo_sources\[b\].role='toxic'"):
        load("data.dpo_sources=[{name: a, path: a.jsonl, weight: 0.5}, {name: b, path: b.jsonl, weight: 0.5, "
             "role: toxic}]")
    with pytest.raises(ConfigError, match=r"data.sft_sources\[b\].weight=0.0"):
        load("data.sft_sources=[{name: a, path: a.jsonl, weight: 1.0}, {name: b, path: b.jsonl, weight: 0.0}]")
    ok = load("data.sft_sources=[{name: a, path: a.jsonl, weight: 0.7}, {name: b, path: b.jsonl, weight: 0.3}]")
    assert [s.name for s in ok.data.sft_sources] == ["a", "b"] and ok.data.post_weight_unit == "examples"
    # the files are checked by the stage, before any compute, naming the source
    from train.stages.build import validate
    with pytest.raises(ConfigError, match=r"data.sft_sources\[a\].path='a.jsonl' is not a file"):
        validate(ok)


def test_one_source_mixture_is_the_single_file_loader(tmp_path, tok):
    path = write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(60)])
    args = dict(seq_len=128, micro_batch=2, global_batch=4, tokenizer=tok)
    old = ChatBatches(path, seed=5, held_out_fraction=0.1, **args)
    one = sft_batches(DataConfig(sft_sources=[PostSourceConfig(name="chat", path=path, weight=1.0)], seed=5,
                                 held_out_fraction=0.1), **args)
    same_path = sft_batches(DataConfig(sft_path=path, seed=5, held_out_fraction=0.1), **args)
    for _ in range(12):  # past an epoch
        a, b, c = next(old), next(one), next(same_path)
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) and \
                   torch.equal(torch.as_tensor(a[k]), torch.as_tensor(c[k])), k
    assert one.state_dict() == old.state_dict()
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_rows(20, "p"))
    old_p = PairBatches(pairs, seq_len=64, micro_batch=2, global_batch=2, seed=5)
    one_p = dpo_batches(DataConfig(dpo_sources=[PostSourceConfig(name="pts", path=pairs, weight=1.0)], seed=5),
                        seq_len=64, micro_batch=2, global_batch=2)
    for _ in range(15):
        assert next(old_p)["pair_ids"].tolist() == next(one_p)["pair_ids"].tolist()


def write_sft_sources(tmp_path) -> list[PostSourceConfig]:
    convs = [conversation(k) for k in range(120)]
    paths = [write_chats(tmp_path / f"{name}.jsonl", part) for name, part in
             (("main", convs[:80]), ("math", convs[80:110]), ("safety", convs[110:]))]
    return [PostSourceConfig(name=n, path=p, weight=w, role="safety" if n == "safety" else "main")
            for n, p, w in zip(("main", "math", "safety"), paths, (0.8, 0.15, 0.05))]


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("unit", ["examples", "tokens"])
def test_sft_mixture_resumes_exactly_and_reports_its_shares(tmp_path, tok, pack, unit):
    sources = write_sft_sources(tmp_path)
    data = DataConfig(sft_sources=sources, seed=9, pack=pack, held_out_fraction=0.25, post_weight_unit=unit)
    args = dict(seq_len=256, micro_batch=2, global_batch=4, tokenizer=tok)
    first = sft_batches(data, **args)
    assert isinstance(first, ChatMixture)
    for _ in range(10):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(8)]
    resumed = sft_batches(data, **args, token_cache=tmp_path / "cache")
    resumed.load_state_dict(state)
    for a, b in zip(expected, [next(resumed) for _ in range(8)]):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    # the shares report every conversation of the consumed rows, counted one by one here
    rows = resumed.samples_consumed
    counts, tokens = np.zeros(3, int), np.zeros(3, int)
    for i in range(rows):
        for p in resumed.row(i):
            s, c = resumed.order.at(p)
            counts[s] += 1
            tokens[s] += int(resumed.walks[s].tokens[c])
    m = resumed.metrics()
    assert [m[f"data/examples/{s.name}"] for s in sources] == counts.tolist()
    assert [m[f"data/tokens/{s.name}"] for s in sources] == tokens.tolist()
    drawn = tokens if unit == "tokens" else counts
    assert [m[f"data/share/{s.name}"] for s in sources] == pytest.approx((drawn / drawn.sum()).tolist())
    assert m["data/share/main"] > m["data/share/math"] > m["data/share/safety"] > 0
    # a token really is a labelled target: the walks count what the loss is averaged over
    batch = resumed.batch_at(0, 1)
    labelled = int((batch["labels"] != -100).sum())
    assert labelled == sum(int(resumed.walks[s].tokens[c]) for s, c in map(resumed.order.at, resumed.row(0)))
    held = resumed.held_out_batches(1)
    assert set(held) <= {"main", "math", "safety"} and "main" in held
    other = sft_batches(DataConfig(sft_sources=sources[:2] + [PostSourceConfig(
        name="safety", path=sources[2].path, weight=0.05, role="hallucination")], seed=9, pack=pack,
        held_out_fraction=0.25, post_weight_unit=unit), **args)
    with pytest.raises(ValueError, match="role"):  # the state names what may have changed
        other.load_state_dict(state)


def test_dpo_mixture_global_pair_ids_resume_and_reference_cache(tmp_path):
    from tests.train.stages.test_dpo import tiny_model
    from train.stages.ref_cache import compute_ref_logps

    paths = [write_jsonl(tmp_path / f"{n}.jsonl", pair_rows(k, n, long=i)) for i, (n, k) in
             enumerate((("pts", 90), ("safety", 12), ("halluc", 3)))]
    sources = [PostSourceConfig(name=n, path=p, weight=w, role=r) for n, p, w, r in
               zip(("pts", "safety", "halluc"), paths, (0.96, 0.02, 0.02), ("main", "safety", "hallucination"))]
    data = DataConfig(dpo_sources=sources, seed=2, held_out_fraction=0.1)
    pb = dpo_batches(data, seq_len=64, micro_batch=2, global_batch=4)
    assert isinstance(pb, PairMixture) and pb.num_pairs == 105 and pb.valid.shape == (105,)
    singles = [PairBatches(p, seq_len=64, micro_batch=2, global_batch=4, seed=2, held_out_fraction=0.1)
               for p in paths]
    # global id = the earlier files' pair counts + the line index; the sequences are that file's
    for gid, (f, j) in ((0, (0, 0)), (89, (0, 89)), (90, (1, 0)), (101, (1, 11)), (102, (2, 0)), (104, (2, 2))):
        for a, b in zip(pb.sequences(gid), singles[f].sequences(j)):
            assert np.array_equal(a, b)
    train = {int(i) for s, part in zip(pb.first_id, singles) for i in part.train_ids + s}
    drawn = [next(pb) for _ in range(120)]  # 240 pairs: the small files cycle through several epochs
    ids = [int(i) for b in drawn for i in b["pair_ids"]]
    assert set(ids) <= train
    m = pb.metrics()
    assert m["data/pairs_consumed"] == 240 and sum(m[f"data/examples/{s.name}"] for s in sources) == 240
    assert abs(m["data/share/safety"] - 0.02) <= 0.01 and abs(m["data/share/halluc"] - 0.02) <= 0.01
    assert m["data/epoch/halluc"] >= 2  # its 2 training pairs, each drawn twice or more
    state = pb.state_dict()
    nxt = [next(pb)["pair_ids"].tolist() for _ in range(5)]
    again = dpo_batches(data, seq_len=64, micro_batch=2, global_batch=4, rank=1, world_size=2)
    again.load_state_dict(state)  # another world size: rank 1 takes the second half of each global batch
    first_global = [pb.pair_at(240 + j) for j in range(4)]
    assert next(again)["pair_ids"].tolist() == first_global[2:] and nxt[0] == first_global[:2]
    # held-out pairs carry global ids; the reference cache computed over the mixture holds every valid pair
    held = pb.held_out_batches(2)
    assert all(int(i) >= pb.first_id[k] for k, name in enumerate(pb.names) if name in held
               for b in held[name] for i in b["pair_ids"])
    torch.manual_seed(0)
    model = tiny_model()
    table = compute_ref_logps(model, pb, {"data": pb.identity}, tmp_path / "ref.pt", 16, torch.device("cpu"))
    assert table.shape == (105, 2) and torch.isfinite(table[torch.from_numpy(pb.valid)]).all()
    from train.stages.dpo_loss import sequence_logps
    batch = pb.pairs_batch([3, 95, 103])  # one pair from each file in one batch
    with torch.no_grad():
        live = sequence_logps(model.eval(), batch).double()
    assert torch.allclose(live, table[[3, 95, 103]], atol=1e-5)
