"""Token shards: round trip, deterministic boundaries, and refusal of anything incomplete or corrupt."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from data.shards import MANIFEST, PROGRESS, ShardedSource, ShardError, ShardWriter

EOD = 100257
FP = "f" * 64


def random_docs(n: int, seed: int = 0, max_len: int = 9) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 100352, size=int(rng.integers(0, max_len))).tolist() + [EOD] for _ in range(n)]


def write(tmp_path, docs, shard_tokens=16, name="src"):
    w = ShardWriter(tmp_path / name, name, "synthetic", FP, shard_tokens=shard_tokens, inputs=["x"])
    for i, d in enumerate(docs):
        w.add(d, cursor={"doc": i})
    return w.close(skipped={"empty_document": 2})


def test_round_trip_and_boundaries(tmp_path):
    docs = random_docs(50)
    m = write(tmp_path, docs)
    src = ShardedSource(tmp_path / "src", verify="checksum", expect_tokenizer=FP)
    assert (src.name, src.provenance, src.num_docs) == ("src", "synthetic", 50)
    assert src.num_tokens == sum(map(len, docs)) == m["num_tokens"]
    assert m["skipped"] == {"empty_document": 2} and m["dtype"] == "uint32" and m["format"] == 1
    assert len(m["shards"]) > 3
    for i, d in enumerate(docs):
        got = src.doc(i)
        assert got.dtype == np.uint32 and got.tolist() == d
    np.testing.assert_array_equal(src.doc_lengths(), [len(d) for d in docs])
    # Files are exactly the documented layout: flat <u4 tokens, <u8 offsets starting at 0.
    first = m["shards"][0]
    raw = np.fromfile(tmp_path / "src" / first["tokens"], dtype="<u4")
    idx = np.fromfile(tmp_path / "src" / first["index"], dtype="<u8")
    assert idx[0] == 0 and idx[-1] == raw.size == first["num_tokens"] and len(idx) == first["num_docs"] + 1
    assert raw.tolist() == sum(docs[: first["num_docs"]], [])
    # A shard closes at the first document boundary at or past shard_tokens; only the last may be smaller.
    for e in m["shards"][:-1]:
        assert e["num_tokens"] >= 16
        assert e["num_tokens"] - 16 < 9  # overshoot < one document
    assert not (tmp_path / "src" / PROGRESS).exists()
    with pytest.raises(IndexError):
        src.doc(50)


def test_same_input_same_shards(tmp_path):
    docs = random_docs(40, seed=3)
    a, b = write(tmp_path, docs, name="a"), write(tmp_path, docs, name="b")
    assert [e["tokens_sha256"] for e in a["shards"]] == [e["tokens_sha256"] for e in b["shards"]]


def test_missing_manifest_refused(tmp_path):
    w = ShardWriter(tmp_path / "s", "s", "organic", FP, shard_tokens=4)
    for d in random_docs(10):
        w.add(d)
    # completed shards exist, but no manifest: the directory is incomplete and must not be read
    assert list((tmp_path / "s").glob("shard_*.bin"))
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        ShardedSource(tmp_path / "s")


def test_flipped_byte_refused_by_checksum(tmp_path):
    write(tmp_path, random_docs(30))
    path = tmp_path / "src" / "shard_00001.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    ShardedSource(tmp_path / "src", verify="size")  # same size: only the checksum can see it
    with pytest.raises(ShardError, match=r"shard_00001\.bin: sha256 .* disagrees with the manifest"):
        ShardedSource(tmp_path / "src", verify="checksum")


@pytest.mark.parametrize("victim", ["shard_00002.bin", "shard_00000.idx"])
def test_truncated_shard_refused(tmp_path, victim):
    write(tmp_path, random_docs(30))
    path = tmp_path / "src" / victim
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ShardError, match=rf"{victim}: size \d+ bytes disagrees with the manifest"):
        ShardedSource(tmp_path / "src")


def test_missing_shard_file_refused(tmp_path):
    write(tmp_path, random_docs(30))
    (tmp_path / "src" / "shard_00001.idx").unlink()
    with pytest.raises(ShardError, match=r"shard_00001\.idx: missing shard file"):
        ShardedSource(tmp_path / "src")


@pytest.mark.parametrize("key,value,message", [
    ("dtype", "uint16", "dtype 'uint16' is not supported"),
    ("format", 2, "format 2 is not supported"),
    ("provenance", "web", "provenance 'web'"),
    ("num_tokens", "many", "key 'num_tokens' missing or not a int"),
])
def test_bad_manifest_refused(tmp_path, key, value, message):
    write(tmp_path, random_docs(10))
    path = tmp_path / "src" / MANIFEST
    m = json.loads(path.read_text())
    m[key] = value
    path.write_text(json.dumps(m))
    with pytest.raises(ShardError, match=rf"manifest\.json: .*{message}"):
        ShardedSource(tmp_path / "src")


def test_tokenizer_mismatch_refused(tmp_path):
    write(tmp_path, random_docs(10))
    with pytest.raises(ShardError, match="prepared with tokenizer ffff"):
        ShardedSource(tmp_path / "src", expect_tokenizer="0" * 64)


def test_bad_offsets_refused(tmp_path):
    """An index whose offsets go backwards is refused even when its size and checksum were recorded for it."""
    write(tmp_path, random_docs(10), shard_tokens=1000)
    d = tmp_path / "src"
    idx = np.fromfile(d / "shard_00000.idx", dtype="<u8")
    idx[3], idx[4] = idx[4], idx[3]
    idx.astype("<u8").tofile(d / "shard_00000.idx")
    with pytest.raises(ShardError, match=r"shard_00000\.idx: offsets must start at 0, increase strictly"):
        ShardedSource(d)


def test_writer_resume_keeps_verified_shards_only(tmp_path):
    docs = random_docs(40, seed=5)
    d = tmp_path / "s"
    w = ShardWriter(d, "s", "organic", FP, shard_tokens=16, settings={"k": 1})
    for i, doc in enumerate(docs[:25]):
        w.add(doc, cursor={"doc": i})
    kept = len(w.shards)
    assert kept >= 2 and w._file is not None  # some complete shards plus an open one (a temporary file)
    # A "kill" here leaves the open temporary file; also plant a shard renamed but not yet in progress.json.
    (d / f"shard_{kept:05d}.bin").write_bytes(b"\0" * 12)
    assert list(d.glob(".*.tmp"))
    # Corrupt the second complete shard: it and everything after it must be rewritten.
    w._lock.close()  # the "killed" process's lock dies with it
    bad = d / "shard_00001.bin"
    bad.write_bytes(b"\1" * bad.stat().st_size)
    r = ShardWriter(d, "s", "organic", FP, shard_tokens=16, settings={"k": 1}, resume=True)
    assert not list(d.glob(".*.tmp")) and not (d / f"shard_{kept:05d}.bin").exists()
    assert len(r.shards) == 1 and not (d / "shard_00001.bin").exists()
    start = r.resume_cursor["doc"] + 1
    for i, doc in enumerate(docs[start:], start):
        r.add(doc, cursor={"doc": i})
    m = r.close()
    src = ShardedSource(d, verify="checksum")
    assert [src.doc(i).tolist() for i in range(src.num_docs)] == docs
    assert m["num_docs"] == 40
    # Different settings: nothing of the old output is continued.
    fresh = ShardWriter(d, "s", "organic", FP, shard_tokens=16, settings={"k": 2}, resume=True)
    assert fresh.resume_cursor is None and not list(d.glob("shard_*")) and not (d / MANIFEST).exists()


def test_abort_drops_open_shard(tmp_path):
    w = ShardWriter(tmp_path / "s", "s", "organic", FP, shard_tokens=100)
    w.add([1, 2, EOD])
    w.abort()
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".writer.lock", PROGRESS]


def test_pickle_reopens_memmaps(tmp_path):
    docs = random_docs(12)
    write(tmp_path, docs)
    src = ShardedSource(tmp_path / "src")
    src.doc(0)
    clone = pickle.loads(pickle.dumps(src))
    assert clone.doc(11).tolist() == docs[11]


def test_one_writer_per_directory(tmp_path):
    w = ShardWriter(tmp_path / "s", "s", "organic", FP)
    with pytest.raises(ShardError, match="another process is writing this source"):
        ShardWriter(tmp_path / "s", "s", "organic", FP)
    w.add([1, EOD])
    w.close()
    ShardWriter(tmp_path / "s", "s", "organic", FP).abort()  # free again once the first one is closed
