"""The batched decontamination path (Decontaminator.check_batch / screen) against the per-document check."""
import json
import random

import pytest

import data.contamination as contamination
import data.decontaminate as dc
from data.contamination import Decontaminator, normalize
from data.decontaminate import part_paths
from tests.helpers.files import write_jsonl

ITEMS = [
    "A cyclist rides 1.8 km to the bakery, buys four loaves of rye bread and three croissants, then rides home along "
    "the river path at twice her earlier speed; how long did the ride to the bakery take?",
    "Which of the statements about the moons of jupiter and saturn listed below are correct? "
    "a i only b ii only c iii only d ii and iii",
    "Ein Zug fährt um 9:15 Uhr in München ab und erreicht Straße über die Brücke; wie groß ist die Geschwindigkeit "
    "des Zuges in km/h, wenn die Strecke 240 km beträgt und er zweimal hält?",
    "İstanbul'dan Ankara'ya giden otobüs saatte 90 km hızla ilerliyor; yolculuk kaç saat sürer, mesafe 450 km ise "
    "ve otobüs yarım saat mola verirse?",
    "snake_case_names and CamelCase names: what does the function parse_config_file return when the file is empty "
    "and the default flag is set to true in the settings module?",
]
BOILER = "a i only b ii only c iii only d ii and iii"
FILLER = ("the of and to in is was for on that with as by at from river bread train module data value seven "
          "über straße 東京 数学 naïve café ÉCOLE ß İ ǅ x² ½ ① _ __ 42 3.14 - — … !? (see) [1] {x} don't "
          "e-mail https://example.org/a_b?c=d").split()


def corpus(seed: int, n: int) -> list[str]:
    """Documents of every kind: filler, item fragments of 3-20 words (whole n-grams, and fragments that could
    only match across a document boundary), paraphrases, boilerplate, case and punctuation changes, empty."""
    rng = random.Random(seed)
    words = [normalize(t) for t in ITEMS]
    docs = []
    for _ in range(n):
        kind = rng.randrange(8)
        doc = [rng.choice(FILLER) for _ in range(rng.randrange(0, 60))]
        if kind in (1, 2, 3):
            w = words[rng.randrange(len(words))]
            k = rng.randrange(3, 21)
            start = rng.randrange(0, max(1, len(w) - k))
            frag = w[start:start + k]
            if kind == 2:
                frag = [x.upper() if rng.random() < 0.5 else x + rng.choice([",", ".", "!", ""]) for x in frag]
            at = rng.choice([0, len(doc)]) if kind == 3 else rng.randrange(len(doc) + 1)
            doc[at:at] = frag  # kind 3: at an edge, so the rest of the n-gram may sit in the neighbour document
        elif kind == 4:
            w = words[rng.randrange(len(words))]
            every = rng.choice([5, 8, 10, 13, 20])
            doc += ["zzz" if (i + 1) % every == 0 else x for i, x in enumerate(w)]
        elif kind == 5:
            doc += BOILER.split()
        elif kind == 6:
            doc = [] if rng.random() < 0.5 else ["...", "!!!", "_"]
        docs.append(rng.choice([" ", "\n", "  ", "\t", ", "]).join(doc))
    return docs


@pytest.fixture(scope="module")
def checker():
    return Decontaminator({"quiz": [(f"q{i}", t) for i, t in enumerate(ITEMS[:3])],
                           "more": [("m0", ITEMS[3]), ("m1", ITEMS[4]), ("m2", ITEMS[0][:60])],
                           "tiny": [("t1", "two words")]}, allowlist=[BOILER])


def test_words_match_normalize():
    for text in corpus(1, 300) + ["İstanbul ǅemal ΣΊΣΥΦΟΣ ß ﬁ ①②", "a\x1cb\x1fc\u2028d\u00a0e", "_x_ __ y_z"]:
        assert contamination._WORD.findall(text.lower()) == normalize(text)


@pytest.mark.parametrize("batch", [1, 7, 100, 5000])
def test_check_batch_equals_check(checker, batch):
    docs = corpus(0, 2000)
    expected = [checker.check(t) for t in docs]
    got = [v for i in range(0, len(docs), batch) for v in checker.check_batch(docs[i:i + batch])]
    assert got == expected  # every field: class, ratio, benchmark, item, reason, n-gram, per-benchmark classes
    classes = {(v.cls, v.reason) for v in expected}
    assert {("clean", ""), ("partial", "7-gram ratio"), ("contaminated", "7-gram ratio"),
            ("contaminated", "13-gram")} <= classes  # the corpus exercises every verdict
    assert any(v.cls == "clean" and v.ratio > 0 for v in expected)  # shared 7-grams below the info threshold
    suspect = checker.screen(docs)
    assert 0.1 < suspect.mean() < 0.9  # the screen clears many documents, and sends the rest to check()
    assert all(v.cls == "clean" and v.ratio == 0 for v, s in zip(expected, suspect) if not s)


