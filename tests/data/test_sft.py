"""SFT data: masks token by token, packing == no packing, broken masks refused, exact resume, a real run (CPU)."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from data.configfile import ConfigError
from data.packing import ChatDataError, best_fit_rows, pack_segments
from data.sft import ChatBatches, check_loss_mask
from data.tokenizer import IGNORE_INDEX, PAD_ID
from tests.helpers.models import TINY, TINY_RUN_CONTEXT, as_overrides, tiny_model
from tests.helpers.train import check, metrics, run_train, train_losses
from train.config import load_config

IM_START, IM_END, IM_SEP = 100264, 100265, 100266
ROLE_IDS = {"system": [9125], "user": [882], "assistant": [78191]}  # microsoft/phi-4 chat format


def conversation(k: int) -> list[dict]:
    """Varied lengths; every third has a system message, every second is multi-turn."""
    messages = [{"role": "system", "content": f"You are assistant number {k}."}] if k % 3 == 0 else []
    messages += [{"role": "user", "content": f"What is {k} + {k}?" + " Please explain." * (k % 5)},
                 {"role": "assistant", "content": f"{k} + {k} = {2 * k}." + " Indeed." * (k % 7)}]
    if k % 2:
        messages += [{"role": "user", "content": "And times two?"},
                     {"role": "assistant", "content": f"{k} x 2 = {2 * k}. " * (1 + k % 4)}]
    return messages


def write_chats(path, convs) -> str:
    path.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in enumerate(convs)))
    return str(path)


def make(path, tok, **kw) -> ChatBatches:
    args = dict(seq_len=128, micro_batch=1, global_batch=1, seed=7, tokenizer=tok)
    return ChatBatches(path, **{**args, **kw})


def test_mask_token_by_token_multi_turn_with_system(tmp_path, tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi <|im_end|> there"},  # special-looking text stays text
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    # The expected rendering and mask, built by hand from the spec's chat format (not from render_chat).
    ids, trained = [], []
    for m in messages:
        header = [IM_START, *ROLE_IDS[m["role"]], IM_SEP]
        body = tok.encode(m["content"]) + [IM_END]
        ids += header + body
        trained += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    assert IM_END not in tok.encode(messages[1]["content"])
    cb = make(write_chats(tmp_path / "c.jsonl", [messages]), tok, pack=False)
    batch = next(cb)
    n = len(ids) - 1
    assert batch["input_ids"][0, :n].tolist() == ids[:-1]
    for t in range(n):  # the target of position t is ids[t+1], labelled iff that token is trained on
        assert batch["labels"][0, t].item() == (ids[t + 1] if trained[t + 1] else IGNORE_INDEX), t
    labelled = [int(x) for x in batch["labels"][0] if x != IGNORE_INDEX]
    assert labelled == tok.encode("Hello!") + [IM_END] + tok.encode("4") + [IM_END]
    # padding: pad id, no labels, its own attention segment with restarting positions
    assert (batch["input_ids"][0, n:] == PAD_ID).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["cu_seqlens"].tolist() == [0, n, 128]
    assert batch["position_ids"][0].tolist() == list(range(n)) + list(range(128 - n))


def test_packing_uses_document_masking_and_fits(tmp_path, tok):
    cb = make(write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(40)]), tok, micro_batch=2,
              global_batch=2)
    batch = next(cb)
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 2 * 128 and 128 in cu  # every row boundary is a boundary
    assert len(cu) > 4  # several conversations per row
    flat_pos = batch["position_ids"].reshape(-1)
    for a, b in zip(cu[:-1], cu[1:]):  # positions restart at every conversation (and the padding)
        assert flat_pos[a:b].tolist() == list(range(b - a))
    # each conversation segment begins with <|im_start|>, and conversations never straddle rows
    flat_ids = batch["input_ids"].reshape(-1)
    for a, b in zip(cu[:-1], cu[1:]):
        assert flat_ids[a] == IM_START or (flat_ids[a:b] == PAD_ID).all()
    assert best_fit_rows(np.array([5, 4, 3, 3, 2, 2, 1]), 10) == [[0, 1, 6], [2, 3, 4, 5]]


def test_every_conversation_once_per_epoch_and_resume_exact(tmp_path, tok):
    path = write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(30)])
    ref = make(path, tok, micro_batch=1, global_batch=4, held_out_fraction=0.1)
    # epoch coverage: the rows of epoch 0 and 1 each hold every training conversation exactly once
    for e in (0, 1):
        seen = Counter(c for row in ref.epoch_rows(e) for c in row)
        assert sorted(seen) == ref.train_ids.tolist() and set(seen.values()) == {1}
    assert ref.epoch_rows(0) != ref.epoch_rows(1)  # a fresh permutation per epoch
    assert not set(ref.held_ids) & set(ref.train_ids) and len(ref.held_ids) == 3
    # run past an epoch boundary; save after 5 micro-batches; a fresh source resumes bit-identically
    n_rows = ref.rows_in_epoch(0)
    stream = [next(ref) for _ in range(n_rows + 8)]
    a = make(path, tok, micro_batch=1, global_batch=4, held_out_fraction=0.1)
    for _ in range(8):
        next(a)
    state = a.state_dict()
    assert state["samples_consumed"] == 8
    b = make(path, tok, micro_batch=2, global_batch=4, held_out_fraction=0.1, rank=1, world_size=2)
    b.load_state_dict(state)  # another world size and micro batch: the global order is the same
    b0 = make(path, tok, micro_batch=2, global_batch=4, held_out_fraction=0.1, rank=0, world_size=2)
    b0.load_state_dict(state)
    for step in range(n_rows // 4):
        got0, got1 = next(b0), next(b)
        for k in ("input_ids", "labels", "position_ids"):  # W=2 rank 0 rows = W=1 rows 0..1, rank 1 = rows 2..3
            want = torch.cat([stream[8 + 4 * step + j][k] for j in range(4)])
            assert torch.equal(torch.cat([got0[k], got1[k]]), want), (step, k)
    other = make(path, tok, micro_batch=1, global_batch=4, held_out_fraction=0.1, seed=8)
    with pytest.raises(ChatDataError, match="does not match"):
        other.load_state_dict(state)
    held = ref.held_out_batches(5)["sft"]
    assert len(held) == len(ref.held_rows) and all((h["labels"] != IGNORE_INDEX).any() for h in held)


def test_token_cache_is_reused_and_rebuilt_when_the_file_changes(tmp_path, tok):
    path = write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(10)])
    cache = tmp_path / "run" / "sft_tokens"
    fresh = make(path, tok, token_cache=cache)
    assert (cache / "key.json").is_file() and not isinstance(fresh.tokens, np.memmap)
    cached = make(path, tok, token_cache=cache)
    assert isinstance(cached.tokens, np.memmap)  # read back, memory-mapped, not rendered again
    for _ in range(3):
        a, b = next(fresh), next(cached)
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
    write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(10, 14)])  # same path, other content
    changed = make(path, tok, token_cache=cache)
    assert not isinstance(changed.tokens, np.memmap) and changed.num_conversations == 4


def test_packed_and_unpacked_give_the_same_loss(tmp_path, tok):
    path = write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(8)])
    model = tiny_model(0, max_seq_len=TINY_RUN_CONTEXT)
    model.eval()
    totals = {}
    for pack in (True, False):
        cb = make(path, tok, pack=pack)
        loss, count = 0.0, 0
        with torch.no_grad():
            for _ in range(cb.rows_in_epoch(0)):  # one epoch: every conversation once
                b = next(cb)
                loss += float(model(b["input_ids"], labels=b["labels"], position_ids=b["position_ids"],
                                    cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"], reduction="sum"))
                count += int((b["labels"] != IGNORE_INDEX).sum())
        totals[pack] = (loss, count, cb.rows_in_epoch(0))
    assert totals[True][1] == totals[False][1]
    assert totals[True][2] < totals[False][2]  # packing saves rows
    assert totals[True][0] == pytest.approx(totals[False][0], rel=1e-5)


def test_all_zero_and_all_one_masks_raise(tmp_path, tok):
    path = write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(6)])
    broken = make(path, tok, micro_batch=2, global_batch=2)
    broken.mask[:] = False  # as if the mask were not built from the assistant spans
    with pytest.raises(ChatDataError, match=r"all zeros.*") as e:
        next(broken)
    assert "step 1" in str(e.value) and "rank 0" in str(e.value)
    broken = make(path, tok, micro_batch=2, global_batch=2)
    broken.mask[:] = True  # prompts and headers trained on
    with pytest.raises(ChatDataError, match="all ones"):
        next(broken)
    segments = [(np.arange(1, 6), np.arange(2, 7))]
    batch, _ = pack_segments(segments, [[0]], 5)  # every position labelled, no padding
    with pytest.raises(ChatDataError, match="all ones"):
        check_loss_mask(batch, "unit")


def test_bad_files_name_the_line(tmp_path, tok):
    good = json.dumps({"messages": conversation(1)})
    cases = {"{not json": "not valid JSON",
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}): "no assistant message",
             json.dumps({"messages": [{"role": "robot", "content": "hi"}]}): "role",
             json.dumps({"text": "hi"}): "messages"}
    for line, expected in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{good}\n\n{line}\n")
        with pytest.raises(ChatDataError, match=expected) as e:
            make(str(path), tok)
        assert f"bad.jsonl:3:" in str(e.value)
    # a conversation too long for seq_len is dropped and counted; none left is an error
    path = write_chats(tmp_path / "long.jsonl", [conversation(2), [{"role": "user", "content": "x " * 300},
                                                                     {"role": "assistant", "content": "y"}]])
    cb = make(path, tok)
    assert cb.dropped_too_long == 1 and cb.train_ids.tolist() == [0]
    with pytest.raises(ChatDataError, match="no training conversation"):
        make(path, tok, seq_len=8)


def test_shipped_sft_configs_load():
    paper = load_config("configs/phi4-14b/sft.yaml")
    assert paper.stage == "sft" and paper.optim.lr == 1e-6 and paper.train.init_from.endswith("midtrain")
    assert paper.train.max_steps * paper.train.global_batch * paper.train.seq_len >= 8e9  # ~8B tokens
    smoke = load_config("configs/smoke/sft.yaml")
    assert smoke.stage == "sft" and smoke.model.n_layers == 2
    if "PHI4_RECIPE_DIR" not in os.environ:
        assert smoke.data.sft_sources[0].path == "runs/smoke/data/raw/sft.jsonl"
        assert smoke.train.init_from == "runs/smoke/midtrain"
    assert [s.role for s in smoke.data.sft_sources] == ["main", "hallucination", "safety"]


def test_stage_checks_fail_before_compute(tmp_path):
    from train.stages.build import validate

    data = write_chats(tmp_path / "c.jsonl", [conversation(1)])
    ok = load_config("configs/smoke/sft.yaml", ["data.sft_sources=[]", f"data.sft_path={data}", "train.init_from=''"])
    validate(ok)
    for overrides, expected in ((["data.sft_path=nope.jsonl"], "data.sft_path"),
                                (["model.doc_masking=false"], "doc_masking"),
                                ([f"train.init_from={tmp_path / 'missing'}"], "does not exist")):
        cfg = load_config("configs/smoke/sft.yaml", ["data.sft_sources=[]", f"data.sft_path={data}", "train.init_from=''", *overrides])
        with pytest.raises(ConfigError, match=expected):
            validate(cfg)
    unpacked = load_config("configs/smoke/sft.yaml", ["data.sft_sources=[]", f"data.sft_path={data}", "train.init_from=''",
                                                       "model.doc_masking=false", "data.pack=false"])
    validate(unpacked)  # one conversation per row needs no document masking


@pytest.mark.slow
def test_sft_run_learns_and_evaluates(tmp_path):
    """A real `python -m train` SFT run of the smoke config on the smoke conversations (tiny model, from scratch)."""
    from data.smoke.build import generate

    generate(tmp_path / "raw", seed=0, scale="small")
    run_dir = tmp_path / "sft"
    overrides = ["data.sft_sources=[]", f"data.sft_path={tmp_path / 'raw' / 'sft.jsonl'}", "train.init_from=''", f"output_dir={run_dir}",
                 *as_overrides(TINY), "train.seq_len=256",
                 "train.global_batch=4", "train.micro_batch=1", "train.max_steps=6", "train.save_every=3",
                 "train.eval_every=3",
                 "optim.lr=3e-3", "logging.wandb.mode=disabled", "deepspeed.zero_stage=0"]
    check(run_train("configs/smoke/sft.yaml", overrides))
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1] - 0.3, losses
    evals = [r for r in metrics(run_dir) if "eval/loss/sft" in r]
    assert [r["step"] for r in evals] == [3, 6] and evals[1]["eval/loss/sft"] < evals[0]["eval/loss/sft"]
    assert (run_dir / "checkpoints" / "step_00000006" / "meta.json").is_file()


def cache_files(cache) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(cache.iterdir())} if cache.exists() else {}


def same_batches(a, b, n: int = 3) -> bool:
    return all(all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "position_ids", "cu_seqlens"))
               for x, y in ((next(a), next(b)) for _ in range(n)))


def test_only_rank0_writes_the_token_cache_and_rank1_reads_it(tmp_path, tok):
    path = write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(10)])
    cache = tmp_path / "run" / "sft_tokens"
    two = dict(global_batch=2, world_size=2, token_cache=cache)
    alone = make(path, tok, rank=1, **two)  # rank 1 first, no cache yet: tokenizes in memory, writes nothing
    assert cache_files(cache) == {} and not isinstance(alone.tokens, np.memmap)
    make(path, tok, rank=0, **two)
    written = cache_files(cache)
    assert set(written) == {"key.json", "tokens.npy", "mask.npy", "offsets.npy"}
    reader = make(path, tok, rank=1, **two)
    assert isinstance(reader.tokens, np.memmap)  # rank 0's cache, memory-mapped
    assert cache_files(cache) == written  # nothing rewritten
    assert same_batches(reader, make(path, tok, rank=1, global_batch=2, world_size=2))  # the same rows as tokenizing here


@pytest.mark.parametrize("damage", ["truncated", "other_shape", "garbage_key", "no_key", "old_key_format"])
def test_damaged_or_partial_token_cache_is_rebuilt_not_trusted(tmp_path, tok, damage):
    path = write_chats(tmp_path / "c.jsonl", [conversation(k) for k in range(10)])
    cache = tmp_path / "sft_tokens"
    reference = make(path, tok, token_cache=cache)
    if damage == "truncated":  # a torn copy: the header survives, the data does not
        data = (cache / "tokens.npy").read_bytes()
        (cache / "tokens.npy").write_bytes(data[:len(data) // 2])
    elif damage == "other_shape":  # a valid .npy, but not the array key.json describes
        np.save(cache / "offsets.npy", np.load(cache / "offsets.npy")[:-2])
    elif damage == "garbage_key":
        (cache / "key.json").write_text('{"key": ')
    elif damage == "no_key":  # the arrays of an interrupted write, key.json not yet written
        (cache / "key.json").unlink()
    else:  # key.json of the earlier format (a list of names, no dtypes or shapes)
        saved = json.loads((cache / "key.json").read_text())
        (cache / "key.json").write_text(json.dumps({**saved, "arrays": sorted(saved["arrays"])}))
    rebuilt = make(path, tok, token_cache=cache)
    assert not isinstance(rebuilt.tokens, np.memmap)  # tokenized again
    assert same_batches(rebuilt, make(path, tok)) and same_batches(reference, make(path, tok))
    assert isinstance(make(path, tok, token_cache=cache).tokens, np.memmap)  # and written back whole


def test_rank0_first_orders_the_ranks_and_passes_on_rank0s_error(tmp_path, monkeypatch):
    """Two ranks as threads of one launch: rank 1's make() starts only after rank 0's has finished; rank 0's
    failure reaches rank 1 as a configuration error; a ready.json of another launch is not taken for this one."""
    import threading
    import time

    from train.stages import sft as stage

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    monkeypatch.setattr(stage, "POLL_S", 0.01)
    cache, events, results = tmp_path / "sft_tokens", [], {}

    def make_as(rank, fail=False):
        def make():
            events.append(("start", rank))
            time.sleep(0.2 if rank == 0 else 0.0)
            if fail:
                raise ChatDataError("c.jsonl line 3: not JSON")
            events.append(("end", rank))
            return rank
        return make

    def run(rank, fail=False):
        try:
            results[rank] = stage.rank0_first(make_as(rank, fail), cache, rank, 2, wait_s=10)
        except Exception as e:  # noqa: BLE001 - what each rank raised is the result
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in (1, 0)]  # rank 1 is already waiting
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: 0, 1: 1} and events == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    assert json.loads((cache / "ready.json").read_text()) == {"launch": stage.launch_id(), "error": None}

    events.clear()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")  # a new launch: the ready.json above is not its own
    threads = [threading.Thread(target=run, args=(r, True)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results[0], ChatDataError) and events == [("start", 0)]  # rank 1 never tokenized
    assert isinstance(results[1], ConfigError) and "rank 0 could not build the token cache" in str(results[1])
    assert "c.jsonl line 3: not JSON" in str(results[1])

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-c")  # a success of launch-a is not this launch's
    (cache / "ready.json").write_text(json.dumps({"launch": {**stage.launch_id(), "TORCHELASTIC_RUN_ID": "launch-a"},
                                                  "error": None}))
    with pytest.raises(ConfigError, match="wrote no .*ready.json for this launch"):
        stage.rank0_first(make_as(1), cache, 1, 2, wait_s=0.2)
    assert stage.rank0_first(make_as(0), cache, 0, 1) == 0  # one process: no coordination at all


@pytest.mark.slow
def test_two_rank_sft_run_builds_the_token_cache_once(tmp_path):
    """torchrun, 2 gloo ranks: rank 0 tokenizes and writes the cache and ready.json for this launch, rank 1 waits
    for it and reads the cache; a second launch finds the cache and trains on the same rows."""
    from data.smoke.build import generate

    generate(tmp_path / "raw", seed=0, scale="small")
    run_dir = tmp_path / "sft"
    overrides = ["data.sft_sources=[]", f"data.sft_path={tmp_path / 'raw' / 'sft.jsonl'}", "train.init_from=''",
                 f"output_dir={run_dir}", *as_overrides(TINY), "train.seq_len=256", "train.global_batch=4",
                 "train.micro_batch=1", "train.max_steps=2", "train.save_every=100", "train.eval_every=0",
                 "logging.wandb.mode=disabled", "deepspeed.zero_stage=0", "train.resume=none"]
    check(run_train("configs/smoke/sft.yaml", overrides, nproc=2))
    cache = run_dir / "sft_tokens"
    ready = json.loads((cache / "ready.json").read_text())
    assert ready["error"] is None and ready["launch"]["TORCHELASTIC_RUN_ID"]  # written under torchrun
    written = cache_files(cache)
    assert {"key.json", "tokens.npy", "mask.npy", "offsets.npy"} <= set(written)
    first = train_losses(run_dir)
    check(run_train("configs/smoke/sft.yaml", overrides, nproc=2))
    again = json.loads((cache / "ready.json").read_text())
    assert again["launch"]["TORCHELASTIC_RUN_ID"] != ready["launch"]["TORCHELASTIC_RUN_ID"]
    assert {k: v for k, v in cache_files(cache).items() if k != "ready.json"} == \
        {k: v for k, v in written.items() if k != "ready.json"}  # read, not rewritten
    assert train_losses(run_dir) == first
