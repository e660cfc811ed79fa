"""HELMET long-context categories (train/eval/helmet.py): prompts equal to HELMET's templates on fixture rows in
HELMET's schema, demos drawn as Hugging Face `datasets` draws them, prompts cut to the budget, HELMET's parsing and
metrics on hand-worked cases, ICL relabelling, and runs whose merged shards equal one process."""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from data.benchmarks import BenchmarkError
from tests.helpers.eval_models import random_model
from train.config import ConfigError
from train.eval.config import EvalConfig, RecallProbe
from train.eval.helmet import (PROMPTS, build_prompt, check_long_context_inputs, rag_items, rerank_items,
                               task_items)
from train.eval.helmet_config import LongContextTask
from train.eval.helmet_data import (balance_labels, best_metrics, group_labels, icl_item, icl_test_items, ndcg_at,
                                    parse_rankings, read_jsonl_rows)
from train.eval.run import TASK_SECTIONS, run_tasks
from train.eval.shards import merge_shards, write_shard

CPU = torch.device("cpu")
FIX = Path(__file__).parents[2] / "fixtures" / "benchmarks" / "helmet"
INFO = {"source": "model-dir", "step": 1}


def _hf_demos(pool: list[dict], key: str, value: str, shots: int) -> list[dict]:
    """HELMET's own demo draw, run through the real `datasets` library (the reference for our numpy replica)."""
    import datasets
    h = int(hashlib.sha256(str(value).encode("utf-8")).hexdigest(), 16) % 2**31
    shuffled = datasets.Dataset.from_list(pool).shuffle(seed=h)
    seen, out = set(), []
    for d in shuffled:
        if d[key] not in seen:
            seen.add(d[key])
            out.append(d)
    return out[:shots]


def test_rag_prompt_is_helmets_template(tok):
    rows = read_jsonl_rows(FIX / "kilt/nq-dev-multikilt_1000_k20_dep6.jsonl", ())
    pool = read_jsonl_rows(FIX / "kilt/nq-train-multikilt_1000_k3_dep6.jsonl", ())
    items = rag_items("nq", 4096, str(FIX), 100, 42)
    assert [it["id"] for it in items] == [r["question"] for r in rows]  # no id column: keyed by question, file order
    row, item = rows[1], items[1]
    doc = "Document (Title: {title}): {text}"
    demos = "".join("\n\n".join(doc.format(**c) for c in d["ctxs"]) + f"\n\nQuestion: {d['question']}\nAnswer: "
                    f"{d['answers'][0]}\n\n" for d in _hf_demos(pool, "question", row["question"], 2))
    expected = ("Use the given documents to write a concise and short answer to the question. Write your answer in the "
                "following format:\nAnswer: [answer]\n\n" + demos + "\n\n".join(doc.format(**c) for c in row["ctxs"]) +
                f"\n\nQuestion: {row['question']}\nAnswer:")
    ids, cut = build_prompt(tok, "rag", item["fields"], 8192, chat=False)
    assert cut == 0 and tok.decode(ids) == expected
    assert len(rag_items("nq", 4096, str(FIX), 2, 42)) == 2  # max_test_samples


def test_popqa_popularity_filter_and_demos(tok):
    items = rag_items("popqa", 4096, str(FIX), 100, 42)
    assert [it["id"] for it in items] == ["what is george rankin's occupation", "in what country is kadhal"]
    for it in items:  # one split: an item's own question is never its demo
        assert it["fields"]["demos"].count("\n\nQuestion: ") == 2
        assert f"Question: {it['id']}" not in it["fields"]["demos"]
        assert "who was the director of the bride" not in it["fields"]["demos"]  # log10(5000) >= 3: filtered out


