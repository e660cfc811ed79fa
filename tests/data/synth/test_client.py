"""The request log and the client: every answer persisted as it arrives, a torn tail cut off, a crash mid-shard
resumed without sending any finished request again, and the same records as an uninterrupted run."""
from __future__ import annotations

import asyncio
import json

import pytest

from data.synth.backend import Request, Response, chat
from data.synth.client import Client, RequestLog
from data.synth.pipeline import merge, run_shard
from tests.helpers.synth import ScriptedBackend, base_config, read_records, write_jsonl


def test_log_persists_and_recovers_a_torn_tail(tmp_path):
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path)
    log.append("k1", chat("hi"), Response(text="one", finish_reason="stop"))
    log.append("k2", chat("ho"), Response(text="two", finish_reason="stop"))
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "k3", "request": {"kind"')  # a writer killed mid-line
    again = RequestLog(path)
    assert {k: r.text for k, r in again.answers.items()} == {"k1": "one", "k2": "two"}
    again.append("k3", chat("hu"), Response(text="three"))
    again.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["key"] for line in lines)  # the torn bytes are gone


def test_damaged_middle_line_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"key": "a", "response": {"text": "x"}}\nGARBAGE\n{"key": "b", "response": {"text": "y"}}\n')
    with pytest.raises(ValueError, match="requests.jsonl: byte 40: a damaged line"):
        RequestLog(path)


def test_client_sends_each_distinct_request_once(tmp_path):
    backend = ScriptedBackend(lambda t, text, k: text.upper())
    client = Client(backend, RequestLog(tmp_path / "log.jsonl"))
    reqs = [chat("a", "You write clear, rigorous textbook material.", seed=s) for s in (1, 2, 1)]
    out = asyncio.run(client.run(reqs))
    assert [r.text for r in out] == ["A", "A", "A"] and client.sent == 2 and len(backend.calls) == 2
    client2 = Client(backend, RequestLog(tmp_path / "log.jsonl"))
    asyncio.run(client2.run(reqs))
    assert client2.sent == 0 and client2.from_log == 3 and len(backend.calls) == 2


def test_request_validation():
    with pytest.raises(ValueError, match="kind"):
        Request(kind="embed", prompt="x")
    with pytest.raises(ValueError, match="needs messages"):
        Request(kind="chat", prompt="x")


def _rule(template, text, k):
    if template == "answer":
        return f"The answer is {[1, 2, 2, 2, 3][k]}."
    return f"{template}: {text[-40:]}"


def test_crash_mid_shard_then_resume_loses_and_repeats_nothing(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"text": f"passage {i} " * 30} for i in range(6)])
    sections = dict(seeds={"inputs": [str(seeds)]}, rewrite={"enabled": True, "styles": ["textbook", "discussion"]},
                    questions={"enabled": True, "answers": 5})
    reference = base_config(tmp_path / "ref", **sections)
    asyncio.run(run_shard(reference, ScriptedBackend(_rule, batch_size=4)))
    merge(reference, 1)

    cfg = base_config(tmp_path / "run", **sections)
    crashing = ScriptedBackend(_rule, fail_after=21, batch_size=4)
    with pytest.raises(RuntimeError, match="scripted crash"):
        asyncio.run(run_shard(cfg, crashing))
    shard = tmp_path / "run" / "shards" / "00000-of-00001"
    logged = len((shard / "requests.jsonl").read_text().splitlines())
    # 12 rewrites (batches of 4) + 6 questions (4 + 2) logged; the answers' first batch was in flight at the crash
    assert logged == 18 and not (shard / "DONE").exists()
    resumed = ScriptedBackend(_rule, batch_size=4)
    manifest = asyncio.run(run_shard(cfg, resumed))
    merge(cfg, 1)
    total = len((shard / "requests.jsonl").read_text().splitlines())
    assert manifest["requests"]["sent"] == len(resumed.calls) == total - logged  # nothing finished was sent again
    keys = [json.loads(line)["key"] for line in (shard / "requests.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys))
    for t in ("web_rewrite", "qa"):
        name = f"synth.{t}.jsonl"
        assert read_records(tmp_path / "run" / name) == read_records(tmp_path / "ref" / name)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["steps"] == \
        json.loads((tmp_path / "ref" / "manifest.json").read_text())["steps"]
    before = len(resumed.calls)
    asyncio.run(run_shard(cfg, resumed))  # DONE: nothing runs
    assert len(resumed.calls) == before
