"""data.prepare on inputs that used to get through: a damaged parquet page, a cut .gz, a file listed twice, a null
text, a mistyped key inside a source, a symlink loop. Each must stop (or be skipped and counted) with the file, line
or key named, before anything is tokenized."""
from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard

import data.prepare as prep
from data.config import DataConfig
from data.configfile import ConfigError, load_typed
from data.prepare import PrepareConfig, PrepareError, PrepareSource, prepare, prepare_source
from data.shards import MANIFEST, ShardedSource

EOD = 100257


def run(src: PrepareSource, out: Path, tok, **kw) -> dict:
    return prepare_source(src, out, tok, 2, progress=False, log=lambda *_: None, **kw)


def read_back(out: Path) -> list[list[int]]:
    src = ShardedSource(out, verify="checksum")
    return [src.doc(i).tolist() for i in range(src.num_docs)]


def jsonl_bytes(objs) -> bytes:
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


# --- parquet: a valid footer over a damaged data page ----------------------------------------------------------------

ROWS_PER_GROUP, GROUPS, BAD_GROUP = 50, 4, 2


def damaged_parquet(path: Path) -> list[str]:
    """A parquet file whose footer is intact and whose row group BAD_GROUP has a garbled data-page header."""
    texts = [f"row {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(ROWS_PER_GROUP * GROUPS)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=ROWS_PER_GROUP, use_dictionary=False)
    column = pq.ParquetFile(path).metadata.row_group(BAD_GROUP).column(0)
    data = bytearray(path.read_bytes())
    for k in range(column.data_page_offset, column.data_page_offset + 8):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    pq.ParquetFile(path)  # the footer still reads: only the page is damaged
    return texts


def test_damaged_parquet_page_names_file_and_row_group(tmp_path, tok):
    path = tmp_path / "a.parquet"
    damaged_parquet(path)
    with pytest.raises(PrepareError) as e:
        run(PrepareSource(name="p", path=str(path)), tmp_path / "out", tok)
    first = BAD_GROUP * ROWS_PER_GROUP
    assert f"a.parquet: row group {BAD_GROUP} (rows {first}..{first + ROWS_PER_GROUP - 1})" in str(e.value)
    assert "a data page is damaged (pyarrow: " in str(e.value) and "on_error: skip" in str(e.value)


def test_damaged_parquet_page_skipped_keeps_other_row_groups(tmp_path, tok):
    path = tmp_path / "a.parquet"
    texts = damaged_parquet(path)
    m = run(PrepareSource(name="p", path=str(path), on_error="skip"), tmp_path / "out", tok)
    assert m["skipped"] == {"corrupt_file": 1}
    kept = [t for i, t in enumerate(texts) if i // ROWS_PER_GROUP != BAD_GROUP]
    assert read_back(tmp_path / "out" / "p") == [tok.encode(t) + [EOD] for t in kept]


def test_damaged_parquet_resume_counts_the_group_once(tmp_path, tok, monkeypatch):
    """Killed after the damaged group, the rerun neither reads it again nor counts it twice."""
    path = tmp_path / "a.parquet"
    damaged_parquet(path)
    src = PrepareSource(name="p", path=str(path), on_error="skip", shard_tokens=200)
    clean = run(src, tmp_path / "clean", tok)
    real_iter = prep.iter_records

    def dies_in_last_group(*a, **kw):
        for n, rec in enumerate(real_iter(*a, **kw)):
            if n == BAD_GROUP * ROWS_PER_GROUP + 20:  # 20 records into the group after the damaged one
                raise KeyboardInterrupt
            yield rec

    monkeypatch.setattr(prep, "iter_records", dies_in_last_group)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 200)  # small tasks, so shards complete before the reader dies
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", tok)
    monkeypatch.setattr(prep, "iter_records", real_iter)
    resumed = run(src, tmp_path / "out", tok)
    assert resumed["skipped"] == {"corrupt_file": 1}
    assert resumed["shards"] == clean["shards"]


def test_invalid_utf8_in_a_parquet_string_names_the_row(tmp_path, tok):
    """pyarrow reads a string column without checking its UTF-8; the bad row is found, the others are kept."""
    path = tmp_path / "a.parquet"
    raw = [b"one", b"two", b"three", b"caf\xe9 au lait", b"five"]
    pq.write_table(pa.table({"text": pa.array(raw, type=pa.binary()).view(pa.string())}), path)
    with pytest.raises(PrepareError, match=r"a\.parquet: row 3: column 'text' holds invalid UTF-8"):
        run(PrepareSource(name="u", path=str(path)), tmp_path / "out", tok)
    m = run(PrepareSource(name="s", path=str(path), on_error="skip"), tmp_path / "out", tok)
    assert m["skipped"] == {"invalid_utf8": 1}
    assert read_back(tmp_path / "out" / "s") == [tok.encode(t) + [EOD] for t in ("one", "two", "three", "five")]


# --- compressed jsonl cut short ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["gz", "zst"])
def test_truncated_stream_keeps_every_complete_line(tmp_path, tok, codec):
    lines = [{"text": f"document {i}: {'words ' * (i % 5)}"} for i in range(10_000)]
    raw = jsonl_bytes(lines)
    compressed = gzip.compress(raw) if codec == "gz" else zstandard.ZstdCompressor().compress(raw)
    cut = compressed[: len(compressed) * 95 // 100]
    if codec == "gz":
        readable = zlib.decompressobj(31).decompress(cut)
    else:
        readable = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    complete = readable.count(b"\n")  # what a decoder can give back (zstd only whole blocks of 128 KiB)
    assert 5_000 < complete < 10_000
    path = tmp_path / f"a.jsonl.{codec}"
    path.write_bytes(cut)

    m = run(PrepareSource(name="t", path=str(path), on_error="skip"), tmp_path / "out", tok)
    assert m["skipped"] == {"truncated_stream": 1}
    assert m["num_docs"] == complete  # every line before the damage, none of the cut one
    docs = read_back(tmp_path / "out" / "t")
    assert docs[0] == tok.encode(lines[0]["text"]) + [EOD]
    assert docs[-1] == tok.encode(lines[complete - 1]["text"]) + [EOD]

    with pytest.raises(PrepareError, match=rf"a\.jsonl\.{codec}: line {complete + 1}: .*truncated.*; "
                                           rf"{complete} complete lines were read before it"):
        run(PrepareSource(name="r", path=str(path)), tmp_path / "out", tok)


# --- the same file read twice -----------------------------------------------------------------------------------------

def _twice(tmp_path: Path, how: str) -> list[str]:
    d = tmp_path / "in"
    d.mkdir()
    f = d / "a.jsonl"
    f.write_bytes(jsonl_bytes([{"text": "one document"}]))
    if how == "listed twice":
        return [str(f), str(f)]
    if how == "symlink":
        os.symlink(f, tmp_path / "link.jsonl")
        return [str(f), str(tmp_path / "link.jsonl")]
    if how == "hard link":
        os.link(f, tmp_path / "hard.jsonl")
        return [str(tmp_path / "hard.jsonl"), str(f)]
    assert how == "folder and its file"
    return [str(d), str(f)]


@pytest.mark.parametrize("how", ["listed twice", "symlink", "hard link", "folder and its file"])
def test_file_read_twice_refused_before_tokenizing(tmp_path, how, monkeypatch):
    paths = _twice(tmp_path, how)
    # Another source first: a run stops on the doubled file before it prepares anything.
    (tmp_path / "ok.jsonl").write_bytes(jsonl_bytes([{"text": "fine"}]))
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"), progress=False, sources=[
        PrepareSource(name="ok", path=str(tmp_path / "ok.jsonl")),
        PrepareSource(name="dup", paths=paths, suffixes=[".jsonl"])])

    def no_tokenizer(*_):
        raise AssertionError("the tokenizer was loaded before the inputs were checked")

    monkeypatch.setattr("data.tokenizer.Phi4Tokenizer", no_tokenizer)
    with pytest.raises(PrepareError) as e:
        prepare(cfg, log=lambda *_: None)
    msg = str(e.value)
    assert msg.startswith("sources[1] (dup): ") and "a.jsonl" in msg, msg
    assert ("is listed twice" if how == "listed twice" else "is the same file as") in msg, msg
    assert "documents would count twice" in msg
    assert not (tmp_path / "out").exists()


