"""SimpleQA graded by a REAL OpenAI-compatible server: llama.cpp's (`python -m llama_cpp.server`) serving a GGUF of a
tiny random model, with a context long enough for simple-evals' grader template (~1,500 tokens). Its replies are
noise, so the grade letters are whatever A/B/C they hold (C when none); what is checked is the plumbing: every
completion graded through the server without an error, one request each (counted in the server's access log), and
the same grades again on a rerun (each request carries its own seed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data.synth.backend import OpenAIBackendConfig
from data.synth.config import BackendConfig
from data.tokenizer import VOCAB_SIZE, Phi4Tokenizer
from model import ModelConfig, Transformer
from tests.data.synth.test_real_server import access_statuses, start_server, stop_server
from tests.helpers.eval_models import random_model
from tests.helpers.gguf import LLAMA_MISSING
from train.eval.chat import ChatTask
from train.eval.chat_grading import simpleqa_metrics
from train.eval.config import EvalConfig, RecallProbe
from train.eval.run import run_tasks

pytestmark = pytest.mark.slow  # a llama.cpp server and two graded runs (~30 s)

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks" / "simple_evals"
CONTEXT = 4096  # the grader template and an answer fit


def start_grader_server(gguf: Path, log_path: Path) -> dict:
    """llama_cpp.server with a CONTEXT-token context (the grader template and an answer fit)."""
    return start_server(gguf, log_path, n_ctx=CONTEXT)


def test_simpleqa_graded_by_a_real_llama_cpp_server(tok, tmp_path):
    try:
        import llama_cpp.server  # noqa: F401
        import openai  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{LLAMA_MISSING}; the server also needs llama-cpp-python[server] and openai ({e})")
    from train.export.gguf import to_gguf

    torch.manual_seed(0)
    grader_model = Transformer(ModelConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                           ffn_dim=64, max_seq_len=CONTEXT))
    grader_model.init_weights()
    to_gguf(grader_model, tmp_path / "grader.gguf", "f32", tokenizer=Phi4Tokenizer())
    server = start_grader_server(tmp_path / "grader.gguf", tmp_path / "server.log")
    try:
        backend = BackendConfig(kind="openai", concurrency=2, openai=OpenAIBackendConfig(
            base_url=server["base_url"], model=server["model"], timeout_s=120.0, max_retries=0,
            extra_body={"repeat_penalty": 1.0}))
        task = ChatTask(name="simpleqa", benchmark="simpleqa", path=str(FIX), max_new_tokens=4, num_samples=2,
                        grader=backend, grader_max_tokens=4, paper_score=3.0)
        cfg = EvalConfig(batch_size=2, seed=1, chat=[task], recall=RecallProbe(lengths=[]))
        cfg.validate()
        first = run_tasks(random_model(0), tok, cfg, torch.device("cpu"))[0]
        statuses, end = access_statuses(server)
        second = run_tasks(random_model(0), tok, cfg, torch.device("cpu"))[0]
        again, _ = access_statuses(server, end)
    finally:
        stop_server(server)
    grades = [s["grade"] for s in first["samples"]]
    assert statuses == [200] * 6 and again == [200] * 6  # 3 questions x 2 samples, one request each
    assert set(grades) <= {"A", "B", "C"} and not any(s.get("grader_error") for s in first["samples"])
    assert first["metrics"]["grader_errors"] == 0 and first["metrics"]["items"] == 3
    assert {k: first["metrics"][k] for k in simpleqa_metrics(grades)} == simpleqa_metrics(grades)
    assert first["paper_score"] == {"f1": 3.0}
    assert grades == [s["grade"] for s in second["samples"]]  # seeded grader requests: the same grades
    assert [s["completion"] for s in first["samples"]] == [s["completion"] for s in second["samples"]]