def test_rerank_prompt_is_helmets_template(tok):
    rows = read_jsonl_rows(FIX / "msmarco/test_reranking_data_k14_dep3.jsonl", ())
    pool = read_jsonl_rows(FIX / "msmarco/test_reranking_data_k10_dep3.jsonl", ())
    items = rerank_items(4096, str(FIX), 100, 42)
    row, item = rows[0], items[0]
    assert item["qrels"] == {c["id"]: c["label"] for c in row["ctxs"]}
    p = "[ID: {id}] Document (Title: {title}): {text}"
    demos = ""
    for d in _hf_demos([d for d in pool if d["qid"] != row["qid"]], "qid", row["qid"], 2):
        ranking = " > ".join(c["id"] for c in sorted(d["ctxs"], key=lambda c: c["label"], reverse=True))
        demos += "\n\n".join(p.format(**c) for c in d["ctxs"]) + f"\n\nQuery: {d['query']}\nRanking: {ranking}\n\n"
    expected = ("You are provided with a list of documents, each indicated by their ID. Rank each document based on "
                "their relevance to the question in descending order from most relelvant to least relevant texts. "
                "Include all documents in the rankings. Write your answer using the unique IDs, with the following "
                "format:\nRanking: ID3 > ID1 > ID2\n\n" + demos + "\n\n".join(p.format(**c) for c in row["ctxs"]) +
                f"\n\nQuery: {row['query']}\nRanking:")
    ids, _ = build_prompt(tok, "rerank", item["fields"], 8192, chat=False)
    assert tok.decode(ids) == expected
    own = next(d["query"] for d in pool if d["qid"] == row["qid"])  # the demo file holds this query too
    assert f"Query: {own}\nRanking: " not in item["fields"]["demos"]  # its own query is never a demo


@pytest.mark.parametrize("category,length,cut", [("rag", 256, True), ("rag", 512, False), ("rerank", 512, True),
                                                ("rerank", 1024, False)])
def test_prompt_fits_the_budget_and_keeps_what_fits(tok, category, length, cut):
    items = rag_items("nq", length, str(FIX), 100, 42) if category == "rag" else rerank_items(length, str(FIX), 100, 42)
    budget = length - PROMPTS[category][3]
    for it in items:
        ids, cut_tokens = build_prompt(tok, category, it["fields"], length, chat=False)
        full, _ = build_prompt(tok, category, it["fields"], 10**6, chat=False)
        assert len(ids) <= budget
        assert bool(cut_tokens) == (len(full) > budget)
        if cut_tokens:  # cut from the end of the context, as little as needed
            assert len(full) > budget and len(ids) >= budget - 3
            text = tok.decode(ids)
            assert text.endswith(f"\n\n{'Query' if category == 'rerank' else 'Question'}: {it['fields']['question']}"
                                 f"\n{PROMPTS[category][1]}")
        else:
            assert ids == full
    assert any(build_prompt(tok, category, it["fields"], length, False)[1] for it in items) == cut


def test_chat_prompt(tok):
    item = rag_items("nq", 4096, str(FIX), 100, 42)[0]
    ids, _ = build_prompt(tok, "rag", item["fields"], 300, chat=True)
    assert len(ids) <= 280 and ids[-1] == tok.token_id("<|im_sep|>")
    assert tok.decode(ids).startswith("<|im_start|>user<|im_sep|>Use the given documents")


def test_parse_rankings_and_ndcg_by_hand():
    assert parse_rankings("Ranking: [ID: 3] > [ID: 1] > 2\nmore") == ["3", "1", "2"]
    assert parse_rankings("Ranking: ID3 > ID1 > 7 8 > 9") == ["3", "1", "7"]  # the longest run
    assert parse_rankings("Ranking: 5 > 5 > 2") == ["5", "2"]
    assert parse_rankings("Ranking: none") == ["ranking none"]  # no number: the text itself (matches nothing)
    qrels = {"a": 3, "b": 0, "c": 1}
    # DCG = 1/log2(2) + 3/log2(3) = 2.892789; IDCG = 3 + 1/log2(3) = 3.630930; 2.892789 / 3.630930
    assert ndcg_at(["c", "a", "b"], qrels) == pytest.approx(0.796708, abs=1e-6)
    assert ndcg_at(["a", "c", "b"], qrels) == pytest.approx(1.0)
    assert ndcg_at(["x", "b"], qrels) == 0.0 and ndcg_at(["a"], {"a": 0}) == 0.0
    many = {str(i): 1 for i in range(12)}  # only the top 10 count
    assert ndcg_at([str(i) for i in range(12)], many) == pytest.approx(1.0)
    assert ndcg_at([str(i) for i in range(10, 12)], many) == pytest.approx(
        (1 + 1 / math.log2(3)) / sum(1 / math.log2(i + 2) for i in range(10)))


