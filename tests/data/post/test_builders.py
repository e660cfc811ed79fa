"""The post-training data builders through the scripted test double (answers known): the exact records kept and
dropped by judged SFT, judge-guided pairs, hallucination data (5-token id pairs) and safety data."""
from __future__ import annotations

import asyncio
import json

import pytest

from data.configfile import ConfigError
from data.post.config import PostDataConfig, load_post_config
from data.post.judge import Verdict, best_pairs, parse_matches_key, parse_verdict, prefer
from data.post.run import run
from data.tokenizer import EOS_ID
from tests.helpers.synth import ScriptedBackend, read_records, write_jsonl


def verdict_json(acc, style, detail, domain="math"):
    return json.dumps({"faults": ["none"], "accuracy": acc, "style": style, "detail": detail, "domain": domain})


def test_judge_rules():
    v = parse_verdict("faults first... " + verdict_json(4, 3, 5))
    assert (v.accuracy, v.style, v.detail, v.overall, v.domain) == (4, 3, 5, 4.0, "math")
    assert parse_verdict('{"accuracy": 6, "style": 3, "detail": 3}') is None  # out of the 1-5 scale
    assert parse_verdict("no json") is None
    a, b, c = (Verdict(4, 1, 1, [], ""), Verdict(3, 5, 5, [], ""), Verdict(3, 4, 4, [], ""))
    assert prefer(a, b) == (0, "accuracy")  # accuracy decides before overall
    assert prefer(b, c) == (0, "overall") and prefer(c, c) is None
    assert best_pairs([a, b, None, c], limit=2) == [(0, 1, "accuracy")]  # each response in one pair; then c vs ?
    assert best_pairs([b, c, a], limit=1) == [(2, 0, "accuracy")] or best_pairs([b, c, a], 1)[0][2] == "accuracy"
    assert [parse_matches_key(t) for t in ('{"matches_key": "True"}', '{"matches_key": false}', "maybe")] == \
        ["True", "False", "Uncertain"]


def _cfg(tmp_path, **sections) -> PostDataConfig:
    cfg = PostDataConfig(output_dir=str(tmp_path / "out"))
    cfg.generator.kind = "inprocess"
    cfg.generator.inprocess.model = "unused: the test passes its own backends"
    cfg.sft.enabled = cfg.judge_pairs.enabled = cfg.hallucination.enabled = cfg.safety.enabled = False
    for name, values in sections.items():
        for k, v in values.items():
            setattr(getattr(cfg, name), k, v)
    cfg.validate()
    return cfg


def _run(cfg, backends, tok, make=("sft", "dpo")):
    return asyncio.run(run(cfg, backends, tok, make))


def test_judged_sft_picks_the_best_candidate(tmp_path, tok):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "P1", "domain": "math"}, {"prompt": "P2"}, {"prompt": "P3"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "P4"}]}])
    scores = {("P1", 0): (3, 3, 3), ("P1", 1): (5, 4, 4), ("P1", 2): (5, 4, 4),  # tie: the earlier candidate
              ("P2", 0): (1, 1, 2), ("P2", 1): (2, 2, 1), ("P2", 2): (1, 2, 2),  # best 5/3 < 3: low_score
              ("P4", 0): (4, 4, 4)}

    def rule(template, text, k):
        if template == "chat":
            return f"{text} answer {k}"
        if template == "judge":
            resp = text.split('Response to judge:\n"""\n')[1].split("\n")[0]
            prompt, n = resp.split(" answer ")
            s = scores.get((prompt, int(n)))
            return verdict_json(*s, domain="code") if s else "cannot judge"
        raise AssertionError(template)

    b = ScriptedBackend(rule)
    cfg = _cfg(tmp_path, sft={"enabled": True, "prompts": [str(prompts)], "responses": 3})
    manifest = _run(cfg, {"generator": b, "judge": b, "policy": b}, tok, ("sft",))
    assert manifest["steps"]["sft_judged"] == {"in": 4, "kept": 2, "dropped": {"low_score": 1, "unjudged": 1}}
    rows = read_records(tmp_path / "out" / "sft.judged.jsonl")
    assert [r["messages"][-1]["content"] for r in rows] == ["P1 answer 1", "P4 answer 0"]
    assert [r["domain"] for r in rows] == ["math", "code"]  # the prompt's tag first, else the judge's
    assert rows[0]["scores"]["chosen"] == 1 and set(rows[0]["scores"]["candidates"]) == {"0", "1", "2"}
    assert rows[1]["messages"][0] == {"role": "system", "content": "be brief"}


def test_judge_guided_pairs(tmp_path, tok):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "A"}, {"prompt": "B"}, {"prompt": "C"}])
    judged = {"A pol": (2, 5, 5), "A gen": (4, 2, 2),  # accuracy wins over style and detail
              "B pol": (3, 4, 5), "B gen": (3, 3, 3),  # equal accuracy: the higher overall (policy)
              "C pol": (3, 3, 3), "C gen": (3, 3, 3)}  # no clear preference

    def rule(template, text, k):
        if template == "judge":
            resp = text.split('Response to judge:\n"""\n')[1].split("\n")[0]
            return verdict_json(*judged[resp])
        raise AssertionError(template)

    policy = ScriptedBackend(lambda t, text, k: f"{text} pol")
    generator = ScriptedBackend(lambda t, text, k: f"{text} gen" if t == "chat" else rule(t, text, k))
    cfg = _cfg(tmp_path, judge_pairs={"enabled": True, "prompts": [str(prompts)], "policy_samples": 1,
                                      "generator_samples": 1})
    manifest = _run(cfg, {"generator": generator, "judge": generator, "policy": policy}, tok, ("dpo",))
    steps = manifest["steps"]
    assert steps["judge_pairs"] == {"in": 3, "kept": 2, "dropped": {"no_preference": 1}}
    assert steps["judge_pairs_accuracy"]["kept"] == 1 and steps["judge_pairs_overall"]["kept"] == 1
    rows = read_records(tmp_path / "out" / "dpo.judge_pairs.jsonl")
    assert [(r["chosen"], r["rejected"], r["pair_kind"]) for r in rows] == [
        ("A gen", "A pol", "accuracy"), ("B pol", "B gen", "overall")]
    assert rows[0]["prompt"] == [{"role": "user", "content": "A"}] and len(policy.calls) == 3


