"""The synthetic-data engine against a REAL OpenAI-compatible server: llama.cpp's (`python -m llama_cpp.server`)
serving a GGUF of a tiny random model that this module writes, driven through the CLI (`python -m train.synth`) in a
subprocess, exactly as a user runs it.

The model's text is noise, so the config is one where every step still sends requests: seeds unscored, rewrites
kept even when cut by max_tokens, critiques (JSON mode, truncated: unparseable), organic and synthetic questions with
five answers each, and one code snippet with its tests for instruction reversal. Decoding is deterministic:
temperature 0 with `repeat_penalty: 1.0` (llama_cpp.server applies 1.1 otherwise), and the answers' temperature 0.8
is sampled from each request's own seed (same prompt + seed -> same text, whatever the arrival order: checked below
by comparing two runs).

Requests are counted AT THE SERVER from uvicorn's access log (`"POST /v1/chat/completions HTTP/1.1" 200`): one line
per answered request. uvicorn writes no line for a response whose client has gone, so what a killed client had in
flight shows up only if it was answered before the kill was seen.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from data.synth.backend import Request
from data.tokenizer import VOCAB_SIZE, Phi4Tokenizer
from model import ModelConfig, Transformer
from tests.helpers.gguf import LLAMA_MISSING
from tests.helpers.synth import read_records, template_of, write_jsonl
from train.export.gguf import to_gguf

pytestmark = pytest.mark.slow  # a llama.cpp server for the module and ~6 pipeline runs through it (~1 min)

REPO = Path(__file__).resolve().parents[3]
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
CONCURRENCY = 8
# A context long enough for a 400-character passage in any template plus the reply.
MODEL_CFG = ModelConfig(vocab_size=VOCAB_SIZE, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                        max_seq_len=1024)
ACCESS = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d{3})')
TEMPLATES_SENT = ("rewrite_textbook", "rewrite_exercises", "critique", "make_question", "answer",
                  "code_to_instruction", "instruction_to_code")
WORDS = ("heat flows from the warmer body to the cooler one until both reach the same temperature and the "
         "energy lost by one equals the energy gained by the other so a cup of tea cools while the room warms "
         "by an amount too small to notice because its mass is far larger").split()


# ---- the server --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(gguf: Path, log_path: Path, n_ctx: int = 0) -> dict:
    """llama_cpp.server on a free port with an n_ctx-token context (0 = the tiny model's), ready (GET /v1/models
    answered); its stdout+stderr (uvicorn's access log among them) go to log_path."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 (closed by stop_server)
    # One thread: llama.cpp's spinning thread pool is far slower with 2 on a busy 2-core machine at this size.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_ctx", str(n_ctx or MODEL_CFG.max_seq_len), "--n_threads", "1", "--n_threads_batch", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    server = {"proc": proc, "log": log, "log_path": log_path, "base_url": f"http://127.0.0.1:{port}/v1"}
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            server["model"] = models(server["base_url"])[0]
            return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(f"llama_cpp.server not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.25)


def models(base_url: str) -> list[str]:
    """The served model names. The handler takes the server's model lock, so the answer also means that every
    request that arrived earlier has been dealt with (llama_cpp.server runs one at a time, FIFO)."""
    with urllib.request.urlopen(f"{base_url}/models", timeout=60) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


def stop_server(server: dict, sig: int = signal.SIGTERM) -> None:
    proc = server["proc"]
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    server["log"].close()


def access_statuses(server: dict, start: int = 0) -> tuple[list[int], int]:
    """HTTP statuses of the chat completions the server answered, from byte `start` of its log; and the log's end."""
    data = Path(server["log_path"]).read_bytes()
    return [int(m) for m in ACCESS.findall(data[start:].decode(errors="replace"))], len(data)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    try:
        import llama_cpp.server  # noqa: F401
        import openai  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{LLAMA_MISSING}; the server also needs llama-cpp-python[server] and openai ({e})")
    torch.manual_seed(0)
    model = Transformer(MODEL_CFG)
    model.init_weights()
    path = tmp_path_factory.mktemp("served") / "tiny-f32.gguf"
    to_gguf(model, path, "f32", tokenizer=Phi4Tokenizer())
    return path


@pytest.fixture(scope="module")
def server(gguf):
    s = start_server(gguf, gguf.parent / "server.log")
    try:
        yield s
    finally:
        stop_server(s)


# ---- inputs, config, CLI -----------------------------------------------------------------------------------------

def passage(k: int, words: int = 45) -> str:
    return " ".join(WORDS[(k * 7 + i) % len(WORDS)] for i in range(words)) + f" (passage {k})."


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("inputs")
    paths = {
        "seeds": write_jsonl(d / "organic_text.jsonl", [{"text": passage(k)} for k in range(8)]),
        "questions": write_jsonl(d / "questions.jsonl", [{"question": f"What is {a} + {a + 3}?"} for a in (2, 5, 9)]),
        "code": write_jsonl(d / "code.jsonl", [{"code": "def add(a, b):\n    return a + b\n",
                                                "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"}]),
        "bench": write_jsonl(d / "eval.jsonl", [{"question": "What is 12 * 13? Answer with the number only."}]),
    }
    return paths


def write_config(path: Path, out: Path, inputs: dict, base_url: str, model: str, **backend) -> Path:
    openai_cfg = {"base_url": base_url, "model": model, "timeout_s": 60.0, "max_retries": 2,
                  "extra_body": {"repeat_penalty": 1.0}, **backend}
    cfg = {
        "output_dir": str(out), "name": "real", "seed": 0,
        "backend": {"kind": "openai", "concurrency": CONCURRENCY, "openai": openai_cfg},
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 16},
        "seeds": {"inputs": [str(inputs["seeds"])], "passage_chars": 400, "min_chars": 100, "score": "none"},
        "rewrite": {"styles": ["textbook", "exercises"], "samples": 1, "drop_truncated": False},
        "revision": {"styles": ["exercises"], "rounds": 1, "max_tokens": 16},
        "questions": {"organic": [str(inputs["questions"])], "synthetic_per_seed": 1, "answers": 5,
                      "question_max_tokens": 16},
        "reversal": {"inputs": [str(inputs["code"])], "instruction_max_tokens": 16},
        "decontaminate": {"benchmarks": [{"name": "tiny_eval", "path": str(inputs["bench"]),
                                          "fields": ["question"]}]},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "train.synth", str(config), *args]


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(config, *args), cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env=cli_env())


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def shard(out: Path) -> Path:
    return out / "shards" / "00000-of-00001"


