"""Plurality filtering: the vote rule on known answers, and the whole question step through the scripted test double
(whose answers are known), asserting exactly which questions are kept and dropped, and why."""
from __future__ import annotations

import asyncio

from data.synth.pipeline import merge, run_shard
from data.synth.plurality import plurality_vote
from tests.helpers.synth import ScriptedBackend, base_config, read_records, write_jsonl


def test_vote_rule():
    ans = lambda *xs: [f"Work... The answer is {x}." if x is not None else "no idea" for x in xs]  # noqa: E731
    v = plurality_vote(ans(7, 7, 7, 7, 7))
    assert (v.kept, v.reason, v.answer) == (False, "all_agree", "7")
    v = plurality_vote(ans(1, 2, 3, 4, 5))
    assert (v.kept, v.reason) == (False, "no_plurality")
    v = plurality_vote(ans(1, 1, 2, 2, 3))  # a tie at the top is no plurality
    assert (v.kept, v.reason) == (False, "no_plurality")
    v = plurality_vote(ans(2, 9, 9, 3, 9))
    assert (v.kept, v.answer, v.winner, v.votes) == (True, "9", 1, {"2": 1, "9": 3, "3": 1})
    v = plurality_vote(ans("1,000", "1000", "1000.0", 5, None))  # numbers compared by value; no answer votes nothing
    assert (v.kept, v.answer, v.winner, v.votes) == (True, "1,000", 0, {"1000": 3, "5": 1})
    v = plurality_vote(ans(4, 4, 4, 4, None))  # four agree, one abstains: not "all agree"
    assert v.kept and v.answer == "4"
    assert plurality_vote([None, "nothing here", None]).reason == "no_answer"


SCRIPT = {  # question -> the five sampled answers
    "Q-easy": [5, 5, 5, 5, 5],
    "Q-kept": [3, 8, 8, 1, 8],
    "Q-hard": [1, 2, 3, 4, 5],
    "Q-tie": [6, 6, 2, 2, 9],
}


def test_question_step_keeps_exactly_the_plurality_questions(tmp_path):
    organic = write_jsonl(tmp_path / "q.jsonl", [{"question": q} for q in SCRIPT])
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"text": "Seed passage about primes. " * 12}])

    def rule(template, text, k):
        if template == "make_question":
            return "Q-synth"
        if template == "answer":
            q = text.split("\n\n")[0]
            return f"Step... The answer is {(SCRIPT.get(q) or [4, 4, 4, 7, 2])[k]}."
        raise AssertionError(template)

    cfg = base_config(tmp_path / "out", seeds={"inputs": [str(seeds)]},
                      questions={"enabled": True, "organic": [str(organic)], "answers": 5})
    backend = ScriptedBackend(rule)
    manifest = asyncio.run(run_shard(cfg, backend))
    steps = manifest["steps"]
    assert steps["plurality_organic"] == {"in": 4, "kept": 1, "dropped": {"all_agree": 1, "no_plurality": 2}}
    assert steps["plurality_synthetic"] == {"in": 1, "kept": 1, "dropped": {}}
    assert len(backend.calls) == 1 + 5 * 5  # one question written from the seed, five answers to each question
    assert len({c.seed for c in backend.calls if "Q-kept" in c.messages[-1][1]}) == 5  # five distinct seeds
    merge(cfg, 1)
    rows = read_records(tmp_path / "out" / "synth.qa.jsonl")
    assert [(r["question"], r["answer"], r["votes"], r["origin"]) for r in rows] == [
        ("Q-kept", "8", {"3": 1, "8": 3, "1": 1}, "organic"),
        ("Q-synth", "4", {"4": 3, "7": 1, "2": 1}, "synthetic")]
    # rejection sampling: the text is the question with the first response that reached the plurality answer
    assert rows[0]["text"] == "Question: Q-kept\n\nStep... The answer is 8."
    assert rows[0]["provenance"]["sample_index"] == 1
    assert rows[1]["provenance"]["parents"][0].startswith("seed:")
    assert rows[1]["provenance"]["seed_location"]["file"] == str(seeds)
