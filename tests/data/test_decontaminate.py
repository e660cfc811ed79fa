"""Hybrid 13-gram / 7-gram decontamination (data.decontaminate, Phi-4 report App. B.1)."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from data.configfile import ConfigError
from data.contamination import Decontaminator, ngram_hashes, normalize
from data.decontaminate import DecontaminateConfig, main, run
from tests.helpers.files import write_jsonl

REPO = Path(__file__).resolve().parents[2]
ITEM = ("A cyclist rides 1.8 km to the bakery, buys four loaves of rye bread and three croissants, then rides home "
        "along the river path at twice her earlier speed; if the whole trip took forty minutes, how long did the "
        "ride to the bakery take?")
BOILER = "a i only b ii only c iii only d ii and iii"
MC_ITEM = "Which of the statements about the moons of jupiter and saturn listed below are correct? " + BOILER
CLEAN = ("The standard library module for JSON encoding converts Python dictionaries into strings and back again, "
         "and it offers hooks for custom objects. Compression modules wrap zlib, bz2 and lzma streams.")


def paraphrase(text: str, every: int) -> str:
    """Replace every `every`-th word: no 13-gram survives when every <= 13, but many 7-grams do."""
    words = normalize(text)
    return " ".join("zzz" if (i + 1) % every == 0 else w for i, w in enumerate(words))


@pytest.fixture()
def checker():
    return Decontaminator({"quiz": [("q1", ITEM), ("q2", MC_ITEM)], "tiny": [("t1", "two words")]},
                          allowlist=[BOILER], contaminated_threshold=0.4, info_threshold=0.2)


def test_normalisation_and_hashing():
    assert normalize("It weighs 1.8 kg, (roughly)!") == ["it", "weighs", "1", "8", "kg", "roughly"]
    words = normalize(ITEM)
    h = ngram_hashes(words, 7)
    assert h.dtype == np.uint64 and len(h) == len(words) - 6 and len(np.unique(h)) == len(h)
    assert np.array_equal(ngram_hashes(words[3:10], 7), h[3:4])  # same words, same hash, wherever they are
    assert len(ngram_hashes(words[:5], 7)) == 0


def test_exact_13gram_overlap_is_contaminated(checker):
    v = checker.check("Preface. " + " ".join(ITEM.split()[5:20]) + " and other unrelated words follow here.")
    assert v.cls == "contaminated" and v.reason == "13-gram" and v.benchmark == "quiz" and v.item == "q1"
    assert len(v.ngram.split()) == 13 and v.ngram in " ".join(normalize(ITEM))
    assert v.per_benchmark == {"quiz": "contaminated", "tiny": "clean"}


def test_paraphrases_are_caught_by_7gram_ratio(checker):
    close = checker.check("Here is a puzzle. " + paraphrase(ITEM, 13) + " Good luck.")
    assert close.cls == "contaminated" and close.reason == "7-gram ratio" and close.item == "q1"
    assert 0.4 <= close.ratio < 0.5  # no 13-gram shared, so the ratio cannot reach 6/13 ~ 0.46
    loose = checker.check("Here is a puzzle. " + paraphrase(ITEM, 10) + " Good luck.")
    assert loose.cls == "partial" and 0.2 < loose.ratio < 0.4
    fragment = checker.check(" ".join(normalize(ITEM)[:12]))  # shorter than the item: min() makes it count fully
    assert fragment.cls == "contaminated" and fragment.ratio == 1.0


def test_allow_listed_boilerplate_does_not_trigger(checker):
    doc = "Quiz on european rivers and their sources; choose one: " + BOILER + " then explain why the rhine floods."
    assert checker.check(doc).cls == "clean"
    no_allowlist = Decontaminator({"quiz": [("q2", MC_ITEM)]})
    assert no_allowlist.check(doc).cls == "contaminated"  # the allow-list is what made the difference


def test_clean_text_passes(checker):
    v = checker.check(CLEAN)
    assert v.cls == "clean" and v.ratio == 0.0
    assert checker.stats["tiny"] == {"items": 1, "items_without_short_ngrams": 1, "long_ngrams": 0}


@pytest.fixture()
def corpus(tmp_path):
    bench = tmp_path / "bench.jsonl"
    write_jsonl(bench, [{"id": "q1", "question": ITEM}, {"id": "q2", "question": MC_ITEM.split("? ")[0] + "?",
                                                          "choices": BOILER.split(" b ")}])
    docs = [{"text": CLEAN}, {"text": "Copied: " + ITEM}, {"text": CLEAN + " " + paraphrase(ITEM, 10)},
            {"text": "Only boilerplate here: " + BOILER + " and nothing else of note at all."},
            {"messages": [{"role": "user", "content": paraphrase(ITEM, 13)}, {"role": "assistant", "content": "42"}]},
            {"text": CLEAN.upper()}]
    write_jsonl(tmp_path / "train.jsonl", docs)
    return tmp_path


def config(tmp, **kw):
    base = dict(inputs=[str(tmp / "train.jsonl")], text_fields=["text", "messages"], output_dir=str(tmp / "out"),
                benchmarks=[{"name": "quiz", "path": str(tmp / "bench.jsonl"), "fields": ["question", "choices"]}],
                allowlist=[BOILER])
    base.update(kw)
    path = tmp / "decon.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_run_writes_clean_lines_and_counts(corpus, capsys):
    assert main([str(config(corpus))]) == 0
    report = json.loads((corpus / "out" / "decontamination_report.json").read_text())
    expected = {"documents": 6, "clean": 3, "partial": 1, "contaminated": 2, "kept": 4, "skipped": 0}
    assert report["totals"] == expected
    assert {k: report["inputs"][str(corpus / "train.jsonl")][k] for k in expected} == expected
    assert report["benchmarks"]["quiz"]["contaminated"] == 2 and report["benchmarks"]["quiz"]["partial"] == 1
    assert report["benchmarks"]["quiz"]["items"] == 2
    assert {(e["doc"], e["class"], e["reason"]) for e in report["examples"]} == {
        (1, "contaminated", "13-gram"), (2, "partial", "7-gram ratio"), (4, "contaminated", "7-gram ratio")}
    lines = (corpus / "train.jsonl").read_text().splitlines(keepends=True)
    assert (corpus / "out" / "train.jsonl").read_text() == "".join(lines[i] for i in (0, 2, 3, 5))  # byte-exact
    assert "2 contaminated" in capsys.readouterr().out


def test_keep_list_and_drop_partial(corpus):
    main([str(config(corpus, output="keep_list")), "drop_partial=true"])
    assert (corpus / "out" / "train.jsonl.keep.txt").read_text().split() == ["0", "3", "5"]


def test_bad_input_and_config_errors(corpus):
    with (corpus / "train.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl: line 7: not valid JSON"):
        main([str(config(corpus))])
    report = run(DecontaminateConfig(**{**vars(DecontaminateConfig()), "inputs": [str(corpus / "train.jsonl")],
                                        "output_dir": str(corpus / "o2"), "on_error": "skip",
                                        "benchmarks": [_spec(corpus)]}))
    assert report["totals"]["skipped"] == 2  # the bad line, and the chat record without a 'text' field
    with pytest.raises((ValueError, ConfigError), match="benchmarks"):
        main([str(config(corpus, benchmarks=[]))])
    with pytest.raises((ValueError, ConfigError), match="contaminated_threshold"):
        main([str(config(corpus)), "contaminated_threshold=0.1"])


def _spec(tmp):
    from data.decontaminate import BenchmarkSpec
    return BenchmarkSpec(name="quiz", path=str(tmp / "bench.jsonl"), fields=["question"])


def test_shipped_example_config_loads():
    from train.config import load_config
    cfg = load_config(REPO / "configs" / "data" / "decontaminate_example.yaml", schema=DecontaminateConfig)
    assert [b.name for b in cfg.benchmarks] == ["smoke_eval", "smoke_eval_mc"]
    assert cfg.contaminated_threshold == 0.4 and cfg.long_n == 13 and cfg.short_n == 7


def test_example_config_on_smoke_data(tmp_path):
    """End to end on the built-in smoke corpora: eval questions planted into training data are caught."""
    from data.smoke.build import generate
    from train.config import load_config
    raw = tmp_path / "raw"
    generate(raw, seed=0, scale="small", organic_code_tokens=2000, organic_text_tokens=2000, organic_long_tokens=0)
    evals = [json.loads(x) for x in (raw / "eval_questions.jsonl").read_text().splitlines()]
    word_problem = next(e for e in evals if e["oracle"] == "math" and len(normalize(e["question"])) >= 13)
    with (raw / "synthetic_math.jsonl").open("a") as f:
        f.write(json.dumps({"text": f"Exercise: {word_problem['question']}\nSolution: ..."}) + "\n")
    example = yaml.safe_load((REPO / "configs" / "data" / "decontaminate_example.yaml").read_text())
    for bench in example["benchmarks"]:
        bench["path"] = str(raw / Path(bench["path"]).name)
    (tmp_path / "decon.yaml").write_text(yaml.safe_dump(example))
    cfg = load_config(tmp_path / "decon.yaml", [f"inputs=[{raw / 'synthetic_math.jsonl'}]",
                                                f"output_dir={tmp_path / 'out'}"], schema=DecontaminateConfig)
    report = run(cfg)
    assert report["totals"]["contaminated"] >= 1
    assert report["totals"]["documents"] == len((raw / "synthetic_math.jsonl").read_text().splitlines())
    assert word_problem["question"] not in (tmp_path / "out" / "synthetic_math.jsonl").read_text()
