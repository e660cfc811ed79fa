"""Built-in smoke corpora (data.smoke.build): deterministic, verified, well-formed, and with a disjoint eval split."""
import json
import re

import pytest

from data.verify.answers import check_answer, extract_answer
from data.verify.sandbox import run_python_many
from data.smoke.build import SCALES, generate, main
from data.smoke.code_items import filter_code_items, make_code_item
from data.smoke.math_items import safe_eval

FILES = ["organic_code.jsonl", "organic_text.jsonl", "organic_long.jsonl", "synthetic_math.jsonl",
         "synthetic_code.jsonl", "synthetic_long.jsonl", "sft.jsonl", "dpo.jsonl", "pts_questions.jsonl",
         "eval_questions.jsonl", "eval_mc.jsonl"]


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    generate(out, seed=0, scale="small")
    return out


def test_same_seed_same_bytes_other_seed_differs(smoke, tmp_path):
    assert main([str(tmp_path / "again"), "--seed", "0", "--scale", "small"]) == 0
    for name in FILES + ["smoke_manifest.json"]:
        assert (smoke / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    generate(tmp_path / "other", seed=1, scale="small")
    for name in FILES:
        assert (smoke / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name


def test_files_parse_with_expected_fields(smoke):
    manifest = json.loads((smoke / "smoke_manifest.json").read_text())
    for name in FILES:
        rows = read(smoke / name)
        assert rows and manifest["files"][name]["records"] == len(rows), name
    for name in FILES[:6]:
        assert all(isinstance(r["text"], str) and r["text"].strip() for r in read(smoke / name)), name
    for row in read(smoke / "sft.jsonl"):
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    sft = read(smoke / "sft.jsonl")
    assert any(r["messages"][0]["role"] == "system" for r in sft)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in sft)  # multi-turn
    for row in read(smoke / "dpo.jsonl"):
        assert row["prompt"][-1]["role"] == "user" and row["chosen"] != row["rejected"]
    for name in ("pts_questions.jsonl", "eval_questions.jsonl"):
        rows = read(smoke / name)
        assert len({r["id"] for r in rows}) == len(rows)
        assert {r["oracle"] for r in rows} == {"math", "code"}
        for r in rows:
            assert r["messages"] == [{"role": "user", "content": r["question"]}] and r["answer"]
            assert (r["oracle"] == "code") == ("tests" in r)
    for r in read(smoke / "eval_mc.jsonl"):
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["answer"] < 4


def test_every_math_answer_recomputes_and_passes_the_checker(smoke):
    questions = [r for r in read(smoke / "pts_questions.jsonl") + read(smoke / "eval_questions.jsonl")
                 if r["oracle"] == "math"]
    lettered = [r for r in questions if r.get("kind") == "multiple_choice"]
    assert lettered, "PTS questions include lettered multiple choice"
    for r in lettered:  # exactly the choice under the answer letter solves the item
        correct = r["choices"]["ABCD".index(r["answer"])]
        assert [safe_eval(r["check"].replace(f"({correct})", f"({c})")) for c in r["choices"]] == [
            c == correct for c in r["choices"]], r
        assert check_answer(f"The answer is {r['answer']}.", r["answer"])
    rows = [r for r in questions if r not in lettered] + read(smoke / "synthetic_math.jsonl")
    for r in rows:
        assert safe_eval(r["check"]) is True, r
        # the check is an independent restatement: any other answer makes it false
        assert r["check"].count(f"({r['answer']})") == 1, r
        assert safe_eval(r["check"].replace(f"({r['answer']})", f"({r['answer']} + 1)")) is False
        m = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r.get("question", r.get("text", "").split("\n")[0][10:]))
        if m:  # the simplest items recomputed from the question text alone
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert int(r["answer"]) == (a + b if op == "+" else a - b)
    for r in read(smoke / "synthetic_math.jsonl"):
        assert check_answer(r["text"], r["answer"])
    for r in read(smoke / "eval_mc.jsonl"):
        correct = r["choices"][r["answer"]]
        verdicts = [safe_eval(r["check"].replace(f"({correct})", f"({c})")) for c in r["choices"]]
        assert verdicts == [i == r["answer"] for i in range(4)], r  # exactly the marked choice solves it


