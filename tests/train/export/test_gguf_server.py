"""The exported GGUF served by llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`) on 127.0.0.1 and
queried with the `openai` client: the server the synthetic-data engine talks to. One server for the module."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from data.tokenizer import EOS_ID, Phi4Tokenizer
from tests.train.export.test_gguf import CHAT, CONTEXT, LLAMA_MISSING, STOP_AFTER, greedy, make_it_stop, tiny_model
from train.export.gguf import to_gguf

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import llama_cpp.server  # noqa: F401
        import openai
    except ImportError as e:
        pytest.fail(f"{LLAMA_MISSING}; the server also needs llama-cpp-python[server] and openai ({e})")
    tok = Phi4Tokenizer()
    model = tiny_model()
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    answer = make_it_stop(model, prompt, STOP_AFTER)
    path = tmp_path_factory.mktemp("served") / "model-f32.gguf"
    to_gguf(model, path, "f32", tokenizer=tok)
    port = free_port()
    log = open(path.parent / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", str(CONTEXT), "--n_threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{(path.parent / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after {START_TIMEOUT_S} s:\n"
                            f"{(path.parent / 'server.log').read_text()[-3000:]}")
            time.sleep(0.25)
        client = openai.OpenAI(base_url=base, api_key="not-needed", timeout=60, max_retries=0)
        yield {"client": client, "tok": tok, "model": model, "prompt": prompt, "answer": answer}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_chat_completion_renders_our_prompt_and_stops_at_im_end(server):
    out = server["client"].chat.completions.create(model="phi4-recipe", messages=CHAT, max_tokens=32,
                                                   temperature=0.0)
    choice = out.choices[0]
    assert out.usage.prompt_tokens == len(server["prompt"])
    assert choice.finish_reason == "stop" and out.usage.completion_tokens <= STOP_AFTER + 1
    assert choice.message.content == server["tok"].decode(server["answer"])
    assert EOS_ID not in server["answer"]


def test_completion_is_greedy_and_carries_logprobs(server):
    tok, model = server["tok"], server["model"]
    prompt = "Write a haiku about GPUs:"
    expected, _ = greedy(model, tok.encode(prompt), 8)
    out = server["client"].completions.create(model="phi4-recipe", prompt=prompt, max_tokens=8, temperature=0.0,
                                              logprobs=3)
    choice = out.choices[0]
    assert choice.text == tok.decode(expected)
    assert out.usage.prompt_tokens == len(tok.encode(prompt))
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([tok.encode(prompt)]))[0, -1], -1)
    assert choice.logprobs.token_logprobs[0] == pytest.approx(first.max().item(), abs=1e-3)
