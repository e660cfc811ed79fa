"""Answer extraction and scoring of the simple-evals chat suite, as simple-evals does them (our code, same rules):
MMLU's multilingual 'Answer:' search after normalize_response (common.py, mmlu_eval.py), GPQA's and MATH's regexes
(common.py), HumanEval's find_code and pass@k (humaneval_eval.py, human-eval), MGSM's parse_answer / score_mgsm
(mgsm_eval.py), DROP's EM / F1 over normalised answer bags (drop_eval.py), SimpleQA's grade letter and F1
(simpleqa_eval.py).
"""
from __future__ import annotations

import re
import string
from math import comb

import numpy as np

from data.verify.answers import check_answer
from train.eval.chat_prompts import (ANSWER_PATTERN, ANSWER_PATTERN_MULTICHOICE, MGSM_ANSWER_PREFIX,
                                     MULTILINGUAL_ANSWER_PATTERN_TEMPLATE, MULTILINGUAL_ANSWER_REGEXES)

# ---- MMLU, GPQA, MATH -------------------------------------------------------------------------------------------
# common.normalize_response: markdown and LaTeX wrappers removed, in this order, before the MMLU search
_RESPONSE_STRIP = ("**", "$\\boxed{", "}$", "\\$", "$\\text{", "$", "\\mathrm{", "\\{", "\\text", "\\(", "\\mathbf{",
                   "{", "\\boxed")
# common.normalize_extracted_answer: Arabic, Bengali and full-width letters written as A-D
_LETTER_MAP = {"أ": " A", "ب": " B", "ج": " C", "د": " D", "অ": " A", "ব": " B", "ড": " C", "ঢ": " D",
               "Ａ": " A", "Ｂ": " B", "Ｃ": " C", "Ｄ": " D"}


def normalize_response(text: str) -> str:
    for s in _RESPONSE_STRIP:
        text = text.replace(s, "")
    return text


def normalize_extracted_answer(answer: str) -> str:
    for k, v in _LETTER_MAP.items():
        answer = answer.replace(k, v)
    return answer.strip()


def extract_mmlu(completion: str) -> str | None:
    """The letter after the first 'Answer:' form (of MULTILINGUAL_ANSWER_REGEXES, in order) that matches."""
    text = normalize_response(completion)
    for prefix in MULTILINGUAL_ANSWER_REGEXES:
        m = re.search(MULTILINGUAL_ANSWER_PATTERN_TEMPLATE.format(prefix), text)
        if m:
            return normalize_extracted_answer(m.group(1))
    return None


def extract_gpqa(completion: str) -> str | None:
    m = re.search(ANSWER_PATTERN_MULTICHOICE, completion)
    return m.group(1) if m else None


def extract_math(completion: str) -> str | None:
    """The rest of the first 'Answer:' line (simple-evals' ANSWER_PATTERN)."""
    m = re.search(ANSWER_PATTERN, completion)
    return m.group(1) if m else None


def math_equal(extracted: str | None, answer: str) -> bool:
    """DEVIATION: simple-evals asks a grader model (EQUALITY_TEMPLATE) whether the two expressions are equivalent;
    here data.verify.answers.check_answer compares them (numbers by exact value, text after LaTeX normalisation),
    the extracted answer handed to it as a \\boxed{} so it is taken whole."""
    if extracted is None:
        return False
    balanced = extracted.count("{") == extracted.count("}")
    return check_answer(f"\\boxed{{{extracted}}}" if balanced else f"Answer: {extracted}", answer)


