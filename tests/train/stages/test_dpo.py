"""DPO: the loss, token-id pairs as given, the reference log-prob cache, and real runs (1 rank, 2 ranks ZeRO-3)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from data.configfile import ConfigError
from data.packing import ChatDataError
from data.pairs import PairBatches
from data.tokenizer import EOS_ID
from model.transformer import Transformer
from tests.helpers.models import TINY, TINY_RUN_CONTEXT, as_overrides
from tests.helpers.models import tiny_model as build_tiny
from tests.helpers.train import check, exit_status, metrics, run_train, train_losses
from train.config import load_config
from train.distributed import DistState
from train.stages.build import validate
from train.stages.dpo_loss import preference_loss, sequence_logps
from train.stages.ref_cache import RefCacheError, cache_path, compute_ref_logps, load_ref_cache, prepare_reference

GEN_PROMPT = [100264, 78191, 100266]  # <|im_start|>assistant<|im_sep|>


def tiny_model(seed: int = 0) -> Transformer:
    """TINY, the weights the smoke configs' trainer builds from `as_overrides(TINY)`, at the tiny preset's context."""
    return build_tiny(seed, max_seq_len=TINY_RUN_CONTEXT)


def text_pairs(n: int) -> list[dict]:
    """A clearly learnable preference: the right sum is chosen, a wrong one rejected."""
    rows = []
    for k in range(n):
        a, b = 3 + k, 11 + 2 * k
        prompt = ([{"role": "system", "content": "Answer briefly."}] if k % 3 == 0 else []) + [
            {"role": "user", "content": f"What is {a} + {b}?"}]
        rows.append({"id": k, "prompt": prompt, "chosen": f"{a} + {b} = {a + b}.",
                     "rejected": f"{a} + {b} = {a + b + 1 + k % 3}."})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pts_pair(tok) -> tuple[list[int], int, int]:
    """A PTS-style prompt: chat-formatted question + a partial response whose token split is NOT what encoding the
    text would give ("hel" + "lo"), so any re-tokenization would show."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "Is -3 negative?"}], add_generation_prompt=True)
    partial = tok.encode("hel") + tok.encode("lo, -3 is")
    assert tok.encode(tok.decode(partial)) != partial
    prompt += partial
    return prompt, tok.encode(" negative")[0], tok.encode(" positive")[0]


def test_loss_is_ln2_when_policy_equals_reference_and_gradients_point_the_right_way():
    policy = torch.tensor([[-5.0, -7.0], [-3.0, -2.0], [-10.0, -10.5]], requires_grad=True)
    losses, stats = preference_loss(policy, policy.detach().clone(), beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    assert stats["rewards_margin"] == 0 and stats["rewards_accuracy"] == 0
    losses.sum().backward()
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all()  # descent: chosen up, rejected down
    ipo, _ = preference_loss(policy, policy.detach(), beta=0.1, kind="ipo_sum")
    assert torch.allclose(ipo, torch.full((3,), (1 / 0.2) ** 2))
    # ipo as its authors (and TRL) define it: log-probs averaged over each completion's tokens first.
    lengths = torch.tensor([[2.0, 4.0]])
    ipo, stats = preference_loss(torch.tensor([[-4.0, -8.0]]), torch.tensor([[-5.0, -7.0]]), beta=0.5, kind="ipo",
                                 lengths=lengths)
    assert ipo.item() == pytest.approx((0.75 - 1.0) ** 2)  # h = (-2 - -2) - (-2.5 - -1.75) = 0.75
    assert stats["rewards_chosen"] == pytest.approx(0.5 * 0.5) and stats["rewards_rejected"] == pytest.approx(-0.125)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(policy, policy.detach(), beta=0.1, kind="ipo")
    ref = torch.tensor([[-5.0, -7.0]])
    better = torch.tensor([[-4.0, -8.0]])  # chosen up 1, rejected down 1
    losses, stats = preference_loss(better, ref, beta=0.5)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * 2))))
    assert stats["rewards_chosen"] == pytest.approx(0.5) and stats["rewards_rejected"] == pytest.approx(-0.5)
    assert stats["rewards_margin"] == pytest.approx(1.0) and stats["rewards_accuracy"] == 1


