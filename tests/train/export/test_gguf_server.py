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
from tests.helpers.gguf import CHAT, CONTEXT, LLAMA_MISSING, STOP_AFTER, greedy, make_it_stop, tiny_model
from train.export.gguf import to_gguf

START_TIMEOUT_S = 120
# llama_cpp.server applies repeat_penalty 1.1 unless told otherwise, so temperature 0 alone is not greedy decoding.
GREEDY = {"temperature": 0.0, "extra_body": {"repeat_penalty": 1.0}}


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
    port, server_log = free_port(), path.parent / "server.log"
    log = open(server_log, "w")  # noqa: SIM115 (closed after the server stops)
    # One thread: llama.cpp's spinning thread pool is far slower with 2 on a busy 2-core machine at this size.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(CONTEXT), "--n_threads", "1", "--n_threads_batch", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{server_log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready after {START_TIMEOUT_S} s:\n"
                            f"{server_log.read_text()[-3000:]}")
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
    out = server["client"].chat.completions.create(model="phi4-recipe", messages=CHAT, max_tokens=32, **GREEDY)
    choice = out.choices[0]
    assert out.usage.prompt_tokens == len(server["prompt"])
    assert choice.finish_reason == "stop" and out.usage.completion_tokens <= STOP_AFTER + 1
    assert choice.message.content == server["tok"].decode(server["answer"])
    assert EOS_ID not in server["answer"]


def test_completion_is_greedy_and_carries_logprobs(server):
    tok, model = server["tok"], server["model"]
    prompt = "Write a haiku about GPUs:"
    expected, _ = greedy(model, tok.encode(prompt), 8)
    stops = EOS_ID in expected
    expected = expected[:expected.index(EOS_ID)] if stops else expected
    out = server["client"].completions.create(model="phi4-recipe", prompt=prompt, max_tokens=8, **GREEDY)
    assert out.choices[0].text == tok.decode(expected)
    assert out.choices[0].finish_reason == ("stop" if stops else "length")
    assert out.usage.prompt_tokens == len(tok.encode(prompt))
    # One token with logprobs: llama-cpp-python sorts the whole vocabulary in Python for each one.
    first = server["client"].completions.create(model="phi4-recipe", prompt=prompt, max_tokens=1, logprobs=3,
                                                **GREEDY).choices[0].logprobs
    with torch.no_grad():
        ours = torch.log_softmax(model(torch.tensor([tok.encode(prompt)]))[0, -1], -1)
    top = torch.topk(ours, 3)
    assert first.tokens[0] == tok.decode([expected[0]])
    assert first.token_logprobs[0] == pytest.approx(top.values[0].item(), abs=1e-3)
    assert sorted(first.top_logprobs[0].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-3)
