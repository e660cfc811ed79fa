"""data.prepare: every input format, every bad-input case, resume after a kill, idempotence, parallel == serial."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

import data.prepare as prep
from data.prepare import PrepareConfig, PrepareError, PrepareSource, prepare_source
from data.shards import MANIFEST, PROGRESS, ShardedSource, ShardError

REPO = Path(__file__).resolve().parents[2]
EOD = 100257
TEXTS = [
    "def f(x):\n    return x * 2\n",
    "Ünïcödé text — with 漢字 and emoji 🙂.",
    "A user typing <|endoftext|> or <|im_end|> writes text, not special ids.",
    "short",
] + [f"Document {i}: the sum of {i} and {i + 1} is {2 * i + 1}." for i in range(40)]
CHATS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! <|im_end|> is just text here."}],
]


def jsonl_bytes(objs) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


def write_inputs(d: Path) -> dict[str, Path]:
    """The same TEXTS in every supported format."""
    d.mkdir(parents=True, exist_ok=True)
    objs = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    paths = {"jsonl": d / "a.jsonl", "gz": d / "a.jsonl.gz", "zst": d / "a.jsonl.zst", "parquet": d / "a.parquet"}
    paths["jsonl"].write_bytes(jsonl_bytes(objs))
    paths["gz"].write_bytes(gzip.compress(jsonl_bytes(objs)))
    # two zstd frames back to back, as concatenating compressed files gives
    half = len(objs) // 2
    cctx = zstandard.ZstdCompressor()
    paths["zst"].write_bytes(cctx.compress(jsonl_bytes(objs[:half])) + cctx.compress(jsonl_bytes(objs[half:])))
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), paths["parquet"], row_group_size=7)
    folder = d / "folder"
    for i, t in enumerate(TEXTS):  # nested folders; sorted path order must give TEXTS order
        sub = folder / f"part{i // 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc_{i:03d}.txt").write_text(t)
    (folder / "part0" / "ignored.bin").write_bytes(b"\xff\xfe not a text suffix")
    paths["folder"] = folder
    return paths


def read_back(out: Path) -> list[list[int]]:
    src = ShardedSource(out, verify="checksum")
    return [src.doc(i).tolist() for i in range(src.num_docs)]


def run(src: PrepareSource, out: Path, tok, workers=2, **kw) -> dict:
    return prepare_source(src, out, tok, workers, progress=False, log=kw.pop("log", lambda *_: None), **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "gz", "zst", "parquet", "folder"])
def test_formats_round_trip(tmp_path, tok, fmt):
    paths = write_inputs(tmp_path / "in")
    m = run(PrepareSource(name=fmt, provenance="organic", path=str(paths[fmt]), shard_tokens=64), tmp_path / "out", tok)
    expected = [tok.encode(t) + [EOD] for t in TEXTS]
    assert read_back(tmp_path / "out" / fmt) == expected
    assert m["num_docs"] == len(TEXTS) and m["tokenizer"] == tok.fingerprint and len(m["shards"]) > 2
    assert m["skipped"] == {} and m["inputs"][0]["bytes"] > 0
    special_looking = expected[2]
    assert not set(special_looking[:-1]) & {100257, 100265}  # the text <|endoftext|> stays text


@pytest.mark.parametrize("fmt", ["jsonl.zst", "parquet"])
def test_chat_source(tmp_path, tok, fmt):
    p = tmp_path / f"chat.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"conv": CHATS}), p)
    else:
        p.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes([{"conv": c} for c in CHATS])))
    src = PrepareSource(name="chat", provenance="synthetic", path=str(p), kind="chat", text_field="conv")
    m = run(src, tmp_path / "out", tok)
    assert m["provenance"] == "synthetic"
    assert read_back(tmp_path / "out" / "chat") == [tok.apply_chat_template(c) + [EOD] for c in CHATS]


def test_chat_from_text_files_refused(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    with pytest.raises(PrepareError, match=r"kind chat reads .* plain text files: \[.*a\.txt"):
        run(PrepareSource(name="c", path=str(tmp_path / "d"), kind="chat"), tmp_path / "out", tok)


def _truncated(data: bytes, codec) -> bytes:
    return codec(data)[:-12]


GOOD = {"text": "good document"}
BAD_CASES = {
    # name: (file name, file bytes, reason, expected location, expected words)
    "malformed_json": ("a.jsonl", jsonl_bytes([GOOD]) + b'{"text": "unterminated\n' + jsonl_bytes([GOOD]),
                       "malformed_json", "a.jsonl: line 2", "not valid JSON"),
    "missing_field": ("a.jsonl", jsonl_bytes([GOOD, GOOD, {"body": "x"}]), "missing_field", "a.jsonl: line 3",
                      "no key 'text'"),
    "not_an_object": ("a.jsonl", jsonl_bytes([GOOD]) + b"[1, 2]\n", "missing_field", "a.jsonl: line 2",
                      "expected a JSON object with key 'text'"),
    "invalid_utf8": ("a.jsonl", jsonl_bytes([GOOD]) + b'{"text": "caf\xe9"}\n', "invalid_utf8", "a.jsonl: line 2",
                     "invalid UTF-8"),
    "lone_surrogate": ("a.jsonl", jsonl_bytes([GOOD]) + b'{"text": "x\\ud800y"}\n', "invalid_utf8",
                       "a.jsonl: line 2", "unpaired surrogate"),
    "empty_document": ("a.jsonl", jsonl_bytes([GOOD, {"text": "  \n"}]), "empty_document", "a.jsonl: line 2",
                       "empty document"),
    "empty_file": ("a.jsonl", b"", "empty_file", "a.jsonl", "no lines"),
    "truncated_gzip": ("a.jsonl.gz", _truncated(jsonl_bytes([GOOD] * 500), gzip.compress), "truncated_stream",
                       "a.jsonl.gz: line", "gzip stream ends before its end marker"),
    "truncated_zstd": ("a.jsonl.zst", _truncated(jsonl_bytes([GOOD] * 500), zstandard.ZstdCompressor().compress),
                       "truncated_stream", "a.jsonl.zst: line", "zstd stream ends inside a frame"),
    "text_file_utf8": ("d/x.txt", b"line one\nline two \xff\n", "invalid_utf8", "x.txt: line 2", "invalid UTF-8"),
    "text_file_empty": ("d/x.txt", b"", "empty_file", "x.txt", "file is empty"),
}


def _bad_source(tmp_path: Path, case: str) -> tuple[PrepareSource, str, str, str]:
    name, data, reason, where, words = BAD_CASES[case]
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    good = tmp_path / "in" / "good.jsonl"  # a clean file after the bad one: skip mode must go on to it
    good.write_bytes(jsonl_bytes([{"text": "after the bad file"}]))
    inputs = [str(path.parent if name.startswith("d/") else path), str(good)]
    return PrepareSource(name="bad", paths=inputs), reason, where, words


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_with_location(tmp_path, tok, case):
    src, _, where, words = _bad_source(tmp_path, case)
    with pytest.raises(PrepareError) as e:
        run(src, tmp_path / "out", tok)
    assert where in str(e.value) and words in str(e.value), str(e.value)
    assert not (tmp_path / "out" / "bad" / MANIFEST).exists()
    assert not list((tmp_path / "out" / "bad").glob(".*.tmp"))


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_skipped_and_counted(tmp_path, tok, case):
    src, reason, _, _ = _bad_source(tmp_path, case)
    src.on_error = "skip"
    m = run(src, tmp_path / "out", tok)
    assert m["skipped"] == {reason: 1}
    docs = read_back(tmp_path / "out" / "bad")
    assert docs[-1] == tok.encode("after the bad file") + [EOD]
    assert all(d in (tok.encode("good document") + [EOD], tok.encode("line one") + [EOD]) for d in docs[:-1])


def test_iter_documents_policy(tmp_path):
    from collections import Counter

    from data.sources import SourceError, iter_documents

    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes([GOOD, {"text": ""}, GOOD]) + b"{oops\n")  # leading BOM is fine
    skipped = Counter()
    assert [r.payload for r in iter_documents([p], on_error="skip", skipped=skipped)] == ["good document"] * 2
    assert skipped == {"empty_document": 1, "malformed_json": 1}
    with pytest.raises(SourceError, match=r"a\.jsonl: line 2: key 'text' is an empty document"):
        list(iter_documents([p]))


def test_bad_chat_record(tmp_path, tok):
    p = tmp_path / "c.jsonl"
    p.write_bytes(jsonl_bytes([{"messages": CHATS[0]}, {"messages": [{"role": "robot", "content": "x"}]}]))
    with pytest.raises(PrepareError, match=r"c\.jsonl: line 2: messages\[0\] must be an object with 'role'"):
        run(PrepareSource(name="c", path=str(p), kind="chat"), tmp_path / "out", tok)


def test_all_skipped_is_an_error(tmp_path, tok):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"not json\n")
    with pytest.raises(PrepareError, match=r"no usable document .*'malformed_json': 1"):
        run(PrepareSource(name="a", path=str(p), on_error="skip"), tmp_path / "out", tok)


def test_parallel_equals_serial(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 40)  # many small tasks, so worker processes really interleave
    paths = write_inputs(tmp_path / "in")
    src = PrepareSource(name="s", paths=[str(paths["jsonl"]), str(paths["folder"])], shard_tokens=50)
    serial = run(src, tmp_path / "one", tok, workers=1)
    parallel = run(src, tmp_path / "four", tok, workers=4)
    assert serial["shards"] == parallel["shards"]  # names, counts and sha256 of every file
    assert read_back(tmp_path / "one" / "s") == read_back(tmp_path / "four" / "s")


def test_resume_after_interruption(tmp_path, tok, monkeypatch):
    """Stop mid-way (an exception from the reader, then the leftovers a SIGKILL would leave) and run again."""
    paths = write_inputs(tmp_path / "in")
    src = PrepareSource(name="s", path=str(paths["jsonl"]), shard_tokens=40)
    clean = run(src, tmp_path / "clean", tok)
    real_iter = prep.iter_records

    def dies_after_30(*a, **kw):
        for n, rec in enumerate(real_iter(*a, **kw)):
            if n == 30:
                raise KeyboardInterrupt
            yield rec

    monkeypatch.setattr(prep, "iter_records", dies_after_30)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 40)  # small tasks, so shards complete before the reader dies
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", tok)
    monkeypatch.setattr(prep, "iter_records", real_iter)
    d = tmp_path / "out" / "s"
    done = json.loads((d / PROGRESS).read_text())["shards"]
    assert len(done) >= 2 and not (d / MANIFEST).exists()
    with pytest.raises(ShardError, match="manifest.json: missing"):  # the partial output cannot be read
        ShardedSource(d)
    # What a kill -9 would have left: a temporary file, and a shard renamed but not yet recorded.
    (d / ".shard_00009.bin.abc123.tmp").write_bytes(b"\0" * 40)
    (d / f"shard_{len(done):05d}.bin").write_bytes(b"\0" * 8)
    logs = []
    resumed = run(src, tmp_path / "out", tok, log=logs.append)
    assert any(f"resuming after {len(done)} complete shards" in line for line in logs)
    assert resumed["shards"] == clean["shards"] and resumed["num_docs"] == len(TEXTS)
    assert not list(d.glob(".*.tmp")) and not (d / PROGRESS).exists()
    assert read_back(d) == [tok.encode(t) + [EOD] for t in TEXTS]


def test_rerun_is_idempotent_and_guards_changes(tmp_path, tok):
    paths = write_inputs(tmp_path / "in")
    src = PrepareSource(name="s", path=str(paths["jsonl"]), shard_tokens=40)
    first = run(src, tmp_path / "out", tok)
    d = tmp_path / "out" / "s"
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    logs = []
    assert run(src, tmp_path / "out", tok, log=logs.append) == first
    assert "complete and verified" in logs[-1]
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps  # nothing rewritten
    # A corrupt shard is found by the verification and rebuilt.
    victim = d / "shard_00001.bin"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    assert run(src, tmp_path / "out", tok)["shards"] == first["shards"]
    ShardedSource(d, verify="checksum")
    # Changed input: refused unless overwrite is asked for.
    with open(paths["jsonl"], "ab") as f:
        f.write(jsonl_bytes([{"text": "one more"}]))
    with pytest.raises(PrepareError, match="already prepared from other inputs or settings .*inputs"):
        run(src, tmp_path / "out", tok)
    assert run(src, tmp_path / "out", tok, overwrite=True)["num_docs"] == len(TEXTS) + 1


@pytest.mark.parametrize("change,message", [
    ({"sources": []}, "at least one source"),
    ({"num_workers": -1}, "num_workers=-1"),
    ({"sources": [PrepareSource(name="a", path="x"), PrepareSource(name="a", path="y")]}, "used twice"),
    ({"sources": [PrepareSource(name="a", path="x", provenance="web")]}, r"sources\[0\]\.provenance='web'"),
    ({"sources": [PrepareSource(name="a/b", path="x")]}, r"sources\[0\]\.name='a/b'"),
    ({"sources": [PrepareSource(name="a")]}, "give `path` or `paths`"),
])
def test_config_validation(change, message):
    cfg = PrepareConfig(sources=[PrepareSource(name="ok", path="x")])
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_cli_end_to_end_and_sigkill_resume(tmp_path, capsys):
    """The real command on a config plus an override, after a run killed with SIGKILL just after its second shard."""
    paths = write_inputs(tmp_path / "in")
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        output_dir: {tmp_path / 'out'}
        num_workers: 2
        progress: false
        sources:
          - {{name: web, provenance: organic, path: {paths['gz']}, shard_tokens: 40}}
          - {{name: code, provenance: synthetic, path: {paths['folder']}, suffixes: ['.txt'], shard_tokens: 40}}
        """))
    # The child kills itself right after renaming its second shard, before recording it: the nastiest moment.
    killer = textwrap.dedent("""\
        import os, signal, sys, yaml
        import data.shards as s
        from data.prepare import PrepareConfig, PrepareSource, prepare
        calls = {"n": 0}
        real = s.ShardWriter._write_progress
        def write_progress(self):
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real(self)
        s.ShardWriter._write_progress = write_progress
        raw = yaml.safe_load(open(sys.argv[1]))
        raw["sources"] = [PrepareSource(**x) for x in raw["sources"]]
        prepare(PrepareConfig(**raw))
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", killer, str(cfg)], cwd=REPO, env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    assert not (tmp_path / "out" / "web" / MANIFEST).exists()
    cmd = [sys.executable, "-m", "data.prepare", str(cfg), "num_workers=1"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "web: resuming after 1 complete shards" in done.stdout
    web, code = ShardedSource(tmp_path / "out" / "web", "checksum"), ShardedSource(tmp_path / "out" / "code")
    assert web.num_docs == code.num_docs == len(TEXTS) and code.provenance == "synthetic"
    assert read_back(tmp_path / "out" / "web") == read_back(tmp_path / "out" / "code")
    # Configuration mistakes: exit status 1 and a message naming the file and key (in-process: same main()).
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(cfg.read_text().replace("provenance: synthetic", "provenance: web"))
    for args, message in (([str(bad_cfg)], f"{bad_cfg}: sources[1].provenance='web'"),
                          ([str(cfg), "num_wrokers=3"], "unknown key 'num_wrokers'")):
        assert prep.main(args) == 1
        assert message in capsys.readouterr().err