def test_dpo_pairs_chosen_right_rejected_wrong(smoke):
    code_pairs = []
    for r in read(smoke / "dpo.jsonl"):
        if r["chosen"].startswith("```python"):
            code_pairs.append(r)
            continue
        answer = extract_answer(r["chosen"])
        assert answer is not None and check_answer(r["chosen"], answer) and not check_answer(r["rejected"], answer)
    assert code_pairs, "some DPO pairs should be code"


def test_kept_code_passes_its_tests_and_flawed_code_fails(smoke):
    runs = []
    for r in read(smoke / "synthetic_code.jsonl"):
        code, tests = re.findall(r"```python\n(.*?)```", r["text"], re.DOTALL)
        runs.append((code, tests))
    for r in read(smoke / "pts_questions.jsonl") + read(smoke / "eval_questions.jsonl"):
        if r["oracle"] == "code":
            runs.append((r["answer"], r["tests"]))
    assert all(res.passed for res in run_python_many(runs)), "every kept code item passes in the sandbox"
    tests_by_prompt = {r["question"]: r["tests"] for r in read(smoke / "pts_questions.jsonl") if r["oracle"] == "code"}
    for r in read(smoke / "synthetic_code.jsonl"):
        task = r["text"].split("\n")[0].removeprefix("Exercise: ")
        tests_by_prompt.setdefault(task + "\nAnswer with the function in a Python code block.",
                                   re.findall(r"```python\n(.*?)```", r["text"], re.DOTALL)[1])
    pairs = [r for r in read(smoke / "dpo.jsonl") if r["chosen"].startswith("```python")]
    flawed = [(p["rejected"][10:-3], tests_by_prompt[p["prompt"][-1]["content"]]) for p in pairs]
    assert not any(res.passed for res in run_python_many(flawed)), "every rejected code answer fails its tests"


def test_planted_wrong_code_item_is_dropped():
    import random
    rng = random.Random(3)
    good, bad = make_code_item(rng), make_code_item(rng)
    bad = {**bad, "code": bad["buggy"]}  # the flawed variant planted as if it were the solution
    kept = filter_code_items([good, bad])
    assert [k["task"] for k in kept] == [good["task"]]
    assert kept[0]["buggy_fails"] is True


def test_eval_split_disjoint_from_training(smoke):
    held_out = {r["question"] for r in read(smoke / "eval_questions.jsonl")}
    held_out |= {r["question"] for r in read(smoke / "eval_mc.jsonl")}
    train_questions = {m["content"] for r in read(smoke / "sft.jsonl") for m in r["messages"] if m["role"] == "user"}
    train_questions |= {m["content"] for r in read(smoke / "dpo.jsonl") for m in r["prompt"]}
    train_questions |= {r["question"] for r in read(smoke / "pts_questions.jsonl")}
    assert not held_out & {q.removeprefix("Here is another one. ") for q in train_questions}
    pretraining = [r["text"] for name in ("synthetic_math.jsonl", "synthetic_code.jsonl", "synthetic_long.jsonl")
                   for r in read(smoke / name)]
    for q in held_out:
        task = q.removesuffix("\nAnswer with the function in a Python code block.")
        assert not any(f"Exercise: {task}\n" in t or f". {task}\n" in t for t in pretraining), q


def test_long_documents_are_long_in_real_tokens(smoke, tok):
    scale = SCALES["small"]
    for name, min_tokens in (("synthetic_long.jsonl", scale.synthetic_long_min_tokens),
                             ("organic_long.jsonl", scale.organic_long_min_tokens)):
        lengths = [len(ids) for ids in tok.encode_batch([r["text"] for r in read(smoke / name)])]
        assert lengths and min(lengths) >= min_tokens, (name, lengths)
    workbook = read(smoke / "synthetic_long.jsonl")[0]["text"]
    assert "Let N be the answer to Exercise" in workbook  # chained exercises: reading far back pays off


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        generate(tmp_path, scale="huge")