def test_token_id_pairs_are_used_as_given(tmp_path, tok):
    prompt, good, bad = pts_pair(tok)
    rows = [{"prompt_ids": prompt, "chosen_ids": [good], "rejected_ids": [bad], "id": "pts-0", "p_before": 0.4}]
    rows += text_pairs(2)
    pb = PairBatches(write_jsonl(tmp_path / "p.jsonl", rows), seq_len=128, micro_batch=1, global_batch=1,
                     tokenizer=tok)
    p, c, r = pb.sequences(0)
    assert p.tolist() == prompt and c.tolist() == [good] and r.tolist() == [bad]  # no EOS, no re-tokenization
    batch = pb.pairs_batch([0])
    for side, token in ((0, good), (1, bad)):
        where = batch["seq_slot"] == side
        assert batch["labels"][where].tolist() == [token]  # one labelled position: the pivotal token itself
        # the segment's inputs are exactly the prompt ids (its last input predicts the token)
        row, col = where.nonzero()[0].tolist()
        assert batch["input_ids"][row, col - len(prompt) + 1: col + 1].tolist() == prompt
    assert EOS_ID not in batch["labels"][batch["seq_slot"] >= 0].tolist()
    # text pairs: prompt = template + generation prompt, completion = encode(text) + <|im_end|>
    p, c, r = pb.sequences(1)
    text = text_pairs(2)[0]
    assert p.tolist() == tok.apply_chat_template(text["prompt"], add_generation_prompt=True)
    assert p[-3:].tolist() == GEN_PROMPT and c.tolist() == tok.encode(text["chosen"]) + [EOS_ID]
    assert r.tolist() == tok.encode(text["rejected"]) + [EOS_ID]
    assert pb.forms == {"ids": 1, "text": 2}


def test_bad_pair_files_name_the_line(tmp_path, tok):
    good = json.dumps(text_pairs(1)[0])
    cases = {json.dumps({"prompt_ids": [1, 2], "chosen_ids": [3]}): "rejected_ids",
             json.dumps({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [200000]}): "outside the vocabulary",
             json.dumps({"prompt_ids": [1, 2], "chosen_ids": "3", "rejected_ids": [4]}): "list of integer",
             json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "a"}): "rejected",
             json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}): "prompt"}
    for line, expected in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{good}\n{line}\n")
        with pytest.raises(ChatDataError, match=expected) as e:
            PairBatches(str(path), seq_len=64, micro_batch=1, global_batch=1, tokenizer=tok)
        assert "bad.jsonl:2:" in str(e.value)
    same = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [3]}
    long = {"prompt_ids": list(range(100)), "chosen_ids": [3], "rejected_ids": [4]}
    pb = PairBatches(write_jsonl(tmp_path / "s.jsonl", [same, long, text_pairs(1)[0]]), seq_len=64,
                     micro_batch=1, global_batch=1, tokenizer=tok)
    assert pb.skipped == {"too_long": 1, "identical": 1} and pb.train_ids.tolist() == [2]


def test_gradient_step_raises_chosen_and_lowers_rejected(tok, tmp_path):
    prompt, good, bad = pts_pair(tok)
    rows = [{"prompt_ids": prompt, "chosen_ids": [good], "rejected_ids": [bad]}] + text_pairs(3)
    pb = PairBatches(write_jsonl(tmp_path / "p.jsonl", rows), seq_len=128, micro_batch=4, global_batch=4,
                     tokenizer=tok)
    model = tiny_model()
    batch = pb.pairs_batch([0, 1, 2, 3])
    before = sequence_logps(model, batch)
    losses, _ = preference_loss(before, before.detach(), beta=0.1)
    assert losses.sum().item() == pytest.approx(4 * math.log(2), rel=1e-6)
    losses.sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        after = sequence_logps(model, batch)
    assert after[0, 0] > before[0, 0] and after[0, 1] < before[0, 1]  # the pivotal token pair
    margin = lambda x: x[:, 0] - x[:, 1]  # noqa: E731
    assert (margin(after) > margin(before.detach())).all()