# ---- HumanEval --------------------------------------------------------------------------------------------------
_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def find_code(completion: str) -> str:
    """The first ```python block (else the whole text), from just after the first ':\\n    ' on: the signature and
    anything before it dropped, so the body continues the prompt (as humaneval_eval.find_code, whose find() of a
    missing ':\\n    ' gives -1 and drops the first character)."""
    blocks = _PYTHON_BLOCK.findall(completion)
    code = blocks[0] if blocks else completion
    return code[code.find(":\n    ") + 2:]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate of n samples of which c passed (the Codex paper's 1 - C(n-c, k) / C(n, k))."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


# ---- MGSM -------------------------------------------------------------------------------------------------------
def extract_mgsm(completion: str, lang: str) -> str:
    """The last number after the language's last answer prefix ('Answer', 'Antwort', '答案', ...), commas dropped and
    a trailing '.' cut; '' when the prefix is absent or no number follows."""
    prefix = MGSM_ANSWER_PREFIX[lang]
    if prefix not in completion:
        return ""
    numbers = re.findall(r"\d+\.?\d*", completion.split(prefix)[-1].strip().replace(",", ""))
    return numbers[-1].rstrip(".") if numbers else ""


def score_mgsm(target: str, prediction: str) -> bool:
    if "." in prediction:
        prediction = prediction.rstrip("0").rstrip(".")
    return target.replace(",", "") == prediction.replace(",", "")


# ---- DROP -------------------------------------------------------------------------------------------------------
_PUNCTUATION = set(string.punctuation)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def drop_normalize(text: str) -> str:
    """Per token (split on spaces and hyphens): lowercase, punctuation dropped unless a number, numbers as float
    text ('3' -> '3.0'), articles dropped, whitespace collapsed; empty tokens removed."""
    parts = []
    for token in re.split(" |-", text):
        token = token.lower()
        if not _is_number(token):
            token = "".join(ch for ch in token if ch not in _PUNCTUATION)
        if _is_number(token):
            token = str(float(token))
        token = " ".join(re.sub(r"\b(a|an|the)\b", " ", token, flags=re.UNICODE).split())
        if token.strip():
            parts.append(token)
    return " ".join(parts).strip()


def _bag_f1(predicted: set, gold: set) -> float:
    common = len(predicted & gold)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    return 0.0 if precision == 0.0 and recall == 0.0 else 2 * precision * recall / (precision + recall) * 100


def drop_em_f1(predicted: str, gold: str) -> tuple[float, float]:
    """(exact match 0/1, F1 in 0-100 rounded to 2 places) of one predicted string against one gold answer: one span
    each, so drop_eval's optimal bag alignment is the single pair; F1 is 0 when the gold has numbers and the
    prediction none of them."""
    p, g = drop_normalize(predicted), drop_normalize(gold)
    em = float(p == g)
    pbag, gbag = set(p.split()), set(g.split())
    gold_numbers = {w for w in gbag if _is_number(w)}
    numbers_ok = not gold_numbers or bool(gold_numbers & {w for w in pbag if _is_number(w)})
    f1 = _bag_f1(pbag, gbag) if numbers_ok else 0.0
    return em, float(np.round(f1, 2))  # np.round, as drop_eval rounds its numpy mean


def drop_score(extracted: str, answers: list[str]) -> tuple[float, float]:
    """drop_eval.drop_metric: the best EM and the best F1 over the non-blank gold answers."""
    scores = [drop_em_f1(extracted, a) for a in answers if a.strip()]
    if not scores:
        raise ValueError("a DROP item without a non-blank answer in ref_text")
    return max(s[0] for s in scores), max(s[1] for s in scores)


def drop_text_normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def fuzzy_match(a: str, b: str) -> bool:
    """drop_eval.fuzzy_match (its per-item `score`): one normalised string contains the other."""
    a, b = drop_text_normalize(a), drop_text_normalize(b)
    return a == b if not a or not b else (a in b or b in a)


def extract_drop(completion: str) -> str:
    m = re.search(ANSWER_PATTERN, completion)
    return m.group(1) if m else completion


# ---- SimpleQA ---------------------------------------------------------------------------------------------------
GRADES = {"A": "correct", "B": "incorrect", "C": "not_attempted"}


def simpleqa_grade(grader_text: str) -> str:
    """The first A, B or C anywhere in the grader's reply; C (not attempted) when there is none."""
    m = re.search(r"(A|B|C)", grader_text)
    return m.group(0) if m else "C"


def simpleqa_metrics(grades: list[str]) -> dict:
    """simpleqa_eval's aggregate: shares of each grade, accuracy given attempted, and F1, the harmonic mean of
    accuracy given attempted and the share correct (0 when both are 0)."""
    n = max(len(grades), 1)
    correct, incorrect = grades.count("A") / n, grades.count("B") / n
    attempted = correct + incorrect
    given = correct / attempted if attempted > 0 else 0.0
    f1 = 2 * given * correct / (given + correct) if given + correct > 0 else 0.0
    return {"is_correct": correct, "is_incorrect": incorrect, "is_not_attempted": grades.count("C") / n,
            "is_given_attempted": attempted, "accuracy_given_attempted": given, "f1": f1}
