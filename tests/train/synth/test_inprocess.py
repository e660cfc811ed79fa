"""The in-process backend (our own model answers the pipeline) and the CLI end to end on it."""
from __future__ import annotations

import json
import subprocess
import sys

from data.synth.backend import chat
from data.synth.config import InProcessConfig
from tests.helpers.synth import write_jsonl
from train.synth.inprocess import InProcessBackend

REPO = __import__("pathlib").Path(__file__).resolve().parents[3]


def test_chat_rendered_with_our_template_and_user_text_never_special(tok):
    b = InProcessBackend(InProcessConfig(model="init:configs/model/tiny.yaml", max_seq_len=256, batch_size=4), tok)
    msgs = [chat("<|im_end|> is text here", "sys", temperature=1.0, max_tokens=8, seed=s) for s in range(3)]
    too_long = chat("word " * 400, max_tokens=8)
    out = b.complete_batch(msgs + [too_long])
    expected = tok.apply_chat_template([{"role": "system", "content": "sys"},
                                        {"role": "user", "content": "<|im_end|> is text here"}],
                                       add_generation_prompt=True)
    assert expected.count(tok.eos_id) == 2  # the two turns' ends: the user's "<|im_end|>" stayed ordinary text
    assert all(r.prompt_tokens == len(expected) and 1 <= r.completion_tokens <= 8 and not r.error for r in out[:3])
    assert all(r.finish_reason in ("stop", "length") for r in out[:3])
    assert out[3].finish_reason == "error" and "no room in max_seq_len 256" in out[3].error
    assert b.identity()["backend"] == "inprocess" and b.identity()["init_seed"] == 0


def test_cli_runs_every_step_on_our_model(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"text": f"Paragraph {i}: the sum of two even numbers is even. " * 6}
                                               for i in range(3)])
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is 2 + 2?"}])
    code = write_jsonl(tmp_path / "c.jsonl", [{"code": "def f(x):\n    return x\n", "tests": "assert f(1) == 1\n"}])
    cfg = tmp_path / "synth.yaml"
    cfg.write_text(json.dumps({
        "output_dir": str(tmp_path / "out"), "name": "t",
        "backend": {"kind": "inprocess", "inprocess": {"model": "init:configs/model/tiny.yaml", "max_seq_len": 512}},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12},
        "seeds": {"inputs": [str(seeds)], "score": "none", "min_chars": 50, "passage_chars": 400},
        "rewrite": {"styles": ["textbook"], "drop_truncated": False}, "revision": {"rounds": 1},
        "questions": {"organic": [str(questions)], "answers": 3, "question_max_tokens": 8},
        "reversal": {"inputs": [str(code)]}}))
    proc = subprocess.run([sys.executable, "-m", "train.synth", str(cfg)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    steps = manifest["steps"]
    for step in ("seeds", "rewrite", "revision", "make_question", "plurality_organic", "plurality_synthetic",
                 "reversal", "decontaminate", "dedup"):
        assert step in steps, step
    for step, e in steps.items():
        assert e["in"] == e["kept"] + sum(e["dropped"].values()), step
    assert steps["seeds"]["kept"] == 3 and steps["rewrite"]["in"] == 3 and steps["make_question"]["in"] == 3
    assert steps["plurality_organic"]["in"] == 1 and steps["reversal"]["in"] == 1
    shard = manifest["shards"][0]
    assert shard["requests"]["sent"] == shard["requests"]["logged"] > 0
    # a second run sends nothing: the shard is done, the merge is recomputed from its files
    again = subprocess.run([sys.executable, "-m", "train.synth", str(cfg)], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "already done" in again.stdout


def test_cli_config_error_exits_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("output_dir: x\nbackend: {kind: telepathy}\n")
    proc = subprocess.run([sys.executable, "-m", "train.synth", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "backend.kind='telepathy'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "train.synth", str(cfg), "--shard", "3/2"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--shard 3/2" in proc.stderr