# --- a null text ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,field,expected", [("text", "text", "a string"),
                                                 ("chat", "messages", "a list of {role, content} objects")])
def test_null_field_says_null(tmp_path, tok, kind, field, expected):
    good = {"text": "fine"} if kind == "text" else {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes([good, {field: None, "id": 7}]))
    with pytest.raises(PrepareError) as e:
        run(PrepareSource(name="n", path=str(path), kind=kind), tmp_path / "out", tok)
    assert f"a.jsonl: line 2: key '{field}' is null; expected {expected}" in str(e.value), str(e.value)
    assert "no key" not in str(e.value)


def test_null_parquet_value_says_null(tmp_path, tok):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), path)
    with pytest.raises(PrepareError, match=r"a\.parquet: row 1: key 'text' is null; expected a string"):
        run(PrepareSource(name="n", path=str(path)), tmp_path / "out", tok)
    m = run(PrepareSource(name="s", path=str(path), on_error="skip"), tmp_path / "out", tok)
    assert m["skipped"] == {"missing_field": 1} and m["num_docs"] == 2


# --- a mistyped key inside a source -----------------------------------------------------------------------------------

SOURCE_KEYS = "kind, name, on_error, path, paths, provenance, shard_tokens, suffixes, text_field"


def test_unknown_key_inside_a_source_lists_the_source_keys(tmp_path):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(yaml.safe_dump({"sources": [{"name": "a", "path": "x.jsonl"},
                                               {"name": "b", "path": "y.jsonl", "txt_field": "body"}]}))
    with pytest.raises(ConfigError) as e:
        load_typed(cfg, schema=PrepareConfig)
    assert str(e.value) == (f"{cfg}: unknown key 'sources[1].txt_field' (did you mean 'text_field'?). "
                            f"Valid keys under 'sources[1]': {SOURCE_KEYS}")
    # The same key given on the command line.
    cfg.write_text(yaml.safe_dump({"sources": [{"name": "a", "path": "x.jsonl"}]}))
    with pytest.raises(ConfigError, match=rf"unknown key 'sources\[0\]\.txt_field' .*'sources\[0\]': {SOURCE_KEYS}$"):
        load_typed(cfg, ["sources.0.txt_field=body"], schema=PrepareConfig)
    # A top-level key keeps the top-level list.
    with pytest.raises(ConfigError, match=r"unknown key 'num_wrokers' \(did you mean 'num_workers'\?\)\. Valid keys: "
                                          r"num_workers, output_dir"):
        load_typed(cfg, ["num_wrokers=2"], schema=PrepareConfig)