def test_cached_and_live_reference_agree_and_an_interrupted_cache_resumes(tmp_path, tok):
    prompt, good, bad = pts_pair(tok)
    rows = text_pairs(6) + [{"prompt_ids": prompt, "chosen_ids": [good], "rejected_ids": [bad]}]
    rows.insert(2, {"prompt_ids": list(range(200)), "chosen_ids": [1], "rejected_ids": [2]})  # too long: skipped
    pb = PairBatches(write_jsonl(tmp_path / "p.jsonl", rows), seq_len=128, micro_batch=2, global_batch=2,
                     tokenizer=tok)
    model = tiny_model()
    key = {"format": 1, "data": pb.identity, "reference": "test"}
    cache = tmp_path / "ref.pt"

    class Interrupted(Exception):
        pass

    def stop_after_first(k):
        raise Interrupted(k)

    with pytest.raises(Interrupted):
        compute_ref_logps(model, pb, key, cache, chunk_pairs=3, device="cpu", on_chunk=stop_after_first)
    assert not cache.exists() and [p.name for p in (tmp_path / "ref.pt.parts").iterdir()] == ["chunk_000000.pt"]
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    ref = compute_ref_logps(model, pb, key, cache, chunk_pairs=3, device="cpu")
    hook.remove()
    assert len(forwards) == 2 + 1  # chunk 0 (3 pairs) was kept; chunks 1 (3 pairs) and 2 (1 pair) computed
    assert cache.is_file() and not (tmp_path / "ref.pt.parts").exists()
    assert torch.isnan(ref[2]).all() and torch.isfinite(ref[[0, 1, 3, 4, 5, 6, 7]]).all()
    with torch.no_grad():  # live, one pair per batch (another packing than the cache's)
        for i in pb.valid.nonzero()[0]:
            live = sequence_logps(model, pb.pairs_batch([int(i)]))[0].double()
            assert torch.allclose(ref[i], live, rtol=1e-5, atol=1e-4), (i, ref[i], live)
    assert torch.equal(load_ref_cache(cache, key).nan_to_num(), ref.nan_to_num())
    other = {**key, "data": {**pb.identity, "data_sha256": "0" * 64}}
    with pytest.raises(RefCacheError, match="different data"):
        load_ref_cache(cache, other)


def test_prepare_reference_refuses_a_cache_of_other_data(tmp_path, tok):
    from train.export.hf import to_hf

    model = tiny_model()
    to_hf(model, tmp_path / "ref_model")
    data = write_jsonl(tmp_path / "a.jsonl", text_pairs(4))
    cfg = load_config("configs/smoke/dpo.yaml", [f"output_dir={tmp_path / 'run'}", "data.dpo_sources=[]", f"data.dpo_path={data}",
                                                 f"train.init_from={tmp_path / 'ref_model'}", "train.seq_len=128",
                                                 "data.held_out_fraction=0",
                                                 *as_overrides(TINY)])
    dist_state = DistState(0, 1, 0, torch.device("cpu"), "fp32")
    pb = PairBatches(data, seq_len=128, micro_batch=2, global_batch=8, tokenizer=tok)
    first = prepare_reference(cfg, model, pb, dist_state, resumed=False)
    assert cache_path(cfg) == tmp_path / "run" / "ref_logps.pt" and cache_path(cfg).is_file()
    again = PairBatches(data, seq_len=128, micro_batch=2, global_batch=8, tokenizer=tok)
    reused = prepare_reference(cfg, tiny_model(seed=1), again, dist_state, resumed=False)  # other weights: reused
    assert torch.equal(reused, first)
    changed = write_jsonl(tmp_path / "b.jsonl", text_pairs(5))
    with pytest.raises(RefCacheError, match="different data") as e:
        prepare_reference(cfg, model, PairBatches(changed, seq_len=128, micro_batch=2, global_batch=8, tokenizer=tok),
                          dist_state, resumed=False)
    assert "ref_logps.pt" in str(e.value) and "dpo.ref_cache" in str(e.value)
    cfg.dpo.ref_cache = str(tmp_path / "elsewhere.pt")
    # resumed: the engine would hold trained weights, so computing the reference now is refused
    with pytest.raises(RefCacheError, match="resumed"):
        prepare_reference(cfg, model, PairBatches(data, seq_len=128, micro_batch=2, global_batch=8, tokenizer=tok),
                          dist_state, resumed=True)


