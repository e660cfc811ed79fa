"""data.prepare as an array: `--shard I/N` tasks (input files split over the tasks, one part per file) and `--merge N`
give shards and manifests byte-identical to a one-process run; a missing part is named; reruns redo nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.prepare import PrepareConfig, PrepareError, PrepareSource, main, merge_shards, prepare, prepare_shard

TEXTS = [f"Document {i}: the sum of {i} and {i + 1} is {2 * i + 1}. " * (1 + i % 5) for i in range(60)]


def _inputs(root: Path) -> PrepareConfig:
    web = root / "web"
    web.mkdir(parents=True)
    for f in range(4):  # four jsonl files, one with a malformed line (skipped and counted), one with no usable record
        rows = [json.dumps({"text": t}) for t in TEXTS[f * 15:(f + 1) * 15]]
        if f == 1:
            rows.insert(3, "{not json")
        if f == 3:
            rows = ["{broken"]
        (web / f"part{f}.jsonl").write_text("\n".join(rows) + "\n")
    books = root / "books"
    books.mkdir()
    for f in range(3):
        (books / f"b{f}.txt").write_text("\n\n".join(TEXTS[f::7]))
    return PrepareConfig(output_dir="", progress=False, sources=[
        PrepareSource(name="web", path=str(web), suffixes=[".jsonl"], on_error="skip", shard_tokens=700),
        PrepareSource(name="books", provenance="synthetic", path=str(books), shard_tokens=500)])


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".parts" not in p.parts and p.name != ".lock"}


@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_shards_then_merge_equal_one_process(tmp_path, num_shards):
    cfg = _inputs(tmp_path / "in")
    cfg.output_dir = str(tmp_path / "one")
    prepare(cfg, log=lambda *_: None)
    cfg.output_dir = str(tmp_path / "array")
    for i in reversed(range(num_shards)):  # any order: tasks of an array run concurrently
        prepare_shard(cfg, i, num_shards, log=lambda *_: None)
    merged = merge_shards(cfg, num_shards, log=lambda *_: None)
    one, array = _files(tmp_path / "one"), _files(tmp_path / "array")
    assert one == array and len([k for k in one if k.endswith(".bin")]) > 2
    assert merged["web"]["skipped"] and merged["web"]["num_docs"] == 45


def test_merge_names_a_missing_part_and_cli(tmp_path, capsys):
    cfg = _inputs(tmp_path / "in")
    cfg.output_dir = str(tmp_path / "array")
    prepare_shard(cfg, 0, 2, log=lambda *_: None)
    with pytest.raises(PrepareError, match=r"--merge 2: 3 input file\(s\) not prepared yet"):
        merge_shards(cfg, 2)
    import yaml

    path = tmp_path / "prep.yaml"
    raw = {"output_dir": cfg.output_dir, "progress": False,
           "sources": [{k: v for k, v in s.__dict__.items()} for s in cfg.sources]}
    path.write_text(yaml.safe_dump(raw))
    assert main([str(path), "--shard", "1/2"]) == 0
    assert main([str(path), "--merge", "2"]) == 0
    assert main([str(path), "--shard", "2/2"]) == 1 and "--shard 2/2" in capsys.readouterr().err