def test_bad_value_inside_a_source_names_the_entry(tmp_path):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(yaml.safe_dump({"sources": [{"name": "a", "path": "x"}, {"name": "b", "path": "y",
                                                                             "shard_tokens": "many"}]}))
    with pytest.raises(ConfigError, match=r"bad value for 'sources\[1\]\.shard_tokens': Value 'many'"):
        load_typed(cfg, schema=PrepareConfig)


def test_unknown_key_in_a_mixture_source(tmp_path):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump({"sources": [{"name": "a", "weight": 0.5}, {"name": "b", "wieght": 0.5}]}))
    with pytest.raises(ConfigError, match=r"unknown key 'sources\[1\]\.wieght' \(did you mean 'weight'\?\)\. Valid "
                                          r"keys under 'sources\[1\]': min_doc_tokens, name, path"):
        load_typed(cfg, schema=DataConfig)


def test_cli_prints_the_source_key(tmp_path, capsys):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(yaml.safe_dump({"sources": [{"name": "a", "path": "x.jsonl", "txt_field": "body"}]}))
    assert prep.main([str(cfg)]) == 1
    assert "unknown key 'sources[0].txt_field'" in capsys.readouterr().err


# --- links that lead nowhere ------------------------------------------------------------------------------------------

def test_symlink_loop_is_named(tmp_path):
    os.symlink(tmp_path / "b.jsonl", tmp_path / "a.jsonl")
    os.symlink(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"),
                        sources=[PrepareSource(name="l", path=str(tmp_path / "a.jsonl"))])
    with pytest.raises(PrepareError, match=r"sources\[0\] \(l\): .*a\.jsonl: symbolic link loop"):
        prepare(cfg)


def test_dangling_symlink_is_named(tmp_path):
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "a.jsonl")
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"),
                        sources=[PrepareSource(name="l", path=str(tmp_path / "a.jsonl"))])
    with pytest.raises(PrepareError, match=r"a\.jsonl: symbolic link to '.*gone\.jsonl', which does not exist"):
        prepare(cfg)


def test_dangling_symlink_inside_a_folder_is_not_skipped_silently(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("a real document")
    os.symlink(tmp_path / "moved.txt", d / "b.txt")
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"), sources=[PrepareSource(name="f", path=str(d))])
    with pytest.raises(PrepareError, match=r"b\.txt: symbolic link to '.*moved\.txt', which does not exist"):
        prepare(cfg)


def test_missing_input_still_says_not_found(tmp_path):
    cfg = PrepareConfig(output_dir=str(tmp_path / "out"), sources=[PrepareSource(name="m", path=str(tmp_path / "no"))])
    with pytest.raises(PrepareError, match=r"sources\[0\] \(m\): .*no: input not found"):
        prepare(cfg)
    assert not (tmp_path / "out" / "m" / MANIFEST).exists()