def test_screen_ignores_ngrams_across_documents(checker):
    w = normalize(ITEMS[0])
    docs = [" ".join(w[:6]), " ".join(w[6:20])]  # the first 7-/13-grams of the item exist only across the two
    joined = checker.check(" ".join(docs))
    assert joined.cls == "contaminated" and joined.reason == "13-gram"
    assert checker.screen(docs[:1]).tolist() == [False]
    assert checker.check_batch(docs) == [checker.check(d) for d in docs]


def test_run_is_independent_of_the_batch_size(tmp_path, monkeypatch):
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"id": f"q{i}", "q": t} for i, t in enumerate(ITEMS)])
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus(2, 400)])
    outputs = []
    for batch_chars in (1, 1000, 1 << 22):
        monkeypatch.setattr(dc, "_BATCH_CHARS", batch_chars)
        out = tmp_path / f"out{batch_chars}"
        cfg = dc.DecontaminateConfig(inputs=[str(tmp_path / "a.jsonl")], output_dir=str(out), allowlist=[BOILER],
                                     benchmarks=[dc.BenchmarkSpec(name="b", path=bench, fields=["q"])])
        report = dc.run(cfg)
        outputs.append(((out / "a.jsonl").read_bytes(),
                        (out / "decontamination_report.json").read_text().replace(str(out), "OUT")))
    assert outputs[0] == outputs[1] == outputs[2]
    assert report["totals"]["contaminated"] > 0 and report["totals"]["clean"] > 0
    assert json.loads(outputs[0][1])["examples"]


# ---- --shard I/N and --merge N ---------------------------------------------------------------------------------

def _sharded_inputs(tmp_path):
    import gzip
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"id": f"q{i}", "q": t} for i, t in enumerate(ITEMS)])
    data = tmp_path / "in"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"text": t} for t in corpus(3, 300)])
    rows = [{"text": t} for t in corpus(4, 200)]
    body = "".join(json.dumps(r) + "\n" + ("\n" if i % 17 == 0 else "") for i, r in enumerate(rows))
    body = body.replace(json.dumps(rows[5]), "{not json").replace(json.dumps(rows[9]), '{"other": 1}')
    (data / "b.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (data / "c.jsonl").write_text("")  # an input without documents still gets its (empty) output
    write_jsonl(data / "d.jsonl", [{"text": t} for t in corpus(5, 7)])
    return bench, data


def _outputs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "parts" not in p.parts}


@pytest.mark.parametrize("mode", ["clean", "keep_list"])
def test_shards_and_merge_write_what_one_run_writes(tmp_path, mode):
    import shutil
    bench, data = _sharded_inputs(tmp_path)
    out = tmp_path / "out"
    cfg = tmp_path / "decon.yaml"
    cfg.write_text(json.dumps({"inputs": [str(data)], "output_dir": str(out), "output": mode, "on_error": "skip",
                               "allowlist": [BOILER], "drop_partial": mode == "keep_list", "max_examples": 50,
                               "benchmarks": [{"name": "b", "path": bench, "fields": ["q"]}]}))
    assert dc.main([str(cfg)]) == 0
    expected = _outputs(out)
    report = json.loads(expected["decontamination_report.json"])
    assert report["totals"]["skipped"] == 2 and report["totals"]["contaminated"] > 0
    assert len(report["inputs"]) == 4 and len(report["examples"]) == 50  # examples cut at the limit, in order
    for n in (1, 3, 40):
        shutil.rmtree(out)
        for i in reversed(range(n)):  # the order shards finish in does not matter
            assert dc.main([str(cfg), "--shard", f"{i}/{n}"]) == 0
        assert dc.main([str(cfg), "--merge", str(n)]) == 0
        assert _outputs(out) == expected, n


def test_merge_needs_every_part_of_this_config(tmp_path):
    bench, data = _sharded_inputs(tmp_path)
    cfg = tmp_path / "decon.yaml"
    cfg.write_text(json.dumps({"inputs": [str(data)], "output_dir": str(tmp_path / "out"), "on_error": "skip",
                               "benchmarks": [{"name": "b", "path": bench, "fields": ["q"]}]}))
    dc.main([str(cfg), "--shard", "0/2"])
    with pytest.raises(FileNotFoundError, match=r"1 not complete .*part-00001.done.json"):
        dc.main([str(cfg), "--merge", "2"])
    records, _, marker = part_paths(dc.load_typed(str(cfg), [], schema=dc.DecontaminateConfig), 0, 2)
    first = records.read_bytes()
    records.write_text("")  # a completed shard is not redone: its marker stands for its part
    dc.main([str(cfg), "--shard", "0/2"])
    assert records.read_bytes() == b""
    marker.unlink()  # killed before its marker: redone from the start
    dc.main([str(cfg), "--shard", "0/2"])
    assert records.read_bytes() == first
    dc.main([str(cfg), "max_examples=3", "--shard", "1/2"])
    with pytest.raises(ValueError, match="part-00001.done.json: written with another config"):
        dc.main([str(cfg), "--merge", "2"])
    with pytest.raises(SystemExit, match="expected I/N"):
        dc.main([str(cfg), "--shard", "2/2"])
