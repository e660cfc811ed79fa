"""The tokenizer worker processes of data.prepare (data/prepare_pool.py): real processes, ids equal to in-process."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import data.prepare as prep
from data.prepare import PrepareError, PrepareSource, prepare_source
from data.prepare_pool import TokenizePool, _init_worker, encode_payloads, split_ids
from data.sources import Record
from data.tokenizer import EOD_ID, Phi4Tokenizer

TEXTS = [f"document {i}: " + "def f(x):\n    return x * 2\n" * (i % 5 + 1) for i in range(30)]
CHAT = [{"role": "user", "content": "Hi <|im_end|> there"}, {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def tok():
    return Phi4Tokenizer()


def test_pool_runs_in_worker_processes_and_keeps_order(tok):
    chunks = [TEXTS[i:i + 3] for i in range(0, len(TEXTS), 3)]  # 10 chunks: the pool starts
    with TokenizePool(tok, "text", workers=2, inflight_per_worker=2) as pool:
        out = list(pool.encode(chunks, lambda t: t))
        pids = set(pool._pool._processes)
    assert [c for c, _ in out] == chunks
    assert [a.tolist() for _, r in out for a in r["arrays"]] == [tok.encode(t) + [EOD_ID] for t in TEXTS]
    assert len(pids) == 2 and os.getpid() not in pids  # two processes, not the caller
    assert pool.worker_cpu_s > 0 and pool._pool is None  # closed on exit


def test_one_chunk_is_encoded_in_process(tok):
    with TokenizePool(tok, "chat", workers=4) as pool:
        out = list(pool.encode([[CHAT, None]], lambda m: m))
        assert pool._pool is None  # no processes for a small source
    ids = out[0][1]["arrays"]
    assert ids[0].tolist() == tok.apply_chat_template(CHAT) + [EOD_ID] and ids[1] is None
    assert tok.encode("<|im_end|>") != [tok.eos_id]  # user text stays text, in workers as here


def test_chat_in_workers_equals_in_process(tok):
    chunks = [[CHAT] * 2 for _ in range(4)]
    with TokenizePool(tok, "chat", workers=2) as pool:
        out = [a.tolist() for _, r in pool.encode(chunks, lambda m: m) for a in r["arrays"]]
    assert out == [tok.apply_chat_template(CHAT) + [EOD_ID]] * 8


def test_split_ids_round_trip(tok):
    result = encode_payloads(tok, "text", ["a b", None, "", "c"])
    assert result["lengths"].tolist() == [len(tok.encode("a b")) + 1, -1, 1, 2] and not result["errors"]
    ids = split_ids(result)["arrays"]
    assert [None if a is None else a.tolist() for a in ids] == [tok.encode("a b") + [EOD_ID], None, [EOD_ID],
                                                                 tok.encode("c") + [EOD_ID]]


def test_raw_jsonl_lines_are_parsed_in_the_worker_by_the_reader_rules(tok):
    lines = [(b'{"text": "hello"}', "f.jsonl: line 1"), (b"not json", "f.jsonl: line 2"),
             (b'{"body": "x"}', "f.jsonl: line 3"), (b'{"text": "\\ud800"}', "f.jsonl: line 4")]
    r = split_ids(encode_payloads(tok, "text", lines, "text"))
    assert r["arrays"][0].tolist() == tok.encode("hello") + [EOD_ID] and r["arrays"][1:] == [None] * 3
    assert [(i, reason) for i, reason, _ in r["errors"]] == [(1, "malformed_json"), (2, "missing_field"),
                                                             (3, "invalid_utf8")]
    assert "no key 'text'" in r["errors"][1][2]


class RejectingTokenizer:
    """Test double: a tokenizer that rejects one text, to show where the error is reported."""
    eod_id = EOD_ID

    def encode(self, text):
        if "bad" in text:
            raise ValueError("cannot encode this")
        return [1, 2]


def test_a_rejected_record_is_named_by_its_location(tmp_path):
    assert encode_payloads(RejectingTokenizer(), "text", ["ok", "bad one", "ok"])["fatal"] == (
        1, "ValueError: cannot encode this")
    chunk = [Record(payload="ok", file_index=0, pos=0, location=f"{tmp_path}/a.jsonl: line 1"),
             Record(payload="bad one", file_index=0, pos=10, location=f"{tmp_path}/a.jsonl: line 2")]
    with pytest.raises(PrepareError, match=r"a\.jsonl: line 2: cannot tokenize this record: ValueError"):
        prep._write_chunk(None, PrepareSource(name="s"), chunk, {"fatal": (1, "ValueError: cannot encode this")},
                          None, None)


def test_worker_refuses_another_tokenizer(tok):
    with pytest.raises(RuntimeError, match="fingerprint"):
        _init_worker(None, "not-" + tok.fingerprint)


def test_a_custom_bpe_file_reaches_the_workers(tmp_path, tok, monkeypatch):
    """A tokenizer_path other than the bundled one is loaded by each worker (fingerprint checked there)."""
    from data.tokenizer import default_bpe_path

    copy = tmp_path / "cl100k.tiktoken"
    copy.write_bytes(Path(default_bpe_path()).read_bytes())
    custom = Phi4Tokenizer(copy)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 200)
    src_file = tmp_path / "a.jsonl"
    src_file.write_text("".join(json.dumps({"text": "x y z " * 30}) + "\n" for _ in range(8)))
    m = prepare_source(PrepareSource(name="a", path=str(src_file)), tmp_path / "out", custom, 2, progress=False,
                       log=lambda *_: None)
    assert m["num_docs"] == 8 and m["num_tokens"] == 8 * (len(tok.encode("x y z " * 30)) + 1)


def test_benchmark_compares_the_same_tokens_with_raw_tiktoken_in_processes(monkeypatch, tmp_path):
    from data.prepare_bench import format_throughput, measure_throughput

    monkeypatch.setattr(prep, "CHUNK_CHARS", 300)  # several chunks, so the workers run
    r = measure_throughput(TEXTS, num_workers=2, workdir=tmp_path, repeats=1)
    assert r["tokens"] == sum(len(Phi4Tokenizer().encode(t)) for t in TEXTS) and r["workers"] == 2
    assert r["ratio"] == pytest.approx(r["prepare_tokens_per_s"] / r["raw_tokens_per_s"])
    assert all(len(v) == 1 and v[0][0] > 0 and v[0][1] > 0 for v in r["runs_s"].values())
    assert f"per core, prepare / raw tiktoken: {r['ratio']:.3f} (target >= 0.9)" in format_throughput(r)


def test_bad_lines_found_by_workers_are_skipped_and_counted_as_in_process(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 100)  # many chunks: the workers parse and meet the bad lines
    lines = [json.dumps({"text": t}) for t in TEXTS]
    lines[3], lines[17], lines[25] = "not json", json.dumps({"body": "x"}), json.dumps({"text": ""})
    src_file = tmp_path / "a.jsonl"
    src_file.write_text("\n".join(lines) + "\n")
    src = PrepareSource(name="a", path=str(src_file), on_error="skip", shard_tokens=200)
    one = prepare_source(src, tmp_path / "one", tok, 1, progress=False, log=lambda *_: None)
    two = prepare_source(src, tmp_path / "two", tok, 2, progress=False, log=lambda *_: None)
    assert one["skipped"] == two["skipped"] == {"empty_document": 1, "malformed_json": 1, "missing_field": 1}
    assert one["shards"] == two["shards"] and one["num_docs"] == len(TEXTS) - 3
    with pytest.raises(PrepareError, match=r"a\.jsonl: line 4: not valid JSON"):
        prepare_source(PrepareSource(name="b", path=str(src_file)), tmp_path / "three", tok, 2, progress=False,
                       log=lambda *_: None)