def test_subem_and_exact_match_as_helmet():
    m = best_metrics("Answer: Frank Herbert wrote it", ["Frank Herbert", "Herbert"], "Answer:")
    assert m["substring_exact_match"] == 1.0 and m["exact_match"] == 0.0
    assert best_metrics("Answer: the Lima.", ["Lima"], "Answer:")["exact_match"] == 1.0  # normalised, parsed
    assert best_metrics("Answer: Limassol", ["Lima"], "Answer:")["substring_exact_match"] == 1.0  # HELMET's substring
    assert best_metrics("Answer: Cusco", ["Lima"], "Answer:")["substring_exact_match"] == 0.0


def test_icl_relabelling_is_deterministic_and_balanced():
    from data.benchmarks import read_rows

    train = read_rows(FIX / "hf/trec/train.jsonl")
    groups = group_labels(train, "coarse_label")
    row = {"text": "what is the tallest mountain ?", "coarse_label": 4}
    a, b = icl_item(row, groups, "trec_coarse", 14, 42), icl_item(row, groups, "trec_coarse", 14, 42)
    assert a == b  # the text's seed decides demos and labels
    lines = a["context"].split("\n\n")
    assert len(lines) == 14 and all(line.count("\nlabel: ") == 1 for line in lines)
    labels = Counter(line.split("\nlabel: ")[1] for line in lines)
    assert sorted(labels.values()) == [2, 2, 2, 2, 3, 3]  # two full rounds of the 6 labels, then 2 of the third
    assert set(labels) <= {str(i) for i in range(6)}
    by_text = {r["text"]: r["coarse_label"] for r in train}
    maps = {by_text[line.split("\nlabel: ")[0]]: line.split("\nlabel: ")[1] for line in lines}
    assert len(set(maps.values())) == len(maps)  # a permutation of the labels
    assert a["answers"] == [maps.get(4, a["answers"][0])]
    other = icl_item(row, groups, "trec_coarse", 14, 7)
    assert other != a
    picked = balance_labels(groups, 12, 0)
    assert Counter(r["coarse_label"] for r in picked) == Counter({i: 2 for i in range(6)})
    test = read_rows(FIX / "hf/trec/test.jsonl")
    chosen = icl_test_items(test, "coarse_label", 6, 42)
    assert sorted(r["coarse_label"] for r in chosen) == list(range(6))  # balanced over the labels
    assert icl_test_items(test, "coarse_label", 50, 42) == test  # not more than asked: every row, in order


def _config(tmp_path, **overrides) -> EvalConfig:
    tasks = [LongContextTask(name="rag", category="rag", path=str(FIX), datasets=["nq", "popqa"],
                             lengths=[256, 512, 1024], paper_score={256: 58.1}),
             LongContextTask(name="rerank", category="rerank", path=str(FIX), lengths=[512]),
             LongContextTask(name="icl", category="icl", path=str(FIX / "hf"), datasets=["trec_coarse"],
                             lengths=[256, 512], samples=6)]
    return EvalConfig(output_dir=str(tmp_path / "out"), batch_size=2, recall=RecallProbe(lengths=[]),
                      **{"long_context": tasks, **overrides})


