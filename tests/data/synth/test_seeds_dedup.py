"""Seeds (passages with their exact locations, the scoring rules) and dedup (exact and MinHash near duplicates)."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from data.configfile import ConfigError
from data.synth.config import load_synth_config
from data.synth.dedup import Deduper
from data.synth.pipeline import run_shard
from data.synth.seeds import SeedClassifier, passages, split_passages
from tests.helpers.synth import ScriptedBackend, base_config, read_records, write_jsonl


def test_passages_pack_paragraphs_and_keep_their_lines(tmp_path):
    text = "First para line one.\nline two.\n\nSecond para.\n\n\nThird para is here.\n"
    f = tmp_path / "book.txt"
    f.write_text(text)
    got = list(passages([str(f)], "text", passage_chars=40))
    assert [p.text for p in got] == ["First para line one.\nline two.", "Second para.\n\nThird para is here."]
    assert [(p.line_start, p.line_end) for p in got] == [(1, 2), (4, 7)]
    for p in got:
        assert text[p.char_offset:].startswith(p.text.split("\n")[0])
    # shards partition the numbering: together they are the one-shard run
    both = [p.index for s in range(2) for p in passages([str(f)], "text", 40, s, 2)]
    assert sorted(both) == [0, 1]


def test_long_paragraph_is_cut_at_whitespace():
    pieces = [p for *_, p in split_passages("word " * 100, 50)]
    assert all(len(p) <= 50 for p in pieces) and " ".join(pieces).split() == ["word"] * 100


def test_jsonl_seed_errors_name_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"text": "ok " * 100}])
    with open(f, "a") as fh:
        fh.write('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: expected a JSON object with a string 'text'"):
        list(passages([str(f)], "text", 2000))


def test_llm_scores_decide_which_seeds_are_kept(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"text": f"{w} " * 80} for w in ("good", "dull", "noise")])

    def rule(template, text, k):
        assert template == "score_seed"
        if "good" in text:
            return 'Sure: {"educational_value": 4, "reasoning": 3, "information_type": "worked example", ' \
                   '"complexity": "B", "factual_obscurity": 2}'
        if "dull" in text:
            return '{"educational_value": 2, "reasoning": 1}'
        return "five stars"

    cfg = base_config(tmp_path / "out", seeds={"inputs": [str(seeds)], "score": "llm", "min_educational": 3,
                                               "min_reasoning": 2})
    manifest = asyncio.run(run_shard(cfg, ScriptedBackend(rule)))
    assert manifest["steps"]["seeds"] == {"in": 3, "kept": 1, "dropped": {"low_score": 1, "score_unparseable": 1}}
    (kept,) = read_records(tmp_path / "out" / "shards" / "00000-of-00001" / "seeds.jsonl")
    assert kept["scores"] == {"educational_value": 4, "reasoning": 3, "information_type": "worked example",
                              "complexity": "B", "factual_obscurity": 2}
    assert kept["location"]["file"] == str(seeds) and len(kept["location"]["sha256"]) == 64


def test_classifier_scores_from_an_npz_without_pickle(tmp_path):
    dim = 64
    np.savez(tmp_path / "clf.npz", w_educational=np.full(dim, 8.0), w_reasoning=np.full(dim, -8.0), b=np.zeros(2))
    clf = SeedClassifier(str(tmp_path / "clf.npz"))
    assert clf.scores("the proof of the theorem follows") == {"educational_value": 5, "reasoning": 1}
    np.savez(tmp_path / "bad.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="expected an .npz with w_educational"):
        SeedClassifier(str(tmp_path / "bad.npz"))


def test_exact_and_near_duplicates():
    d = Deduper(threshold=0.8)
    base = " ".join(f"w{i}" for i in range(200))
    assert d.check("a", base) == ("", "")
    assert d.check("b", base.upper() + "!!") == ("exact", "a")  # same words after normalisation
    near = base.replace("w100 ", "x100 ")  # one word of 200 changed: Jaccard of 5-gram shingles ~0.95
    assert d.check("c", near) == ("near", "a")
    other = " ".join(f"v{i}" for i in range(200))
    assert d.check("d", other) == ("", "")
    half = " ".join(f"w{i}" for i in range(100)) + " " + " ".join(f"z{i}" for i in range(100))  # Jaccard ~0.33
    assert d.check("e", half) == ("", "")


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\nbackend: {kind: openai}\n")
    with pytest.raises(ConfigError, match="backend.openai.model is required"):
        load_synth_config(path)
    path.write_text("output_dir: x\nbackend: {kind: inprocess, inprocess: {model: m}}\nquestions: {answers: 2}\n")
    with pytest.raises(ConfigError, match="plurality needs at least 3"):
        load_synth_config(path)
    path.write_text("output_dir: x\nbackend: {kind: inprocess, inprocess: {model: m}}\nrewrite: {stlyes: []}\n")
    with pytest.raises(ConfigError, match="did you mean 'styles'"):
        load_synth_config(path)


def test_record_ids_are_stable_and_distinct(tmp_path):
    seeds = write_jsonl(tmp_path / "s.jsonl", [{"text": "same " * 80}, {"text": "other " * 80}])
    ids = []
    for run in ("a", "b"):
        cfg = base_config(tmp_path / run, seeds={"inputs": [str(seeds)]},
                          rewrite={"enabled": True, "styles": ["textbook", "exercises"], "samples": 2})
        asyncio.run(run_shard(cfg, ScriptedBackend(lambda t, text, k: f"{t} {k} {text[-30:]}")))
        rows = read_records(tmp_path / run / "shards" / "00000-of-00001" / "web_rewrite.jsonl")
        ids.append([r["id"] for r in rows])
        assert all(json.dumps(r["provenance"]["sampling"]) for r in rows)
    assert ids[0] == ids[1] and len(set(ids[0])) == 8


def test_seeds_from_prepared_shards(tmp_path, tok):
    """A data.prepare shard directory is a seed input: documents decoded, located by document index."""
    from data.shards import ShardWriter

    texts = ["First document about heat. " * 10, "Second document on light. " * 10]
    writer = ShardWriter(tmp_path / "shards", "organic", "organic", tok.fingerprint)
    for t in texts:
        writer.add(tok.encode(t) + [tok.eod_id])
    writer.close()
    got = list(passages([str(tmp_path / "shards")], "text", 2000))
    assert [p.text for p in got] == [t.strip() for t in texts]
    assert [p.location()["doc"] for p in got] == [0, 1] and "line_start" not in got[0].location()