def log_entries(path: Path) -> list[dict]:
    """The complete lines of a request log (a line cut by a kill has no newline and is not an entry)."""
    data = path.read_bytes() if path.exists() else b""
    return [json.loads(line) for line in data.splitlines(keepends=True) if line.endswith(b"\n")]


def records_by_type(out: Path) -> dict[str, list[dict]]:
    return {t: read_records(out / f"real.{t}.jsonl") for t in ("web_rewrite", "qa", "code_reversal")}


def check_steps(steps: dict, where: str) -> None:
    for step, e in steps.items():
        assert e["in"] == e["kept"] + sum(e["dropped"].values()), (where, step, e)


@pytest.fixture(scope="module")
def reference(server, inputs, tmp_path_factory) -> dict:
    """One uninterrupted run of the whole pipeline; the server's answered requests counted around it."""
    out = tmp_path_factory.mktemp("reference") / "out"
    config = write_config(out.parent / "synth.yaml", out, inputs, server["base_url"], server["model"])
    _, start = access_statuses(server)
    t0 = time.perf_counter()
    res = run_cli(config)
    wall_s = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    models(server["base_url"])  # every request of the run dealt with
    statuses, _ = access_statuses(server, start)
    return {"out": out, "config": config, "statuses": statuses, "wall_s": wall_s, "stdout": res.stdout}


# ---- 1. every stage through the OpenAI backend ------------------------------------------------------------------

