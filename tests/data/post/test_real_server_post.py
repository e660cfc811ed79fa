"""The post-training data builders end to end against a real OpenAI-compatible server (llama.cpp's, serving a GGUF
this module writes): every builder's requests reach the server, the files are well formed, and a rerun sends none of
the finished requests again (counted at the server). The judge is a tiny random model, so its rubric never parses:
what this shows is the wiring and the counted drops; the exact decisions are asserted with the test double
(test_builders.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.data.synth.test_real_server import access_statuses, gguf, server  # noqa: F401 (module fixtures)
from tests.helpers.synth import read_records, write_jsonl

pytestmark = pytest.mark.slow
REPO = __import__("pathlib").Path(__file__).resolve().parents[3]


def test_every_builder_through_the_real_server(server, tmp_path):  # noqa: F811
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Why is the sky blue?"}, {"prompt": "What is 7 x 6?"}])
    trivia = write_jsonl(tmp_path / "t.jsonl", [{"question": "Capital of Italy?", "answer": "Rome"}])
    safety = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "How do I pick a lock?", "category": "crime"}])
    backend = {"kind": "openai", "concurrency": 4,
               "openai": {"base_url": server["base_url"], "model": server["model"], "max_retries": 1,
                          "timeout_s": 120, "extra_body": {"repeat_penalty": 1.0}}}
    cfg = tmp_path / "post.yaml"
    cfg.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "sampling": {"temperature": 0.0, "max_tokens": 8},
        "judge_max_tokens": 16, "generator": backend,
        "sft": {"prompts": [str(prompts)], "responses": 2},
        "judge_pairs": {"prompts": [str(prompts)], "policy_samples": 1, "generator_samples": 1},
        "hallucination": {"questions": [str(trivia)], "samples": 2},
        "safety": {"prompts": [str(safety)]}}))
    _, start = access_statuses(server)
    proc = subprocess.run([sys.executable, "-m", "train.post", str(cfg)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses, end = access_statuses(server, start)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    logged = [json.loads(line) for line in (out / "requests.generator.jsonl").read_text().splitlines()]
    # one backend plays all three roles here, so one log holds every request; the server answered each once
    assert len(statuses) == len(logged) == manifest["requests"]["generator"]["sent"] > 0
    assert all(s == 200 for s in statuses) and len({e["key"] for e in logged}) == len(logged)
    for step, e in manifest["steps"].items():
        assert e["in"] == e["kept"] + sum(e["dropped"].values()), step
    # 2 prompts x 2 SFT candidates + 2 x (1 + 1) pair responses + 2 hallucination probes + 3 generator texts + ...
    assert manifest["steps"]["sft_judged"]["in"] == 2 and manifest["steps"]["judge_pairs"]["in"] == 2
    assert set(manifest["files"]) == {"sft.judged.jsonl", "dpo.judge_pairs.jsonl", "sft.hallucination.jsonl",
                                      "dpo.hallucination.jsonl", "sft.safety.jsonl", "dpo.safety.jsonl"}
    for row in read_records(out / "sft.safety.jsonl"):
        assert row["messages"][-1]["role"] == "assistant" and row["domain"] == "safety"
    for row in read_records(out / "dpo.hallucination.jsonl"):
        assert len(row["chosen_ids"]) <= 5 and len(row["rejected_ids"]) <= 5
    again = subprocess.run([sys.executable, "-m", "train.post", str(cfg)], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert access_statuses(server, end)[0] == []  # nothing sent again
    assert json.loads((out / "manifest.json").read_text())["requests"]["generator"]["sent"] == 0
