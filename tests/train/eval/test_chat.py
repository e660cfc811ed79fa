"""The simple-evals chat suite (train/eval/chat.py) on fixtures in the published file formats: prompts equal to
simple-evals' templates, its answer extraction and metrics on hand-written completions, GPQA's seeded choice order,
HumanEval in the sandbox, a SimpleQA grader (a test double for the exact logic; a real llama.cpp server in
test_chat_server.py), the whole section through run_tasks with 2 shards merged, and the errors."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from data.benchmarks import BenchmarkError
from data.synth.backend import OpenAIBackendConfig, Response
from data.synth.config import BackendConfig
from data.tokenizer import NUM_BPE_RANKS
from tests.helpers.eval_models import random_model
from train.config import ConfigError
from train.eval.chat import (ChatTask, ask_grader, chat_metrics, chat_prompt, check_chat_inputs, grade,
                             load_chat_items)
from train.eval.chat_data import user_prompt
from train.eval.chat_grading import (drop_em_f1, drop_score, extract_gpqa, extract_math, extract_mgsm, extract_mmlu,
                                     find_code, fuzzy_match, math_equal, pass_at_k, score_mgsm, simpleqa_grade,
                                     simpleqa_metrics)
from train.eval.chat_prompts import EQUALITY_TEMPLATE, SIMPLEQA_GRADER_TEMPLATE
from train.eval.config import EvalConfig, RecallProbe
from train.eval.run import TASK_SECTIONS, main, run_tasks
from train.eval.shards import merge_shards, write_shard

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks" / "simple_evals"
CPU = torch.device("cpu")


def task(benchmark: str, **kw) -> ChatTask:
    return ChatTask(**{"name": benchmark, "benchmark": benchmark, "path": str(FIX), **kw})


# ---- prompts ------------------------------------------------------------------------------------------------------
def test_mmlu_and_math_prompts_are_simple_evals_templates():
    mmlu = load_chat_items(task("mmlu"))
    assert user_prompt("mmlu", mmlu[0], 0) == (
        "Answer the following multiple choice question. The last line of your response should be of the following "
        "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before "
        "answering.\n\nFind the degree for the given field extension Q(sqrt(2)) over Q.\n\nA) 0\nB) 2\nC) 1\nD) 3")
    assert "\"The quote, with a comma, and a line break.\"\nWhich era?" in user_prompt("mmlu", mmlu[3], 0)  # csv
    math = load_chat_items(task("math"))
    assert user_prompt("math", math[2], 0) == (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $ANSWER (without quotes) where $ANSWER is the answer to the problem.\n\nHow many positive "
        "whole-number divisors does 196 have?\n\nRemember to put your answer on its own line after \"Answer:\", and "
        "you do not need to use a \\boxed command.")
    assert math[1]["Answer"] == "\\frac{14}{3}"


def test_humaneval_mgsm_simpleqa_and_drop_prompts():
    he = load_chat_items(task("humaneval"))
    assert user_prompt("humaneval", he[0], 0) == (
        "Read the following function signature and docstring, and fully implement the function described. Your "
        "response should only contain the code for this function.\ndef add(x: int, y: int) -> int:\n"
        "    \"\"\"Add two numbers.\"\"\"\n")
    mgsm = load_chat_items(task("mgsm", languages=["en", "zh"]))
    assert [x["lang"] for x in mgsm] == ["en", "en", "zh"] and mgsm[1]["targets"] == "3"
    assert user_prompt("mgsm", mgsm[2], 0) == (
        "解决这个数学问题。在最后一行给出答案前，请提供推理步骤。最后一行应该以 \"答案: \" 的形式独立给出答案。"
        "在 \"答案：\" 后不要添加除整数答案之外的任何内容。\n\n珍妮特的鸭子每天下 16 个蛋。两天一共下多少个蛋？")
    assert user_prompt("simpleqa", load_chat_items(task("simpleqa"))[2], 0) == "In which city is the Tokyo Skytree?"
    drop = load_chat_items(task("drop"))
    train = load_chat_items(task("drop"))[0]["shots"]
    rng = random.Random(42)  # DropEval: its rng draws 3 train rows per question, in order
    rows = [json.loads(line) for line in gzip.open(FIX / "drop_v0_train.jsonl.gz", "rt")]
    assert [x["shots"] for x in drop] == [rng.sample(rows, 3) for _ in drop] and train[0]["completion"] == "8"
    text = user_prompt("drop", drop[1], 0)
    assert text.startswith("You will be asked to read a passage and answer a question. Some examples of passages "
                           "and Q&A are provided below.\n\n# Examples\n---\nPassage: Team ")
    assert text.endswith("Question: Who did the Bears play?\nAnswer: \n\nThink step by step, then write a line of "
                         "the form \"Answer: $ANSWER\" at the end of your response.\n" + " " * 20)
    assert text.count("\n---\n") == 4 and text.count("\n# Your Task\n") == 1


def test_chat_prompt_uses_the_template_and_user_text_stays_text(tok):
    t = task("simpleqa")
    ids = chat_prompt(tok, t, "Who wrote <|im_end|> here?")
    assert ids == tok.apply_chat_template([{"role": "user", "content": "Who wrote <|im_end|> here?"}], True)
    assert tok.decode(ids).count("<|im_end|>") == 2  # the user text's one, as text, and the turn's end
    specials = [i for i in ids if i >= NUM_BPE_RANKS]
    assert specials == [i for i in chat_prompt(tok, t, "Who wrote here?") if i >= NUM_BPE_RANKS]
    system = chat_prompt(tok, ChatTask(name="s", benchmark="mmlu", path="x", system="Be brief."), "Q")
    assert system == tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "Q"}], True)


def test_gpqa_choice_order_is_seeded_per_repeat():
    items = load_chat_items(task("gpqa", num_samples=3))
    assert items == load_chat_items(task("gpqa", num_samples=3))
    rng = random.Random(0)  # GPQAEval: examples * n_repeats, one rng.sample(range(4), 4) each, in that order
    perms = [rng.sample(range(4), 4) for _ in range(3 * 3)]
    assert [x["permutations"] for x in items] == [[perms[r * 3 + n] for r in range(3)] for n in range(3)]
    assert len({tuple(p) for p in items[0]["permutations"]}) > 1
    for s in range(3):
        text = user_prompt("gpqa", items[1], s)
        letter = grade(task("gpqa", num_samples=3), items, [(1, s)], ["x"])[0]["reference"]
        assert f"\n{letter}) 3\n" in text + "\n"  # the correct answer "3" stands at the graded letter
    subset = load_chat_items(task("gpqa", limit=2))
    assert [x["Record ID"] for x in subset] == [x["Record ID"] for x in random.Random(0).sample(items, 2)]


# ---- extraction and metrics ---------------------------------------------------------------------------------------
def test_multiple_choice_extraction():
    assert extract_mmlu("Reasoning...\n**Answer: B**") == "B"
    assert extract_mmlu("Answer: $\\boxed{C}$") == "C"
    assert extract_mmlu("الإجابة: ب") == "B" and extract_mmlu("答案：Ｄ") == "D"
    assert extract_mmlu("I think it is B.") is None
    assert extract_gpqa("so the answer is\nAnswer: D") == "D"
    assert extract_gpqa("Answer: (B)") is None  # the pattern takes a bare letter only
    assert extract_gpqa("answer: d") == "d"  # case-insensitive prefix and letter: graded wrong against "D"


def test_math_and_mgsm_extraction():
    assert extract_math("2 + 2 = 4\nAnswer: \\frac{14}{3}\nDone") == "\\frac{14}{3}"
    assert extract_math("no answer line") is None
    assert math_equal("\\frac{14}{3}", "\\frac{14}{3}") and math_equal("14/3", "\\frac{14}{3}")
    assert math_equal("9", "9") and not math_equal("8", "9") and not math_equal(None, "9")
    assert extract_mgsm("16 - 3 - 4 = 9, 9 * 2 = 18\nAnswer: 18", "en") == "18"
    assert extract_mgsm("Antwort: 1,234.00 Euro", "de") == "1234.00" and score_mgsm("1234", "1234.00")
    assert extract_mgsm("The result is 18", "en") == "" and not score_mgsm("18", "")
    assert extract_mgsm("答案: 32 个", "zh") == "32" and not score_mgsm("32", "31")


def test_drop_f1_and_em_on_known_cases():
    assert drop_em_f1("the Lions", "Lions") == (1.0, 100.0)  # articles dropped
    assert drop_em_f1("Chicago Bears", "Bears") == (0.0, 66.67)  # P 1/2, R 1
    assert drop_em_f1("3 touchdowns", "2") == (0.0, 0.0)  # the gold number is missing
    assert drop_em_f1("2.0", "2") == (1.0, 100.0)  # numbers compared as floats
    assert drop_em_f1("a 38 yard goal", "38-yard") == (0.0, 80.0)  # hyphens split tokens; P 2/3, R 1
    assert drop_score("38-yard", ["38-yard", "45-yard"]) == (1.0, 100.0)
    assert drop_score("45 yards", ["38-yard", " "]) == (0.0, 0.0)
    assert fuzzy_match("Lions", "the Lions.") and not fuzzy_match("Bears", "Lions")


def test_simpleqa_grade_letter_and_f1_arithmetic():
    assert simpleqa_grade("B") == "B" and simpleqa_grade("no letter here") == "C"
    assert simpleqa_grade("CORRECT") == "C"  # the first of A, B, C anywhere, as simple-evals' regex
    m = simpleqa_metrics(["A", "A", "B", "C"])
    assert m["is_correct"] == 0.5 and m["is_incorrect"] == 0.25 and m["is_not_attempted"] == 0.25
    assert m["is_given_attempted"] == 0.75 and m["accuracy_given_attempted"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))  # = 4/7
    assert simpleqa_metrics(["C", "C"])["f1"] == 0.0 and simpleqa_metrics(["B"])["accuracy_given_attempted"] == 0.0


class RecordingGrader:
    """A test double of a data.synth backend: `reply(user prompt)` is its answer text (None: an HTTP error back).
    It records every request and whether it was closed."""
    batch_size = 0

    def __init__(self, reply):
        self.reply, self.requests, self.closed = reply, [], False

    async def complete(self, request):
        self.requests.append(request)
        text = self.reply(request.messages[-1][1])
        return Response(finish_reason="error", error="HTTP 400: refused") if text is None else Response(text=text)

    async def close(self):
        self.closed = True


def simpleqa_reply(prompt: str) -> str | None:
    """A when the gold target is in the prediction, else B; an empty prediction is refused."""
    target = prompt.split("Gold target: ")[-1].split("\n")[0]
    predicted = prompt.split("Predicted answer: ")[-1].split("\n```")[0]
    return None if not predicted else "A" if target in predicted else "B"


def test_simpleqa_grader_requests_and_metrics_with_a_test_double():
    t = task("simpleqa", num_samples=2)
    items = load_chat_items(t)
    rows = [(0, 0), (0, 1), (2, 0), (2, 1)]
    texts = ["Michio Sugeno", "Lotfi Zadeh", "It is in Tokyo.", ""]
    double = RecordingGrader(simpleqa_reply)
    samples = grade(t, items, rows, texts, seed=7, grader=double)
    assert [x["grade"] for x in samples] == ["A", "B", "A", "C"] and double.closed
    first = double.requests[0]
    assert first.messages == (("system", "You are a helpful assistant."),
                              ("user", SIMPLEQA_GRADER_TEMPLATE.format(
                                  question="Who received the IEEE Frank Rosenblatt Award in 2010?",
                                  target="Michio Sugeno", predicted_answer="Michio Sugeno")))
    assert first.temperature == 0.5 and first.max_tokens == 2048
    assert len({r.seed for r in double.requests}) == 4
    again = RecordingGrader(simpleqa_reply)
    ask_grader(t, ["x"], [(2, 1)], 7, again)  # a request's seed depends on its row alone
    assert again.requests[0].seed == double.requests[3].seed
    m = chat_metrics(t, samples)
    assert m["is_correct"] == 0.5 and m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["grader_errors"] == 1 and m["items"] == 2 and "accuracy" not in m


def test_math_equality_grader_with_a_test_double():
    t = task("math", equality_grader=True)
    items = load_chat_items(t)
    double = RecordingGrader(lambda p: " Yes\n" if p.endswith("Expression 2: 9") else "No")
    samples = grade(t, items, [(1, 0), (2, 0)], ["Answer: 14/3", "so\nAnswer: 9"], grader=double)
    assert [x["correct"] for x in samples] == [False, True]  # the grader's word, not our oracle's
    assert double.requests[1].messages == (("user", EQUALITY_TEMPLATE % {"expression1": "9", "expression2": "9"}),)
    none = RecordingGrader(lambda p: "Yes" if p.endswith("Expression 2: None") else "No")
    assert grade(t, items, [(2, 0)], ["no answer line"], grader=none)[0]["correct"]  # as simple-evals: str(None)


def test_humaneval_pass_in_the_sandbox():
    t = task("humaneval", num_samples=2)
    items = load_chat_items(t)
    right = "Here it is:\n```python\ndef add(x: int, y: int) -> int:\n    return x + y\n```"
    wrong = "def add(x: int, y: int) -> int:\n    return x - y\n"
    assert find_code(right) == "    return x + y\n" and find_code("return 1") == "eturn 1"
    samples = grade(t, items, [(0, 0), (0, 1), (1, 0), (1, 1)], [right, wrong, "    return 2 * x", "x"])
    assert [x["correct"] for x in samples] == [True, False, False, False]
    assert samples[2]["uncheckable"] and "uncheckable" not in samples[0]  # asserts in a loop: never passed
    m = chat_metrics(t, samples)
    assert m["accuracy"] == 0.25 and m["pass@1"] == 0.25 and m["pass@2"] == 0.5 and m["items_uncheckable"] == 1
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10) and pass_at_k(5, 4, 2) == 1.0


def test_metrics_per_benchmark_from_samples():
    mmlu = task("mmlu")
    items = load_chat_items(mmlu)
    samples = grade(mmlu, items, [(0, 0), (1, 0), (2, 0), (3, 0)], ["Answer: B", "Answer: A", "nothing", "Answer: B"])
    m = chat_metrics(mmlu, samples)
    assert m["accuracy"] == 0.5 and m["answer_found"] == 0.75
    assert m["accuracy_stem"] == 1.0 and m["accuracy_other"] == 0.0 and m["accuracy_humanities"] == 1.0
    mgsm = task("mgsm", languages=["en", "de"])
    items = load_chat_items(mgsm)
    m = chat_metrics(mgsm, grade(mgsm, items, [(0, 0), (1, 0), (2, 0)], ["Answer: 18", "Answer: 4", "Antwort: 32"]))
    assert m["accuracy_en"] == 0.5 and m["accuracy_de"] == 1.0 and m["accuracy_group_latin"] == pytest.approx(2 / 3)
    drop = task("drop")
    items = load_chat_items(drop)
    m = chat_metrics(drop, grade(drop, items, [(0, 0), (1, 0)], ["Two kicks.\nAnswer: 2", "Chicago Bears"]))
    assert m["em"] == 0.5 and m["f1"] == pytest.approx((1.0 + 0.0) / 2) and m["fuzzy_match"] == 0.5


# ---- end to end, shards, errors -------------------------------------------------------------------------------------
def suite(tmp_path, **kw) -> EvalConfig:
    chat = [task("mmlu", max_new_tokens=6, paper_score=84.8), task("gpqa", num_samples=2, max_new_tokens=6),
            task("math", max_new_tokens=6), task("humaneval", num_samples=2, max_new_tokens=6),
            task("mgsm", languages=["en", "de", "zh"], max_new_tokens=6),
            task("drop", max_new_tokens=6, paper_score=75.5)]
    return EvalConfig(output_dir=str(tmp_path / "out"), batch_size=3, seed=5, chat=chat,
                      recall=RecallProbe(lengths=[]), **kw)


def test_run_tasks_two_shards_merged_equal_one_process(tok, tmp_path):
    model = random_model(1)
    cfg = suite(tmp_path)
    cfg.validate()
    one = run_tasks(model, tok, cfg, CPU)
    assert [r["task"] for r in one] == ["mmlu", "gpqa", "math", "humaneval", "mgsm", "drop"]
    assert {r["kind"] for r in one} == {"chat"}
    by = {r["task"]: r for r in one}
    assert by["mmlu"]["paper_score"] == 84.8 and by["drop"]["paper_score"] == {"f1": 75.5}
    assert len(by["gpqa"]["samples"]) == 6 and by["gpqa"]["metrics"]["items"] == 3
    assert [(s["index"], s["sample"]) for s in by["humaneval"]["samples"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({s["completion"] for s in by["gpqa"]["samples"]}) > 1  # T=0.5 really samples
    for i in range(2):
        part = run_tasks(model, tok, cfg, CPU, (i, 2))
        assert all(s["index"] % 2 == i for r in part for s in r["samples"])
        write_shard(cfg, i, 2, part, {"source": "m", "step": None}, "lbl")
    merged, _, _ = merge_shards(cfg, 2, TASK_SECTIONS)
    strip = [[{k: v for k, v in r.items() if k != "time_s"} for r in rs] for rs in (merged, one)]
    assert strip[0] == strip[1]  # completions, grades and metrics: exactly one process's


def test_config_validation_names_the_key():
    def bad(**kw):
        with pytest.raises(ConfigError) as e:
            EvalConfig(chat=[ChatTask(**{"name": "t", "benchmark": "mmlu", "path": "p", **kw})]).validate()
        return str(e.value)

    assert "chat[0].benchmark='arc'" in bad(benchmark="arc")
    assert "chat[0].languages=['en', 'xx']" in bad(benchmark="mgsm", languages=["en", "xx"])
    assert "chat[0].grader.openai.model is required" in bad(benchmark="simpleqa")
    assert "chat[0].num_samples=0" in bad(num_samples=0)
    assert "chat[0]: temperature=-1" in bad(temperature=-1)
    assert "chat[0].path is empty" in bad(path="")
    assert "chat[0].equality_grader is for benchmark math only" in bad(equality_grader=True)
    assert "chat[0].grader.openai.model is required" in bad(benchmark="math", equality_grader=True)
    with pytest.raises(ConfigError, match="unique name"):
        EvalConfig(chat=[task("mmlu"), task("mmlu")]).validate()
    ok = BackendConfig(openai=OpenAIBackendConfig(model="grader"))
    EvalConfig(chat=[task("simpleqa", grader=ok)]).validate()


def test_missing_or_malformed_files_name_the_path_and_layout(tmp_path):
    with pytest.raises(BenchmarkError) as e:
        check_chat_inputs(task("mmlu", path=str(tmp_path / "none")), "chat[0] (mmlu)")
    assert f"{tmp_path / 'none'} does not exist" in str(e.value) and "mmlu.csv" in str(e.value)
    assert "Question, A, B, C, D, Answer, Subject" in str(e.value) and "chat[0] (mmlu)" in str(e.value)
    with pytest.raises(BenchmarkError, match=r"no gpqa_diamond.csv in this directory"):
        check_chat_inputs(task("gpqa", path=str(tmp_path)), "chat[1] (gpqa)")
    (tmp_path / "math_500_test.csv").write_text("Problem,Solution\nx,y\n")
    lacks = r"math_500_test.csv: the header lacks \['Answer'\]; got \['Problem', 'Solution'\]"
    with pytest.raises(BenchmarkError, match=lacks):
        check_chat_inputs(task("math", path=str(tmp_path)), "chat[2] (math)")
    (tmp_path / "math_500_test.csv").write_text("Problem,Answer\nWhat is 1+1?,2\n")  # Problem read as Question
    assert load_chat_items(task("math", path=str(tmp_path)))[0]["Question"] == "What is 1+1?"
    with pytest.raises(BenchmarkError, match=r"mgsm_sw.tsv does not exist"):
        check_chat_inputs(task("mgsm", languages=["en", "sw"]), "chat[3] (mgsm)")
    (tmp_path / "drop_v0_dev.jsonl.gz").write_bytes((FIX / "drop_v0_dev.jsonl.gz").read_bytes())
    with pytest.raises(BenchmarkError, match=r"drop_v0_train.jsonl.gz does not exist"):
        check_chat_inputs(task("drop", path=str(tmp_path)), "chat[4] (drop)")


def test_cli_stops_before_loading_a_model_when_a_file_is_missing(tmp_path, capsys):
    (tmp_path / "eval.yaml").write_text(
        f"model_path: {tmp_path}\noutput_dir: {tmp_path / 'out'}\nrecall: {{lengths: []}}\n"
        f"chat:\n  - {{name: mmlu_chat, benchmark: mmlu, path: {tmp_path / 'missing'}}}\n")
    assert main([str(tmp_path / "eval.yaml")]) == 2
    err = capsys.readouterr().err
    assert "chat[0] (mmlu_chat)" in err and str(tmp_path / "missing") in err and "mmlu.csv" in err