def test_every_stage_through_the_real_server_gives_well_formed_records_and_manifests(reference, server):
    out = reference["out"]
    entries = log_entries(shard(out) / "requests.jsonl")
    sent = {template_of(Request.from_json(e["request"])) for e in entries}
    assert set(TEMPLATES_SENT) <= sent, f"steps that sent no request: {set(TEMPLATES_SENT) - sent}"
    assert len({e["key"] for e in entries}) == len(entries), "a request was logged twice"
    for e in entries:  # real answers from the server, none refused
        r = e["response"]
        assert r["error"] == "" and r["finish_reason"] in ("stop", "length") and r["model"], r
        assert r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= e["request"]["max_tokens"], r
    # The server answered exactly the logged requests, each once.
    assert reference["statuses"] == [200] * len(entries)

    shard_manifest = json.loads((shard(out) / "manifest.json").read_text())
    assert shard_manifest["requests"] == {"sent": len(entries), "from_log": 0, "logged": len(entries)}
    assert shard_manifest["backend"] == {"backend": "openai", "model": server["model"],
                                         "base_url": server["base_url"]}
    assert 0 < shard_manifest["busy_s"] < reference["wall_s"]
    manifest = json.loads((out / "manifest.json").read_text())
    check_steps(shard_manifest["steps"], "shard manifest")
    check_steps(manifest["steps"], "merged manifest")
    steps = manifest["steps"]
    assert {"seeds", "rewrite", "revision", "make_question", "plurality_organic", "plurality_synthetic",
            "reversal", "decontaminate", "dedup"} <= set(steps), sorted(steps)
    assert steps["seeds"]["kept"] == 8 and steps["rewrite"]["in"] == 16 and steps["make_question"]["in"] == 8
    assert steps["plurality_organic"]["in"] == 3 and steps["reversal"]["in"] == 1
    assert sum(manifest["dropped_total"].values()) == sum(sum(e["dropped"].values()) for e in steps.values())

    records = records_by_type(out)
    assert {t: len(rows) for t, rows in records.items()} == {t: f["records"]
                                                             for t, f in manifest["dataset_types"].items()}
    assert records["web_rewrite"], "the unrevised textbook rewrites are kept (drop_truncated: false)"
    assert steps["dedup"]["kept"] == sum(len(rows) for rows in records.values())
    ids = [r["id"] for rows in records.values() for r in rows]
    assert len(set(ids)) == len(ids)
    for t, rows in records.items():
        for r in rows:
            assert r["dataset_type"] == t and isinstance(r["text"], str) and r["text"].strip()
            assert re.fullmatch(r"[0-9a-f]{32}", r["id"])
            p = r["provenance"]
            assert p["backend"]["backend"] == "openai" and p["backend"]["model"] == server["model"]
            assert set(p["sampling"]) == {"temperature", "top_p", "max_tokens", "seed", "stop"}
            assert p["parents"] and p["template"]["name"] and p["template"]["version"]
            assert r["decontamination"]["checked"] is True


# ---- 2. killed mid-shard, resumed: nothing lost, nothing duplicated, nothing finished sent twice ----------------

