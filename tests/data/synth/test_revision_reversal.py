"""Self-revision and instruction reversal through the scripted test double: the exact records kept and dropped, the
scores kept on them, and the reversal's fidelity decided by the original's tests in the sandbox."""
from __future__ import annotations

import asyncio
import json

from data.synth.pipeline import merge, run_shard
from tests.helpers.synth import ScriptedBackend, base_config, read_records, write_jsonl

SEEDS = ["alpha " * 60, "beta " * 60, "gamma " * 60, "delta " * 60]


def test_revision_rounds_scores_and_drops(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in SEEDS])

    def rule(template, text, k):
        if template == "rewrite_textbook":
            return "DRAFT " + text.split()[-1]  # DRAFT alpha, ...
        if template == "critique":
            draft = text.split('"""\n')[1].split("\n")[0]
            word = draft.split()[-1]
            scores = {"alpha": (5, 4), "beta": (2, 3), "gamma": None, "delta": (1, 1)}[word]
            if draft.startswith("REVISED"):
                scores = (4, 5) if word == "beta" else (2, 2)
            if scores is None:
                return "I think it is fine."  # not the JSON asked for
            return json.dumps({"reasoning": scores[0], "factual_accuracy": scores[1], "suggestions": [f"fix {word}"]})
        if template == "revise":
            assert "fix " in text
            return "REVISED " + text.split('"""\n')[1].split("\n")[0].split()[-1]
        raise AssertionError(template)

    cfg = base_config(tmp_path / "out", seeds={"inputs": [str(seeds)]},
                      rewrite={"enabled": True, "styles": ["textbook"]},
                      revision={"enabled": True, "rounds": 1, "target_score": 4, "min_final_score": 3})
    manifest = asyncio.run(run_shard(cfg, ScriptedBackend(rule)))
    assert manifest["steps"]["revision"] == {"in": 4, "kept": 2,
                                             "dropped": {"critique_unparseable": 1, "low_score": 1}}
    merge(cfg, 1)
    rows = {r["text"]: r for r in read_records(tmp_path / "out" / "synth.web_rewrite.jsonl")}
    assert sorted(rows) == ["DRAFT alpha", "REVISED beta"]
    assert rows["DRAFT alpha"]["revisions"] == 0
    assert [s["reasoning"] for s in rows["DRAFT alpha"]["scores"]["rounds"]] == [5]
    beta = rows["REVISED beta"]
    assert beta["revisions"] == 1 and [(s["reasoning"], s["factual_accuracy"]) for s in beta["scores"]["rounds"]] \
        == [(2, 3), (4, 5)]
    assert beta["scores"]["final"] == {"reasoning": 4, "factual_accuracy": 5}
    assert beta["provenance"]["revised_from"] != beta["id"]


GOOD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_reversal_keeps_only_faithful_pairs(tmp_path):
    snippets = write_jsonl(tmp_path / "code.jsonl", [
        {"code": GOOD, "tests": TESTS},                                              # faithful -> kept
        {"code": GOOD.replace("add", "plus"), "tests": TESTS.replace("add", "plus")},  # regenerated wrong -> dropped
        {"code": "def add(a, b):\n    return a - b\n", "tests": TESTS},              # original fails its tests
    ])

    def rule(template, text, k):
        if template == "code_to_instruction":
            name = "plus" if "def plus" in text else "add"
            return f"Write a function {name}(a, b) that returns the sum."
        if template == "instruction_to_code":
            if "plus" in text:
                return "```python\ndef plus(a, b):\n    return a * b\n```"  # unfaithful
            return "Here:\n```python\ndef add(a, b):\n    return b + a\n```"
        raise AssertionError(template)

    cfg = base_config(tmp_path / "out", reversal={"enabled": True, "inputs": [str(snippets)]})
    backend = ScriptedBackend(rule)
    manifest = asyncio.run(run_shard(cfg, backend))
    assert manifest["steps"]["reversal"] == {"in": 3, "kept": 1, "dropped": {"original_fails": 1, "not_faithful": 1}}
    assert len(backend.calls) == 4  # the failing original never reaches the model
    merge(cfg, 1)
    (row,) = read_records(tmp_path / "out" / "synth.code_reversal.jsonl")
    assert row["text"] == f"Write a function add(a, b) that returns the sum.\n\n```python\n{GOOD.rstrip()}\n```\n"
    assert row["regenerated_code"].strip() == "def add(a, b):\n    return b + a"
    assert row["validation"]["passed"] and row["validation"]["regenerated"]["status"] == "passed"
    assert row["provenance"]["seed_location"] == {"file": str(snippets), "line": 1}