def test_run_records_and_merged_shards_equal_one_process(tok, tmp_path):
    model = random_model(0, max_seq_len=512)
    cfg = _config(tmp_path)
    cfg.validate()
    one = run_tasks(model, tok, cfg, CPU)
    rag, rerank, icl = (next(r for r in one if r["task"] == n) for n in ("rag", "rerank", "icl"))
    assert rag["kind"] == "long_context" and rag["skipped"] == {"len_1024": "beyond the model's max_seq_len=512"}
    assert rag["paper_score"] == {"score/256": 58.1}
    m = rag["metrics"]
    assert m["nq/len_256/items"] == 4 and m["popqa/len_512/items"] == 2
    assert m["score/256"] == pytest.approx((m["nq/len_256/substring_exact_match"] +
                                            m["popqa/len_256/substring_exact_match"]) / 2)
    assert "msmarco_rerank_psg/len_512/ndcg@10" in rerank["metrics"] and "score/512" in rerank["metrics"]
    assert icl["metrics"]["trec_coarse/len_256/items"] == 6 and "score/512" in icl["metrics"]
    for r in (rag, rerank, icl):
        assert sorted(s["index"] for s in r["samples"]) == list(range(len(r["samples"])))  # unique positions
        assert all(s["prompt_tokens"] <= s["length"] - {"rag": 20, "rerank": 200, "icl": 20}[r["task"]]
                   for s in r["samples"])
        assert all("\n" not in s["completion"] for s in r["samples"])  # stop_new_line
    for i in range(2):
        part = run_tasks(model, tok, cfg, CPU, (i, 2))
        assert all(s["index"] % 2 == i for r in part for s in r["samples"])
        write_shard(cfg, i, 2, part, INFO, "lbl")
    records, _, _ = merge_shards(cfg, 2, TASK_SECTIONS)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    assert strip(records) == strip(one)


def test_items_and_lengths_are_fixed_per_seed(tok):
    task = LongContextTask(name="icl", category="icl", path=str(FIX / "hf"), datasets=["trec_coarse"],
                           lengths=[256, 512], samples=6)
    a = task_items(tok, task)
    assert len(a) == 12 and a == task_items(tok, task)
    assert a[0][2]["fields"]["question"] == a[6][2]["fields"]["question"]  # the same items at every length
    assert task_items(tok, dataclasses.replace(task, seed=1)) != a


def test_validation_and_missing_files_are_named(tmp_path):
    bad = [LongContextTask(name="a", category="rag", path="x"), LongContextTask(name="b", category="rag", path="x",
                                                                                 datasets=["squad"])]
    with pytest.raises(ConfigError, match=r"long_context\[1\]\.datasets\[0\]='squad'"):
        EvalConfig(long_context=bad).validate()
    with pytest.raises(ConfigError, match=r"long_context\[0\]\.category='long'"):
        EvalConfig(long_context=[LongContextTask(name="a", category="long", path="x")]).validate()
    with pytest.raises(ConfigError, match=r"long_context\[0\]\.paper_score"):
        EvalConfig(long_context=[LongContextTask(name="a", category="icl", path="x", paper_score={4096: 1.0})]
                   ).validate()
    task = LongContextTask(name="r", category="rag", path=str(tmp_path), datasets=["hotpotqa"])
    with pytest.raises(BenchmarkError, match=r"long_context\[0\] \(r\): .*kilt/hotpotqa-dev-multikilt_1000_k50_dep3"
                                             r"\.jsonl does not exist; expected HELMET's data"):
        check_long_context_inputs(task, "long_context[0] (r)")
    icl = LongContextTask(name="i", category="icl", path=str(FIX / "hf"), datasets=["banking77"])
    with pytest.raises(BenchmarkError, match=r"banking77 does not exist; expected a Hugging Face dataset directory "
                                             r"with train-\*\.parquet or train\.jsonl \(columns \['text', 'label'\]\)"):
        check_long_context_inputs(icl, "long_context[2] (i)")
    check_long_context_inputs(dataclasses.replace(icl, datasets=["trec_coarse"]), "k")
    check_long_context_inputs(LongContextTask(name="r", category="rerank", path=str(FIX), lengths=[512]), "k")


