"""Benchmark readers (data/benchmarks.py) on fixtures in the benchmarks' own published schemas
(tests/fixtures/benchmarks/<name>/<config>/<split>.jsonl, one MMLU split as parquet), their use by the evaluator
(shots, grading in the sandbox), the shipped configuration and the recipe summary's paper column."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.configfile import ConfigError
from tests.helpers.eval_models import random_model
from train.config import load_config
from data.benchmarks import (BenchmarkError, check_alias, cut_completion, humaneval_tests, load_benchmark,
                                   normalize_qa, split_files)
from train.eval.config import EvalConfig, GenerativeTask, MultipleChoiceTask, RecallProbe
from train.eval.run import check_inputs
from train.eval.tasks import (_shots_and_items, eval_multiple_choice, fewshot_where, generative_prompt,
                              grade_completions, mc_prompt, mmlu_shots, task_rows)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests/fixtures/benchmarks"
CPU = torch.device("cpu")


# ---- readers ----------------------------------------------------------------------------------------------------
def test_mmlu_reader_finds_the_config_directory_and_keeps_subject_and_index():
    items = load_benchmark("mmlu_hf", FIX / "mmlu", "test")  # cais/mmlu: <dir>/all/test-*.parquet | test.jsonl
    assert [(i["subject"], i["answer"], i["choices"][i["answer"]]) for i in items] == [
        ("elementary_mathematics", 1, "5"), ("high_school_biology", 2, "Carbon dioxide"),
        ("elementary_mathematics", 1, "5")]
    assert len(load_benchmark("mmlu_hf", FIX / "mmlu", "dev")) == 10
    assert len(load_benchmark("mmlu_hf", FIX / "mmlu", "validation")) == 1
    assert split_files("mmlu_hf", FIX / "mmlu", "dev") == [FIX / "mmlu/all/dev.jsonl"]


def test_mmlu_parquet_reads_the_same_items_as_jsonl():
    files = split_files("mmlu_hf", FIX / "mmlu_parquet", "test")
    assert [f.name for f in files] == ["test-00000-of-00001.parquet"]
    assert load_benchmark("mmlu_hf", FIX / "mmlu_parquet", "test") == load_benchmark("mmlu_hf", FIX / "mmlu", "test")


def test_arc_answer_key_maps_to_the_label_index_for_letters_and_digits():
    items = load_benchmark("arc_hf", FIX / "arc", "test")
    assert [(i["id"], i["answer"], i["choices"][i["answer"]]) for i in items] == [
        ("Mercury_7175875", 1, "the Sun"), ("NYSEDREGENTS_2015_4_8", 2, "balance")]


def test_gsm8k_answer_is_the_number_after_hashes_without_commas():
    items = load_benchmark("gsm8k_hf", FIX / "gsm8k", "test")
    assert [i["answer"] for i in items] == ["7", "2234"]
    assert items[1]["solution"].endswith("#### 2,234") and all(i["oracle"] == "math" for i in items)


def test_math_reads_every_subject_directory_and_takes_the_boxed_answer():
    items = load_benchmark("math_hf", FIX / "math", "test")  # EleutherAI/hendrycks_math: one directory per subject
    assert [(i["type"], i["answer"]) for i in items] == [("Algebra", "3"), ("Geometry", "\\frac{1}{2}")]
    assert len({i["id"] for i in items}) == 2  # ids count across the subject files


def test_triviaqa_keeps_every_alias():
    items = load_benchmark("triviaqa_hf", FIX / "triviaqa", "validation")
    assert items[0]["answer"] == "Paris" and {"Paris, France", "City of Light"} <= set(items[0]["aliases"])
    assert items[1]["id"] == "tc_2" and items[1]["oracle"] == "alias"


def test_mbpp_question_lists_the_tests_and_tests_are_the_asserts():
    items = load_benchmark("mbpp_hf", FIX / "mbpp", "test")
    assert items[0]["id"] == 11 and "\r" not in items[0]["solution"]
    assert items[0]["question"].endswith("Your code should pass these tests:\n\nassert add(1, 2) == 3\n"
                                         "assert add(-1, 1) == 0")
    assert items[0]["tests"] == "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


def test_humaneval_check_body_is_lifted_to_top_level_asserts():
    items = load_benchmark("humaneval_hf", FIX / "humaneval", "test")
    assert items[0]["tests"].splitlines()[:3] == ["METADATA = {'author': 'x', 'dataset': 'test'}", "candidate = add",
                                                   "assert candidate(1, 2) == 3"]
    assert "uncheckable" not in items[0]
    assert "For statement" in items[1]["uncheckable"]  # an assert in a loop cannot be judged outside the sandbox
    assert humaneval_tests("def check(f):\n    assert f(1) == 2\n", "inc") == "f = inc\nassert f(1) == 2\n"


@pytest.mark.parametrize("source,columns", [("mmlu_hf", "question, subject, choices, answer"),
                                            ("humaneval_hf", "prompt, canonical_solution, test, entry_point")])
def test_missing_split_names_the_file_and_layout(tmp_path, source, columns):
    with pytest.raises(BenchmarkError) as e:
        load_benchmark(source, tmp_path, "test")
    assert f"{tmp_path}/test-*.parquet or {tmp_path}/test.jsonl with columns {columns}" in str(e.value)
    with pytest.raises(BenchmarkError, match="nowhere/test-\\*.parquet"):
        load_benchmark(source, tmp_path / "nowhere", "test")


def test_row_without_a_published_column_names_the_file_and_row(tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(BenchmarkError, match=r"test.jsonl: row 0 lacks \['subject'\]"):
        load_benchmark("mmlu_hf", tmp_path, "test")


# ---- shots and prompts ------------------------------------------------------------------------------------------
def test_mmlu_five_shot_takes_the_dev_rows_of_the_items_subject():
    task = MultipleChoiceTask(name="mmlu", source="mmlu_hf", path=str(FIX / "mmlu"), fewshot_split="dev", k_shot=5,
                              format="mmlu")
    items, pool = task_rows(task)
    assert len(items) == 3 and len(pool) == 10  # no scored row is spent on shots
    for item in items:
        shots = mmlu_shots(item, pool, 5, "", fewshot_where(task))
        assert {s["subject"] for s in shots} == {item["subject"]}
        context, conts = mc_prompt(item, shots, "mmlu")
        word = "Math" if item["subject"] == "elementary_mathematics" else "Biology"
        other = "Biology" if word == "Math" else "Math"
        assert [f"{word} dev question {j}?" in context for j in range(5)] == [True] * 5 and other not in context
        assert context.startswith(f"The following are multiple choice questions (with answers) about "
                                  f"{item['subject'].replace('_', ' ')}.\n\n")
        assert context.endswith(f"{item['question'].strip()}\nA. {item['choices'][0]}\nB. {item['choices'][1]}\n"
                                f"C. {item['choices'][2]}\nD. {item['choices'][3]}\nAnswer:")
        assert conts == [" A", " B", " C", " D"]


def test_mmlu_from_published_files_runs_end_to_end(tok):
    task = MultipleChoiceTask(name="mmlu", source="mmlu_hf", path=str(FIX / "mmlu"), fewshot_split="dev", k_shot=5,
                              format="mmlu", primary="acc")
    rec = eval_multiple_choice(random_model(0), tok, task, EvalConfig(batch_size=4), CPU)
    assert rec["metrics"]["items"] == 3 and rec["metrics"]["k_shot"] == 5
    assert [s["answer"] for s in rec["samples"]] == [1, 2, 1]


def test_generative_shots_come_from_the_fewshot_split_and_scored_rows_stay(tok):
    task = GenerativeTask(name="mbpp", source="mbpp_hf", path=str(FIX / "mbpp"), fewshot_split="prompt", k_shot=1)
    shots, items = _shots_and_items(task, ("answer",))
    assert [s["id"] for s in shots] == [2] and [i["id"] for i in items] == [11, 12]
    text = tok.decode(generative_prompt(tok, items[0], shots, "plain"))
    assert text.startswith("Question: Write a function to square a number.") and "def sq(x):" in text
    no_split = GenerativeTask(name="gsm8k", source="gsm8k_hf", path=str(FIX / "gsm8k"), k_shot=1)
    shots, items = _shots_and_items(no_split, ("answer",))  # no fewshot_split: the first test row is the shot
    assert shots[0]["answer"] == "7" and [i["answer"] for i in items] == ["2234"]


def test_humaneval_completion_prompt_is_the_function_prompt(tok):
    item = load_benchmark("humaneval_hf", FIX / "humaneval", "test")[0]
    assert tok.decode(generative_prompt(tok, item, [], "completion")) == item["code_prefix"]


# ---- grading ----------------------------------------------------------------------------------------------------
def test_mbpp_and_humaneval_are_graded_by_their_tests_in_the_sandbox():
    mbpp = load_benchmark("mbpp_hf", FIX / "mbpp", "test")
    human = load_benchmark("humaneval_hf", FIX / "humaneval", "test")
    items = mbpp + human
    rows = [(n, 0) for n in range(len(items))] + [(0, 1), (2, 1)]
    texts = [mbpp[0]["solution"], "```python\ndef rev(s):\n    return s\n```",  # wrong: rev('abc') != 'cba'
             human[0]["solution"] + "\n\ndef unrelated():\n    return 1 / 0\n",  # cut at the next top-level def
             human[1]["solution"],  # right, but its tests cannot be split: scored as not passed
             "def add(a, b):\n    return a - b", "    return x - y\n"]
    assert grade_completions(items, rows, texts) == [True, False, True, False, False, False]


def test_triviaqa_exact_match_against_any_alias_after_normalisation():
    item = load_benchmark("triviaqa_hf", FIX / "triviaqa", "validation")[1]
    assert normalize_qa("  The  Bard! ") == "bard"
    assert check_alias(" shakespeare.\nQuestion: next", item["aliases"]) and check_alias("The Bard", item["aliases"])
    assert not check_alias("Marlowe", item["aliases"]) and not check_alias("", item["aliases"])
    assert not check_alias("Shakespeare wrote it", item["aliases"])  # exact match, not containment
    assert grade_completions([item], [(0, 0), (0, 1)], ["William Shakespeare", "Bacon"]) == [True, False]


def test_cut_completion_stops_at_a_new_top_level_statement():
    assert cut_completion("    x = 1\n    if x:\n        return x\nif __name__ == '__main__':\n    pass") == \
        "    x = 1\n    if x:\n        return x"
    assert cut_completion("    return 1") == "    return 1"


# ---- configuration, inputs, summary -----------------------------------------------------------------------------
def test_shipped_eval_config_is_the_papers_base_suite():
    cfg = load_config(REPO / "configs/phi4-14b/eval.yaml", schema=EvalConfig)
    shots = {t.name: (t.source, t.k_shot) for t in cfg.multiple_choice + cfg.generative}
    assert shots == {"mmlu": ("mmlu_hf", 5), "arc_challenge": ("arc_hf", 1), "triviaqa": ("triviaqa_hf", 1),
                     "mbpp": ("mbpp_hf", 3), "math": ("math_hf", 4), "gsm8k": ("gsm8k_hf", 8),
                     "humaneval": ("humaneval_hf", 0)}
    mmlu = cfg.multiple_choice[0]
    assert (mmlu.format, mmlu.fewshot_split, mmlu.primary) == ("mmlu", "dev", "acc")
    assert all(t.temperature == 0.0 and t.prompt != "chat" for t in cfg.generative)
    # no task here uses the protocol of the report's numbers (simple-evals, chat, T=0.5)
    assert all(t.paper_score is None for t in cfg.multiple_choice + cfg.generative)


@pytest.mark.parametrize("override,message", [
    (["multiple_choice.0.source=gsm8k_hf"], "multiple_choice[0].source='gsm8k_hf'"),
    (["multiple_choice.0.fewshot_split=", "multiple_choice.0.fewshot_path="], "format=mmlu takes its shots"),
    (["multiple_choice.0.source=jsonl"], "fewshot_split='dev' needs a benchmark source"),
    (["generative.0.prompt=raw"], "generative[0].prompt='raw'")])
def test_bad_source_settings_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/phi4-14b/eval.yaml", override, schema=EvalConfig)
    assert message in str(e.value)


def test_check_inputs_reads_benchmark_sources_and_names_a_missing_split(tmp_path):
    cfg = EvalConfig(model_path=str(tmp_path), multiple_choice=[
        MultipleChoiceTask(name="mmlu", source="mmlu_hf", path=str(FIX / "mmlu"), fewshot_split="dev", k_shot=5,
                           format="mmlu")],
        generative=[GenerativeTask(name="tqa", source="triviaqa_hf", path=str(FIX / "triviaqa"), split="test")])
    with pytest.raises(BenchmarkError, match=r"no file for split 'test'.*rc.nocontext"):
        check_inputs(cfg)  # TriviaQA's fixture has validation and train only
    cfg.generative[0].split = "validation"
    check_inputs(cfg)


def test_summary_prints_the_paper_score_beside_a_task_that_has_one(tmp_path):
    from train.recipe.summary import _eval_scores, _paper_scores, _score_text

    (tmp_path / "results.jsonl").write_text(
        json.dumps({"task": "mmlu", "metrics": {"accuracy": 0.8}, "paper_score": 84.8}) + "\n"
        + json.dumps({"task": "gsm8k", "metrics": {"accuracy": 0.5}}) + "\n")
    scores, paper = _eval_scores(tmp_path), _paper_scores(tmp_path)
    assert paper == {"mmlu/accuracy": 84.8}
    assert [_score_text(k, v, paper) for k, v in scores.items()] == ["mmlu/accuracy 0.8 (paper 84.8)",
                                                                    "gsm8k/accuracy 0.5"]


def test_run_tasks_on_published_files_records_uncheckable_items_and_the_paper_score(tok):
    from train.eval.run import run_tasks

    cfg = EvalConfig(batch_size=4, recall=RecallProbe(lengths=[]),
                     generative=[GenerativeTask(name="humaneval", source="humaneval_hf", path=str(FIX / "humaneval"),
                                                prompt="completion", max_new_tokens=4, paper_score=12.5),
                                 GenerativeTask(name="gsm8k", source="gsm8k_hf", path=str(FIX / "gsm8k"),
                                                fewshot_split="train", k_shot=1, max_new_tokens=4)])
    records = {r["task"]: r for r in run_tasks(random_model(0), tok, cfg, CPU)}
    human, gsm = records["humaneval"], records["gsm8k"]
    assert human["paper_score"] == 12.5 and "paper_score" not in gsm
    assert human["metrics"]["items"] == 2 and human["metrics"]["items_uncheckable"] == 1
    assert [s["correct"] for s in human["samples"]][1] is False  # the uncheckable item is never counted as passed
    assert gsm["metrics"]["items"] == 2 and [s["answer"] for s in gsm["samples"]] == ["7", "2234"]


def test_decontamination_reads_the_published_layouts(tmp_path):
    """A benchmark given as its HF directory (source: mmlu_hf, ...) is what the n-gram check compares against: a
    training document that copies an MMLU question and one that copies a GSM8K solution are caught."""
    from data.decontaminate import BenchmarkSpec, DecontaminateConfig, run

    mmlu = load_benchmark("mmlu_hf", FIX / "mmlu", "test")
    gsm8k = load_benchmark("gsm8k_hf", FIX / "gsm8k", "test")
    docs = [{"text": "Intro. " + mmlu[0]["question"] + " " + " ".join(mmlu[0]["choices"]) + " The end."},
            {"text": "Worked: " + gsm8k[1]["solution"]},
            {"text": "A clean document about the weather in spring, unrelated to any benchmark item at all."}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = DecontaminateConfig(inputs=[str(data)], output_dir=str(tmp_path / "out"), benchmarks=[
        BenchmarkSpec(name="mmlu", path=str(FIX / "mmlu"), source="mmlu_hf", fields=["question", "choices"]),
        BenchmarkSpec(name="gsm8k", path=str(FIX / "gsm8k"), source="gsm8k_hf", fields=["question", "solution"])])
    cfg.validate()
    report = run(cfg)
    assert report["totals"]["contaminated"] == 2 and report["totals"]["kept"] == 1
    assert {e["benchmark"] for e in report["examples"]} == {"mmlu", "gsm8k"}
    bad = DecontaminateConfig(inputs=[str(data)], output_dir=str(tmp_path / "o2"),
                              benchmarks=[BenchmarkSpec(name="x", path="p", source="squad_hf")])
    with pytest.raises(ValueError, match="source='squad_hf'"):
        bad.validate()


def test_summary_compares_per_metric_paper_scores(tmp_path):
    """A dict paper_score names its metrics: SimpleQA's f1, HELMET's category score per length."""
    from train.recipe.summary import _eval_scores, _paper_scores, _score_text

    (tmp_path / "results.jsonl").write_text(
        json.dumps({"task": "simpleqa", "metrics": {"accuracy": 0.1, "f1": 0.03}, "paper_score": {"f1": 3.0}}) + "\n"
        + json.dumps({"task": "rag", "metrics": {"score/8192": 0.5, "score/16384": 0.4, "nq/len_8192/subem": 0.5},
                      "paper_score": {"score/8192": 58.1, "score/16384": 57.1}}) + "\n")
    scores, paper = _eval_scores(tmp_path), _paper_scores(tmp_path)
    assert paper == {"simpleqa/f1": 3.0, "rag/score/8192": 58.1, "rag/score/16384": 57.1}
    assert [_score_text(k, v, paper) for k, v in scores.items()] == [
        "simpleqa/accuracy 0.1", "simpleqa/f1 0.03 (paper 3)", "rag/score/8192 0.5 (paper 58.1)",
        "rag/score/16384 0.4 (paper 57.1)"]
