"""Evaluation: scores computed from models built to behave a known way, checked against direct computations."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import train.eval.run as E
from data.tokenizer import EOD_ID, EOS_ID, Phi4Tokenizer
from model.config import ModelConfig
from model.transformer import Transformer
from train.config import REPO_ROOT, ConfigError, load_config

CPU = torch.device("cpu")
SMALL = dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=512)


@pytest.fixture(scope="module")
def tok():
    return Phi4Tokenizer()


def random_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).eval()


def bigram_model(next_token: dict[int, int], favoured: list[int] = (), favour: float = 3.0) -> Transformer:
    """A model whose next-token choice depends only on the current token, by construction.

    Attention and MLP outputs are zeroed (wo = w2 = 0), so the final hidden state is RMSNorm(embedding): token `a` of
    the chain gets the one-hot embedding e_slot(a), every other token e_0. The LM head row of `next_token[a]` is
    30 e_slot(a) (logit ~170 after the norm's sqrt(dim) gain), and rows of `favoured` tokens get `favour` in every
    coordinate, so they are preferred after any token (logit ~17 against 0 for the rest of the vocabulary)."""
    model = random_model(1)
    d = model.cfg.dim
    slots = {a: 1 + i for i, a in enumerate(next_token)}
    assert len(slots) < d
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        emb = torch.zeros(model.cfg.vocab_size, d)
        emb[:, 0] = 1.0
        for a, s in slots.items():
            emb[a] = 0.0
            emb[a, s] = 1.0
        model.tok_embeddings.weight.copy_(emb)
        head = torch.zeros(model.cfg.vocab_size, d)
        for a, b in next_token.items():
            head[b, slots[a]] += 30.0
        for f in favoured:
            head[f] += favour
        model.output.weight.copy_(head)
    return model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def full_logit_logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from the full (T, V) logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float()[0]
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


# ---- multiple choice --------------------------------------------------------------------------------------------
def test_continuation_logprobs_equal_full_logits(tok):
    """Batched, right-padded scoring with the head on labelled positions only == log-softmax of the full logits;
    contexts longer than max_len are cut on the left."""
    model = random_model(0)
    requests = [(tok.encode("Question: what is 2 + 2?\nAnswer:"), tok.encode(" 4")),
                (tok.encode("Hi"), tok.encode(" there, how are you today?")),
                (tok.encode("A much longer context " * 12), tok.encode(" end")),
                (tok.encode("x"), tok.encode(" y"))]
    got = E.continuation_logprobs(model, requests, batch_size=3, device=CPU, max_len=40)
    for (ctx, cont), (logprob, n) in zip(requests, got):
        ids = (ctx + cont)[-41:]
        assert n == len(cont)
        assert logprob == pytest.approx(full_logit_logprob(model, ids, len(ids) - len(cont)), rel=1e-5, abs=1e-4)


def test_multiple_choice_picks_the_planted_answer(tok, tmp_path):
    """A model built to prefer certain tokens: the choice made of them wins, wherever it sits among the choices."""
    good = [" apple", " river", " violin", " granite"]
    bad = [" seven hundred", " carpet", " Thursday", " lemon tree", " cobalt", " saxophone"]
    favoured = [tok.encode(w)[0] for w in good]
    assert all(len(tok.encode(w)) == 1 for w in good)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        choices = [w.strip() for w in rng.choice(bad, 3, replace=False)]
        answer = int(rng.integers(0, 4))
        choices.insert(answer, good[i % 4].strip())
        rows.append({"id": f"q{i}", "question": f"Pick one ({i})", "choices": choices, "answer": answer})
    assert len({r["answer"] for r in rows}) > 1  # the planted answer moves around
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    model = bigram_model({}, favoured)
    cfg = E.EvalConfig(batch_size=5)
    for primary in ("mean", "sum"):
        task = E.MultipleChoiceTask(name="planted", path=path, k_shot=1, primary=primary)
        rec = E.eval_multiple_choice(model, tok, task, cfg, CPU)
        assert rec["metrics"]["items"] == 7  # the first row is the shot
        assert rec["metrics"]["accuracy"] == 1.0 and rec["metrics"]["acc_sum"] == 1.0
    # the same items with a random model: scores are real log-probs, not a constant
    rec = E.eval_multiple_choice(random_model(3), tok, task, cfg, CPU)
    assert all(len(set(s["logprob_sum"])) == 4 for s in rec["samples"])
    # the recorded score of a choice is its log-prob after the k-shot prompt
    ctx, conts = E.mc_prompt(rows[1], rows[:1], "text")
    ids = tok.encode(ctx) + tok.encode(conts[0])
    assert rec["samples"][0]["logprob_sum"][0] == pytest.approx(
        full_logit_logprob(random_model(3), ids, len(tok.encode(ctx))), rel=1e-5)


def test_multiple_choice_prompts():
    item = {"question": "2+2?", "choices": ["3", "4"], "answer": 1}
    shot = {"question": "1+1?", "choices": ["2", "5"], "answer": 0}
    ctx, conts = E.mc_prompt(item, [shot], "text")
    assert ctx == "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:" and conts == [" 3", " 4"]
    ctx, conts = E.mc_prompt(item, [shot], "letters")
    assert ctx == "Question: 1+1?\nA. 2\nB. 5\nAnswer: A\n\nQuestion: 2+2?\nA. 3\nB. 4\nAnswer:"
    assert conts == [" A", " B"]


# ---- generative -------------------------------------------------------------------------------------------------
def test_generative_extracts_and_scores_answers(tok, tmp_path):
    """A model that always says 'The answer is 42.' then stops: right where the answer is 42, wrong elsewhere."""
    rows = [{"id": "a", "question": "What is 40 + 2?", "answer": "42", "oracle": "math"},
            {"id": "b", "question": "What is 3 + 4?", "answer": "7", "oracle": "math"},
            {"id": "c", "question": "Write f.", "answer": "", "oracle": "code", "tests": "assert f(1) == 1"},
            {"id": "d", "messages": [{"role": "user", "content": "How many?"}], "answer": "42.0"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    plain_last = E.generative_prompt(tok, rows[0], [], "plain")[-1]
    chat_last = E.generative_prompt(tok, rows[0], [], "chat")[-1]
    assert {E.generative_prompt(tok, r, [], "plain")[-1] for r in rows} == {plain_last}
    words = tok.encode(" The answer is 42.")
    assert len(set(words)) == len(words) and not {plain_last, chat_last} & set(words)
    chain = {plain_last: words[0], chat_last: words[0], **dict(zip(words, words[1:]))}
    model = bigram_model({**chain, words[-1]: EOS_ID})
    cfg = E.EvalConfig(batch_size=3)
    for style in ("plain", "chat"):
        task = E.GenerativeTask(name="g", path=path, prompt=style, max_new_tokens=12)
        rec = E.eval_generative(model, tok, task, cfg, CPU)
        assert [s["completion"] for s in rec["samples"]] == [" The answer is 42."] * 4
        assert [s["correct"] for s in rec["samples"]] == [True, False, False, True]
        assert [s["extracted"] for s in rec["samples"]] == ["42"] * 4
        m = rec["metrics"]
        assert m["accuracy"] == 0.5 and m["accuracy_code"] == 0.0 and m["accuracy_math"] == pytest.approx(2 / 3)
    # sampled: with a chain this sharp every sample is the same answer; num_samples multiplies the rows
    task = E.GenerativeTask(name="g", path=path, temperature=0.5, num_samples=2, max_new_tokens=12)
    rec = E.eval_generative(model, tok, task, cfg, CPU)
    assert len(rec["samples"]) == 8 and rec["metrics"]["accuracy"] == 0.5


def test_generative_few_shot_prompt_and_stop(tok):
    shots = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "solution": "2+2=4. The answer is 4."}]
    ids = E.generative_prompt(tok, {"question": "3+3?"}, shots, "plain")
    assert tok.decode(ids) == ("Question: 1+1?\nAnswer: The answer is 2.\n\nQuestion: 2+2?\nAnswer: 2+2=4. The answer "
                               "is 4.\n\nQuestion: 3+3?\nAnswer:")
    chat = E.generative_prompt(tok, {"question": "3+3?"}, shots, "chat")
    assert chat == tok.apply_chat_template([
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "The answer is 2."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "2+2=4. The answer is 4."},
        {"role": "user", "content": "3+3?"}], add_generation_prompt=True)
    # completions are cut before the stop token; a row that never stops runs max_new_tokens
    a, b = tok.encode(" yes")[0], tok.encode(" no")[0]
    model = bigram_model({a: EOD_ID, b: b})
    texts = E.generate_texts(model, tok, [[a], [b]], 5, 0.0, 1.0, E.EvalConfig(), CPU)
    assert texts == ["", " no" * 5]


# ---- perplexity -------------------------------------------------------------------------------------------------
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
    cfg = E.EvalConfig(batch_size=3, seq_len=seq_len, perplexity=[
        E.PerplexitySource(name="a", path=a, provenance="synthetic"),
        E.PerplexitySource(name="b", path=b, provenance="synthetic", text_field="body"),
        E.PerplexitySource(name="org", path=str(tmp_path / "org"), held_out_fraction=0.3, seed=7)])
    records = {r["task"]: r for r in E.eval_perplexity(model, tok, cfg.perplexity, cfg, CPU)}

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
    capped = E.PerplexitySource(name="a", path=a, provenance="synthetic", max_tokens=30)
    _, docs = E.perplexity_documents(capped, tok)
    assert sum(len(d) - 1 for d in docs) == 30
    with pytest.raises(ConfigError, match="provenance"):
        E.perplexity_documents(E.PerplexitySource(name="a", path=a), tok)


# ---- long-context recall ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [160, 512, 4096, 8192, 16384])
def test_recall_probe_is_exact_and_well_formed(tok, length):
    probe = E.build_recall_prompt(tok, length, seed=3)
    ids = probe["ids"]
    assert len(ids) == length
    assert tok.encode(tok.decode(ids)) == ids  # the ids are the text's own tokenisation
    text = tok.decode(ids)
    body = text[text.index("JSON data:\n") + len("JSON data:\n"): text.index("\n\nKey:")]
    data = json.loads(body)
    assert len(data) == probe["pairs"] and data[probe["key"]] == probe["value"]
    assert body.count(probe["key"]) == 1  # the key is present once in the object...
    assert text.endswith(f'Key: "{probe["key"]}"\nCorresponding value:')  # ...and asked for at the end
    assert list(data).index(probe["key"]) == probe["position"]
    assert E.build_recall_prompt(tok, length, seed=3) == probe  # deterministic by seed
    assert E.build_recall_prompt(tok, length, seed=4)["ids"] != ids


def test_recall_probe_chat_and_errors(tok):
    probe = E.build_recall_prompt(tok, 300, seed=0, chat=True)
    ids = probe["ids"]
    assert len(ids) == 300
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-1] == tok.token_id("<|im_sep|>")
    assert tok.decode(ids).endswith("Corresponding value:<|im_end|><|im_start|>assistant<|im_sep|>")
    with pytest.raises(ValueError, match="too short"):
        E.build_recall_prompt(tok, 100, seed=0)


def test_recall_scoring_and_run(tok):
    v = "3e1e695e-2e7e-46a9-a21e-ef62ce50c47a"
    assert E.recall_scores(f' "{v}"\n}}', v) == {"exact_match": 1.0, "substring_match": 1.0}
    assert E.recall_scores(f" The value is {v}", v) == {"exact_match": 0.0, "substring_match": 1.0}
    assert E.recall_scores(' "3e1e695e"', v) == {"exact_match": 0.0, "substring_match": 0.0}
    assert E.recall_scores("", v)["exact_match"] == 0.0
    model = random_model(0, max_seq_len=256)
    cfg = E.EvalConfig(recall=E.RecallProbe(lengths=[160, 300], samples=2))
    rec = E.eval_recall(model, tok, cfg.recall, cfg, CPU)
    assert set(rec["skipped"]) == {"len_300"}  # 300 + answer tokens > max_seq_len 256
    assert {s["length"] for s in rec["samples"]} == {160} and len(rec["samples"]) == 2
    assert 0.0 <= rec["metrics"]["len_160/substring_match"] <= 1.0
    assert model.cfg.max_seq_len == 256


# ---- configuration, CLI, in-loop --------------------------------------------------------------------------------
def test_smoke_config_loads_and_bad_values_are_named(tmp_path):
    cfg = load_config(REPO_ROOT / "configs/smoke/eval.yaml", ["model_path=somewhere"], schema=E.EvalConfig)
    assert cfg.model_path == "somewhere" and cfg.multiple_choice[0].path.endswith("eval_mc.jsonl")
    assert {t.prompt for t in cfg.generative} == {"plain", "chat"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("multiple_choice:\n  - {name: x, path: x.jsonl, format: essay}\n")
    with pytest.raises(ConfigError, match=r"multiple_choice\[0\].format='essay'; expected one of \['text', "):
        load_config(bad, schema=E.EvalConfig)
    with pytest.raises(ConfigError, match="recal"):
        load_config(bad, ["recal.samples=3"], schema=E.EvalConfig)
    bad.write_text("perplexity: [{name: x, path: a.jsonl}]\noutput_dir: out\nmodel_path: nowhere\n")
    assert E.main([str(bad)]) == 2
    rows = tmp_path / "mc.jsonl"
    rows.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n{"question": "q2", "choices": ["a"]}\n')
    cfg = E.EvalConfig(model_path=str(tmp_path), multiple_choice=[E.MultipleChoiceTask(name="m", path=str(rows))])
    with pytest.raises(ValueError, match=r"mc.jsonl line 2: missing key\(s\) \['answer'\]"):
        E.check_inputs(cfg)


@pytest.mark.slow
def test_cli_on_a_trained_checkpoint(tok, tmp_path):
    """A real (1-process) training run; eval loads its newest checkpoint, writes results, samples, offline wandb."""
    from tests.helpers.train import check, make_sources, run_train, write_run_config

    sources = make_sources(tmp_path / "shards", docs_per_source=40)
    run_dir = tmp_path / "run"
    cfg_path = write_run_config(tmp_path / "run.yaml", sources, run_dir,
                                train={"seq_len": 64, "global_batch": 2, "micro_batch": 2, "max_steps": 2,
                                       "save_every": 2, "log_every": 1})
    check(run_train(cfg_path))
    model, info = E.load_model(run_dir, CPU, torch.float32)
    assert info["step"] == 2 and model.cfg.dim == 32
    from train.checkpoint import consolidated_state_dict, resolve_checkpoint_dir

    state = consolidated_state_dict(resolve_checkpoint_dir(run_dir)[0])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    from train.export.hf import to_hf

    to_hf(model, tmp_path / "hf")  # an exported directory loads to the same weights
    hf_model, hf_info = E.load_model(tmp_path / "hf", CPU, torch.float32)
    assert hf_info["step"] is None and all(torch.equal(state[k], v) for k, v in hf_model.state_dict().items())

    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}", "choices": ["a", "b", "c"], "answer": i % 3}
                                             for i in range(4)])
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}])
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(json.dumps({
        "model_path": str(run_dir), "output_dir": str(tmp_path / "eval"), "label": "after",
        "multiple_choice": [{"name": "mc", "path": mc}],
        "generative": [{"name": "q", "path": qs, "max_new_tokens": 4}],
        "perplexity": [{"name": "syn", "path": str(sources["syn"]), "max_docs": 3}],
        "recall": {"lengths": []}, "wandb": {"mode": "offline", "project": "test"}}))
    assert E.main([str(eval_yaml), "batch_size=2"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "eval/results.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["task"]) for r in lines] == [("multiple_choice", "mc"), ("generative", "q"),
                                                       ("perplexity", "syn"), ("perplexity_by_provenance", "synthetic")]
    assert all(r["label"] == "after" and r["step"] == 2 for r in lines)
    assert 0 < lines[2]["metrics"]["nll"] < 13  # ~ln V for a 2-step model
    assert (tmp_path / "eval/samples/after.mc.mc.jsonl").is_file()
    assert list((tmp_path / "eval/wandb").glob("offline-run-*/run-*.wandb"))
    assert E.main([str(eval_yaml)]) == 0  # a second evaluation appends
    assert len((tmp_path / "eval/results.jsonl").read_text().splitlines()) == 8


def test_evaluate_in_loop_returns_flat_metrics_and_restores_mode(tok, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}] * 2)
    model = random_model(0)
    model.train()
    cfg = E.EvalConfig(multiple_choice=[E.MultipleChoiceTask(name="mc", path=mc)],
                       recall=E.RecallProbe(lengths=[160], samples=1))
    out = E.evaluate(model, tok, cfg, CPU)
    assert model.training
    assert set(out) >= {"eval/mc/mc/accuracy", "eval/mc/mc/acc_sum", "eval/recall/json_kv/len_160/exact_match"}
    assert all(k.startswith("eval/") for k in out)
    assert dataclasses.asdict(cfg)  # a plain dataclass the trainer can carry in its config


ZERO3_SCRIPT = r'''
import json, sys
import deepspeed, torch
import train.eval.run as E
from data.tokenizer import Phi4Tokenizer
from model.transformer import Transformer
from train.config import load_config
from train.engine import build_engine, build_model, deepspeed_config, init_distributed

run_yaml, eval_json, out_dir = sys.argv[1:4]
cfg = load_config(run_yaml, ["deepspeed.zero_stage=3"])
d = init_distributed(cfg)
ds = deepspeed_config(cfg, d.world_size, d.precision)
torch.manual_seed(0)
engine, _, _ = build_engine(cfg, build_model(cfg.model, ds, d), ds)
ecfg = E.EvalConfig(**json.loads(open(eval_json).read()))
ecfg.multiple_choice = [E.MultipleChoiceTask(**t) for t in ecfg.multiple_choice]
ecfg.generative = [E.GenerativeTask(**t) for t in ecfg.generative]
ecfg.recall = E.RecallProbe(**ecfg.recall)
tok = Phi4Tokenizer()
result = {"zero3": E.evaluate(engine.module, tok, ecfg, d.device)}
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    full = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
plain = Transformer(cfg.model)
plain.load_state_dict(full)
result["plain"] = E.evaluate(plain, tok, ecfg, d.device)
json.dump(result, open(f"{out_dir}/rank{d.rank}.json", "w"))
'''


@pytest.mark.slow
def test_in_loop_evaluation_under_zero3_matches_plain_model(tmp_path):
    """Two real ZeRO-3 ranks evaluate the engine's module (generation included) with the same results on both ranks,
    equal to the gathered model evaluated without ZeRO."""
    import subprocess
    import sys

    from tests.helpers.train import REPO, make_sources, write_run_config

    sources = make_sources(tmp_path / "shards", docs_per_source=20)
    run_yaml = write_run_config(tmp_path / "run.yaml", sources, tmp_path / "run",
                                train={"seq_len": 64, "global_batch": 2, "micro_batch": 1, "max_steps": 1})
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": f"q{i}", "choices": ["a", "bb c", "d"], "answer": 1}
                                             for i in range(3)])
    qs = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "2"}, {"question": "2+5?", "answer": "7"}])
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({
        "batch_size": 2, "multiple_choice": [{"name": "mc", "path": mc}],
        "generative": [{"name": "q", "path": qs, "max_new_tokens": 6}],
        "recall": {"lengths": [160], "samples": 1, "allow_beyond_context": True}}))  # tiny context: 128
    script = tmp_path / "zero3_eval.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(run_yaml), str(eval_json), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["zero3"] == r1["zero3"]
    for key, value in r0["plain"].items():
        assert r0["zero3"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert "eval/gen/q/accuracy" in r0["zero3"] and "eval/recall/json_kv/len_160/exact_match" in r0["zero3"]