def test_qa_and_summ_items_cut_documents_and_use_chat(tok, monkeypatch):
    import train.eval.helmet as helmet

    monkeypatch.setattr(helmet, "LONG_MIN_TOKENS", {"narrativeqa": 300, "multi_lexsum": 300})  # test double: tiny docs
    qa = helmet.long_items(tok, "narrativeqa", 512, str(FIX / "hf"), 100, 42)
    assert sorted(it["fields"]["question"] for it in qa) == ["What does the engine power?", "Where is the castle?",
                                                            "Who keeps the lantern?"]  # the 40-word story is dropped
    lantern = next(it for it in qa if it["fields"]["question"] == "Who keeps the lantern?")
    assert lantern["answers"] == ["The harbor master", "the master"]
    ctx = lantern["fields"]["context"]
    assert ctx.endswith(" ... [the rest of the text is omitted]") and len(tok.encode(ctx)) <= 512 - 300 + 1
    demos = lantern["fields"]["demos"]
    assert demos.startswith("For example:\n\nQuestion: ") and demos.count("\nAnswer: ") == 2
    assert demos.endswith("\n\nNow, use the following story to answer the question:\n\n")
    ids, _ = build_prompt(tok, "qa", lantern["fields"], 512, chat=True)
    assert len(ids) <= 412 and tok.decode(ids).startswith("<|im_start|>user<|im_sep|>You are given a story")
    assert tok.decode(ids).endswith("Question: Who keeps the lantern?<|im_end|><|im_start|>assistant<|im_sep|>")
    summ = helmet.long_items(tok, "multi_lexsum", 1024, str(FIX / "hf"), 100, 42)
    assert [it["answers"] for it in summ] == [["Plaintiffs sued the city over the harbor; the court granted relief."]]
    assert summ[0]["fields"]["demos"].startswith("Example summaries:\n\nSummary: ")
    assert "None" not in summ[0]["fields"]["demos"]  # rows without a short summary are never demos
    text = tok.decode(build_prompt(tok, "summ", summ[0]["fields"], 1024, chat=False)[0])
    assert text.endswith("\n\nNow please summarize the case.\n\nSummary:")
    m = helmet.score_output("summ", "Summary: Plaintiffs sued the city; relief granted.", summ[0])
    assert 0.5 < m["rougeLsum_f1"] < 1.0 and m["rougeL_f1"] > 0.5
    q = helmet.score_output("qa", "the harbor master, surely", lantern)
    assert q["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # "harbor master surely" vs "harbor master"


def test_qa_run_scores_f1_without_paper_score(tok, tmp_path, monkeypatch):
    import train.eval.helmet as helmet

    monkeypatch.setattr(helmet, "LONG_MIN_TOKENS", {"narrativeqa": 300, "multi_lexsum": 300})
    task = LongContextTask(name="qa", category="qa", path=str(FIX / "hf"), lengths=[512], samples=2)
    cfg = EvalConfig(output_dir=str(tmp_path), batch_size=2, recall=RecallProbe(lengths=[]), long_context=[task])
    cfg.validate()
    r = helmet.eval_long_context(random_model(0, max_seq_len=512), tok, task, cfg, CPU)
    assert "paper_score" not in r and r["metrics"]["narrativeqa/len_512/items"] == 2
    assert r["metrics"]["score/512"] == r["metrics"]["narrativeqa/len_512/f1"]


def test_nlu_split_and_shuffle_are_hugging_faces():
    import datasets
    from data.benchmarks import read_rows
    from train.eval.helmet_data import hf_permutation, icl_splits

    rows = read_rows(FIX / "hf/nlu_evaluation_data/train.jsonl")
    ref = datasets.Dataset.from_list(rows).train_test_split(test_size=0.1, seed=42)
    train, test = icl_splits("nlu", str(FIX / "hf"), 42)
    assert [r["text"] for r in test] == ref["test"]["text"] and len(test) == 3
    assert [r["text"] for r in train] == ref["train"]["text"]
    order = datasets.Dataset.from_list([{"i": i} for i in range(25)]).shuffle(seed=5)["i"]
    assert hf_permutation(25, 5) == list(order)