def test_killed_mid_shard_then_resumed_loses_nothing_and_resends_no_finished_request(reference, server, inputs,
                                                                                    tmp_path):
    ref_log = log_entries(shard(reference["out"]) / "requests.jsonl")
    out = tmp_path / "out"
    config = write_config(tmp_path / "synth.yaml", out, inputs, server["base_url"], server["model"])
    requests_log = shard(out) / "requests.jsonl"

    _, start = access_statuses(server)
    proc = subprocess.Popen(cli(config), cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:  # kill it halfway through its requests, while it runs
        while len(log_entries(requests_log)) < len(ref_log) // 2:
            assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the run logged too few requests in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (shard(out) / "DONE").exists() and not (out / "manifest.json").exists()
    before_kill = log_entries(requests_log)
    logged_before = len({e["key"] for e in before_kill})
    assert logged_before == len(before_kill) and 0 < logged_before < len(ref_log)
    models(server["base_url"])  # the server has dealt with everything the killed client had sent
    killed_statuses, resume_start = access_statuses(server, start)
    # Every logged request was answered once; at most `concurrency` more were answered and lost with the process.
    assert set(killed_statuses) <= {200}
    assert logged_before <= len(killed_statuses) <= logged_before + CONCURRENCY

    res = run_cli(config)
    assert res.returncode == 0, res.stderr[-3000:]
    models(server["base_url"])
    resumed_statuses, _ = access_statuses(server, resume_start)
    final = log_entries(requests_log)
    keys = [e["key"] for e in final]
    assert len(set(keys)) == len(keys), "a finished request was logged (sent) twice"
    assert set(keys) == {e["key"] for e in ref_log}, "the resumed run did not make the same requests"
    manifest = json.loads((shard(out) / "manifest.json").read_text())["requests"]
    # The resumed process sent exactly what was not logged before the kill, and the server saw exactly that.
    assert manifest["sent"] == len(keys) - logged_before
    assert manifest["logged"] == len(keys)
    assert resumed_statuses == [200] * manifest["sent"]
    total = len(killed_statuses) + len(resumed_statuses)
    lost_in_flight = len(killed_statuses) - logged_before
    assert total == len(keys) + lost_in_flight <= len(keys) + CONCURRENCY

    # The same records by id, none lost and none duplicated, and byte-identical texts: the server is deterministic
    # (greedy, and the 0.8-temperature answers seeded per request).
    ours, theirs = records_by_type(out), records_by_type(reference["out"])
    for t in ours:
        assert [r["id"] for r in ours[t]] == [r["id"] for r in theirs[t]], t
        assert [r["text"] for r in ours[t]] == [r["text"] for r in theirs[t]], t
        assert ours[t] == theirs[t], t  # every field, provenance and votes included
    by_key = {e["key"]: e["response"]["text"] for e in ref_log}
    assert all(by_key[e["key"]] == e["response"]["text"] for e in final)
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert steps == json.loads((reference["out"] / "manifest.json").read_text())["steps"]


# ---- 3. the server stops mid-run: exit 3, a clear message, the finished requests kept ---------------------------

def test_server_stopping_mid_run_exits_3_with_a_message_and_keeps_finished_requests(gguf, inputs, tmp_path):
    own = start_server(gguf, tmp_path / "server.log")  # a server of its own, to kill
    out = tmp_path / "out"
    config = write_config(tmp_path / "synth.yaml", out, inputs, own["base_url"], own["model"], max_retries=1,
                          timeout_s=5.0)
    requests_log = shard(out) / "requests.jsonl"
    proc = subprocess.Popen(cli(config), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(log_entries(requests_log)) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the stop"
            time.sleep(0.01)
        stop_server(own, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        stop_server(own)
    assert proc.returncode == 3, stderr[-3000:]
    assert own["base_url"] in stderr and "is the server up?" in stderr and "train.synth:" in stderr
    assert "Traceback" not in stderr
    kept = log_entries(requests_log)
    assert len(kept) >= 4 and all(e["response"]["error"] == "" and e["response"]["model"] for e in kept), \
        "a failed request was logged as an answer"
    assert not (shard(out) / "DONE").exists() and not (shard(out) / "manifest.json").exists()


def test_no_server_at_the_url_exits_3_at_once(inputs, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = write_config(tmp_path / "synth.yaml", tmp_path / "out", inputs, url, "tiny", max_retries=1,
                          timeout_s=5.0)
    t0 = time.perf_counter()
    res = run_cli(config)
    assert res.returncode == 3, res.stderr[-3000:]
    assert f"train.synth: {url}: no answer after 1 retries (APIConnectionError" in res.stderr
    assert "is the server up?" in res.stderr and "Traceback" not in res.stderr
    assert log_entries(shard(tmp_path / "out") / "requests.jsonl") == []
    assert time.perf_counter() - t0 < 60