def test_hallucination_sft_and_five_token_pairs_on_ids(tmp_path, tok):
    trivia = write_jsonl(tmp_path / "t.jsonl", [
        {"question": "Capital of France?", "answer": "Paris"},      # always right
        {"question": "Year of the Zorp treaty?", "answer": "1812"},  # never right
        {"question": "Tallest mountain?", "answer": "Everest"}])     # right 2 of 4
    policy_answers = {"Capital of France?": ["Paris"] * 4, "Year of the Zorp treaty?": ["1700", "1650", "1700", ""],
                      "Tallest mountain?": ["Everest", "K2 for sure, no doubt", "Everest", "K2"]}

    def gen(template, text, k):
        q = text.rsplit("\n\n", 1)[-1]
        return {"correct_answer": f"The answer to '{q}' is the key.",
                "refusal": "I am not sure, and I would rather not guess the answer.",
                "bogus_question": f"Bogus version of {q}",
                "bogus_refusal": "That premise seems to be false, so I cannot answer."}[template]

    policy = ScriptedBackend(lambda t, text, k: policy_answers[text][k])
    cfg = _cfg(tmp_path, hallucination={"enabled": True, "questions": [str(trivia)], "samples": 4,
                                        "usually_right": 0.5, "checker": "rule"})
    generator = ScriptedBackend(gen)
    manifest = _run(cfg, {"generator": generator, "judge": generator, "policy": policy}, tok)
    sft = read_records(tmp_path / "out" / "sft.hallucination.jsonl")
    assert [(r["question"], r["kind"], r["p_correct"]) for r in sft] == [
        ("Capital of France?", "answer", 1.0), ("Bogus version of Capital of France?", "bogus_refusal", 1.0),
        ("Year of the Zorp treaty?", "refusal", 0.0), ("Bogus version of Year of the Zorp treaty?", "bogus_refusal", 0.0),
        ("Tallest mountain?", "answer", 0.5), ("Bogus version of Tallest mountain?", "bogus_refusal", 0.5)]
    dpo = read_records(tmp_path / "out" / "dpo.hallucination.jsonl")
    assert [(r["question"], r["pair_kind"]) for r in dpo] == [
        ("Capital of France?", "correct>refusal"), ("Year of the Zorp treaty?", "refusal>wrong"),
        ("Tallest mountain?", "correct>refusal"), ("Tallest mountain?", "refusal>wrong")]
    for r in dpo:
        assert r["prompt_ids"] == tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                                          add_generation_prompt=True)
        for side in ("chosen", "rejected"):
            ids = r[f"{side}_ids"]
            # the first 5 ids of the response's own tokens: no EOS appended, not re-tokenised from a cut string
            assert ids == tok.encode(r[f"{side}_text"])[:5] and EOS_ID not in ids and len(ids) <= 5
    assert dpo[1]["rejected_text"] == "1700" and dpo[3]["rejected_text"] == "K2 for sure, no doubt"
    assert manifest["steps"]["hallucination_dpo"] == {"in": 4, "kept": 4, "dropped": {}}


def test_safety_sft_and_judged_pairs(tmp_path, tok):
    prompts = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "How do I pick a lock?", "category": "crime"}])

    def gen(template, text, k):
        if template == "safety_prompt":
            return "How do I make a weapon?" if "violence" in text else ""
        if template == "safe_chat":
            return f"I can't help with '{text}', but here is a safe alternative."
        if template == "safety_judge":
            return '{"safety": 5}' if "safe alternative" in text else '{"safety": 2}'
        raise AssertionError(template)

    def pol(template, text, k):
        return "Sure, step one..." if "lock" in text else "I can't help with that, but here is a safe alternative."

    cfg = _cfg(tmp_path, safety={"enabled": True, "prompts": [str(prompts)], "categories": ["violence", "self-harm"],
                                 "per_category": 1})
    g = ScriptedBackend(gen)
    manifest = _run(cfg, {"generator": g, "judge": g, "policy": ScriptedBackend(pol)}, tok)
    sft = read_records(tmp_path / "out" / "sft.safety.jsonl")
    assert [(r["category"], r["messages"][0]["content"]) for r in sft] == [
        ("crime", "How do I pick a lock?"), ("violence", "How do I make a weapon?")]
    assert all(r["domain"] == "safety" for r in sft)
    dpo = read_records(tmp_path / "out" / "dpo.safety.jsonl")
    assert [(r["prompt"][0]["content"], r["rejected"]) for r in dpo] == [("How do I pick a lock?", "Sure, step one...")]
    assert manifest["steps"]["safety_dpo"] == {"in": 2, "kept": 1, "dropped": {"not_safer": 1}}
    assert manifest["steps"]["safety_prompts"]["dropped"] == {"empty": 1}


def test_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\ngenerator: {kind: inprocess, inprocess: {model: m}}\n"
                    "sft: {prompts: [p.jsonl], responses: 1}\n")
    with pytest.raises(ConfigError, match="responses >= 2"):
        load_post_config(path)
    path.write_text("output_dir: x\ngenerator: {kind: openai}\n")
    with pytest.raises(ConfigError, match="generator.openai.model is required"):
        load_post_config(path)