def test_pair_order_resumes_exactly_on_another_world_size(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", text_pairs(10))
    one = PairBatches(path, seq_len=128, micro_batch=1, global_batch=4, tokenizer=tok)
    stream = [next(one)["pair_ids"].item() for _ in range(16)]
    assert sorted(stream[:10]) == list(range(10)) and stream[10:16] != stream[:6]  # epochs, freshly permuted
    a = PairBatches(path, seq_len=128, micro_batch=1, global_batch=4, tokenizer=tok)
    for _ in range(4):
        next(a)
    state = a.state_dict()
    ranks = [PairBatches(path, seq_len=128, micro_batch=2, global_batch=4, rank=r, world_size=2, tokenizer=tok)
             for r in range(2)]
    for b in ranks:
        b.load_state_dict(state)
    got = []
    for _ in range(3):
        got += [i for b in ranks for i in next(b)["pair_ids"].tolist()]
    assert got == stream[4:16]


def test_shipped_dpo_configs_load():
    pts = load_config("configs/phi4-14b/dpo_pts.yaml")
    judge = load_config("configs/phi4-14b/dpo.yaml")
    assert pts.stage == judge.stage == "dpo"
    assert pts.train.init_from == "runs/phi4-14b/sft" and judge.train.init_from == pts.output_dir
    assert pts.dpo.loss == "sigmoid" and pts.dpo.beta > 0
    smoke_pts, smoke = load_config("configs/smoke/dpo_pts.yaml"), load_config("configs/smoke/dpo.yaml")
    if "PHI4_RECIPE_DIR" not in os.environ:
        assert smoke_pts.data.dpo_sources[0].path == "runs/smoke/pts/pairs.jsonl"
        assert smoke.data.dpo_sources[0].path == "runs/smoke/data/raw/dpo.jsonl"
        assert smoke_pts.train.init_from == "runs/smoke/sft" and smoke.train.init_from == smoke_pts.output_dir
    for cfg in (pts, judge, smoke_pts, smoke):  # each round: 3% hallucination + safety pairs (paper: 1-5%)
        assert [s.role for s in cfg.data.dpo_sources] == ["main", "hallucination", "safety"]
        assert abs(sum(s.weight for s in cfg.data.dpo_sources[1:]) - 0.03) < 1e-9


def test_stage_checks_fail_before_compute(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", text_pairs(2))
    base = ["data.dpo_sources=[]", f"data.dpo_path={data}", f"train.init_from={tmp_path}"]
    validate(load_config("configs/smoke/dpo.yaml", base))
    for overrides, expected in ((["train.init_from=''"], "reference model"), (["data.dpo_path=x.jsonl"], "dpo_path"),
                                (["dpo.beta=0"], "dpo.beta"), (["model.doc_masking=false"], "doc_masking")):
        with pytest.raises(ConfigError, match=expected):
            validate(load_config("configs/smoke/dpo.yaml", [*base, *overrides]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")  # e.g. a Pivotal Token Search that found no pair
    with pytest.raises(ConfigError, match="no preference pair"):
        validate(load_config("configs/smoke/dpo.yaml", [*base, "data.dpo_sources=[]", f"data.dpo_path={empty}"]))
    with pytest.raises(ConfigError, match="dpo.loss"):
        load_config("configs/smoke/dpo.yaml", [*base, "dpo.loss=hinge"])


# ---- real runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The smoke data, a short SFT run (the reference), and a 1-rank DPO run on a slice of the smoke pairs."""
    from data.smoke.build import generate

    root = tmp_path_factory.mktemp("dpo_runs")
    generate(root / "raw", seed=0, scale="small")
    pairs = (root / "raw" / "dpo.jsonl").read_text().splitlines()[:24]
    (root / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    common = [*as_overrides(TINY), "logging.wandb.mode=disabled"]
    sft = root / "sft"
    check(run_train("configs/smoke/sft.yaml", [
        *common, f"output_dir={sft}", "data.sft_sources=[]", f"data.sft_path={root / 'raw' / 'sft.jsonl'}", "train.init_from=''",
        "train.seq_len=256", "train.global_batch=4", "train.max_steps=3", "optim.lr=3e-3", "deepspeed.zero_stage=0"]))
    dpo_args = [*common, "data.dpo_sources=[]", f"data.dpo_path={root / 'pairs.jsonl'}", f"train.init_from={sft}", "train.seq_len=256",
                "model.max_seq_len=256", "data.held_out_fraction=0.1"]  # the SFT run's context (train/transition.py)
    dpo = root / "dpo"
    check(run_train("configs/smoke/dpo.yaml", [
        *dpo_args, f"output_dir={dpo}", "train.max_steps=6", "train.save_every=100", "train.eval_every=0",
        "optim.lr=3e-3", "deepspeed.zero_stage=0"]))
    return {"root": root, "sft": sft, "dpo": dpo, "dpo_args": dpo_args}


@pytest.mark.slow
def test_dpo_run_raises_reward_accuracy_and_margin(runs):
    records = [r for r in metrics(runs["dpo"]) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert records[0]["dpo/rewards_margin"] == pytest.approx(0, abs=1e-4)
    late = records[-3:]  # 22 training pairs, 8 per step: the second epoch
    accuracy = sum(r["dpo/rewards_accuracy"] for r in late) / len(late)
    margin = sum(r["dpo/rewards_margin"] for r in late) / len(late)
    assert accuracy > 0.5 and margin > 0, (accuracy, margin)
    assert sum(r["loss"] for r in late) / len(late) < math.log(2) - 0.02
    evals = [r for r in metrics(runs["dpo"]) if "eval/loss/dpo" in r]
    assert evals and evals[-1]["step"] == 6
    saved = torch.load(runs["dpo"] / "ref_logps.pt", weights_only=True)
    assert saved["logps"].shape == (24, 2) and torch.isfinite(saved["logps"]).all()


@pytest.mark.slow
def test_two_rank_zero3_dpo_builds_the_cache_sharded_and_resumes_with_it(runs):
    run_dir, cache = runs["root"] / "dpo_z3", runs["root"] / "z3_ref.pt"
    args = [*runs["dpo_args"], f"output_dir={run_dir}", "deepspeed.zero_stage=3", f"dpo.ref_cache={cache}",
            "dpo.ref_chunk_pairs=5", "train.max_steps=3", "train.save_every=100", "optim.lr=3e-3"]
    # 24 pairs in 5 chunks of <= 5 over 2 ranks: the last round has one chunk, so rank 1 runs throw-away forwards
    check(run_train("configs/smoke/dpo.yaml", [*args, "train.stop_after_steps=1"], nproc=2), expected=1)
    assert exit_status(run_dir)["status"] == "preempted"  # torchrun reports the workers' 75 as 1
    built = torch.load(cache, weights_only=True)["logps"]
    single = torch.load(runs["dpo"] / "ref_logps.pt", weights_only=True)["logps"]
    assert torch.allclose(built, single, rtol=1e-5, atol=1e-4)  # sharded ZeRO-3 == 1 rank, same reference
    mtime = cache.stat().st_mtime_ns
    proc = run_train("configs/smoke/dpo.yaml", args, nproc=2)  # resumes: the engine holds trained weights now
    check(proc)
    assert cache.stat().st_mtime_ns == mtime and "reference log-probs: loaded" in proc.stderr
    assert exit_status(run_dir)["status"] == "completed"
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and losses[1] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.slow
def test_preemption_during_the_reference_pass_keeps_finished_chunks_and_resumes(runs):
    """SIGTERM on rank 0 while two ranks build the reference cache: both stop after the round in flight (exit 75,
    status preempted), the finished chunks stay, and the requeued run computes only the rest."""
    run_dir, cache = runs["root"] / "dpo_preempt_ref", runs["root"] / "preempt_ref.pt"
    args = [*runs["dpo_args"], f"output_dir={run_dir}", f"dpo.ref_cache={cache}", "dpo.ref_chunk_pairs=4",
            "train.max_steps=1", "train.save_every=100", "deepspeed.zero_stage=2"]
    stopped = run_train("configs/smoke/dpo.yaml", args, nproc=2, module="tests.helpers.preempt_reference")
    check(stopped, expected=1)  # torchrun reports the workers' 75 as 1
    status = exit_status(run_dir)
    assert status["status"] == "preempted" and status["step"] == 0, status
    assert "stopped after 2 of" in status["message"] and not cache.exists()
    parts = sorted(p.name for p in cache.with_name(cache.name + ".parts").iterdir())
    assert parts == ["chunk_000000.pt", "chunk_000001.pt"]  # one round: a chunk per rank
    resumed = run_train("configs/smoke/dpo.yaml", args, nproc=2)
    check(resumed)
    assert "2 already done" in resumed.stderr and exit_status(run_dir)["status"] == "completed"
    single = torch.load(runs["dpo"] / "ref_logps.pt", weights_only=True)["logps"]
    assert torch.allclose(torch.load(cache, weights_only=True)["logps"], single, rtol=1e-5, atol=1e-4)
