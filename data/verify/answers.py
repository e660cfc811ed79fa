"""Answer oracles for maths/QA (answer extraction + normalised comparison) and for code (unit tests or expected
stdout, run in the sandbox and judged outside it by data.verify.sandbox).

These are what Pivotal Token Search and the generative evals call to decide whether a completion succeeded:
comparison with the ground truth for maths/QA, unit tests for code.
"""
from __future__ import annotations

import re
from fractions import Fraction

from data.verify.sandbox import run_program_many, run_python_many

LETTERS = "ABCDEFGHIJ"

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?"
_ANSWER_IS = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+)")
_LAST_NUMBER = re.compile(_NUMBER)
_CODE_BLOCK = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...} with balanced braces, in order."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: last \\boxed{}, else '#### X', else 'The answer is X', else the last
    number. None when nothing answer-like is found."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    for pattern in (_HASHES, _ANSWER_IS):
        matches = pattern.findall(text)
        if matches:
            answer = matches[-1].strip()
            # "The answer is 7. Next we..." -> "7": cut at the end of the sentence, not at a decimal point
            answer = re.split(r"\.(?!\d)|\n", answer)[0]
            return answer.strip()
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def _strip_latex(s: str) -> str:
    s = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("$", "")
    return s


def parse_number(s: str) -> Fraction | None:
    """Exact value of a numeric answer ('1,234', '3.50', '-7/2', '\\frac{3}{4}', '$12', '40%'), else None."""
    s = _strip_latex(s).strip().rstrip(".").strip()
    s = re.sub(r"^[A-Za-z]\s*=\s*", "", s)  # "x = 5"
    s = s.replace("\u2212", "-")
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"\(?\s*([-+]?\d+(?:\.\d+)?)\s*\)?\s*(?:/\s*\(?\s*([-+]?\d+(?:\.\d+)?)\s*\)?)?", s)
    if not m:
        return None
    value = Fraction(m.group(1))
    if m.group(2) is not None:
        denominator = Fraction(m.group(2))
        if denominator == 0:
            return None
        value /= denominator
    return value / 100 if percent else value


def normalize_answer(s: str) -> str:
    """Canonical text of an answer: a number's exact value ('1,234.0' -> '1234', '6/8' -> '3/4'), else lowercased
    text with LaTeX wrappers, surrounding punctuation and extra spaces removed."""
    value = parse_number(s)
    if value is not None:
        return str(value)  # Fraction prints '1234' or '3/4'
    s = _strip_latex(s).strip().strip(".").strip()
    return re.sub(r"\s+", " ", s).lower()


def extract_choice(text: str, num_choices: int = 4) -> str | None:
    """The multiple-choice letter a completion settles on ('The answer is (B)', '\\boxed{B}', 'Answer: B')."""
    valid = LETTERS[:num_choices]
    letter = rf"\(?([{valid}])\)?"
    for candidate in reversed(_boxed_contents(text)):
        m = re.fullmatch(rf"\s*(?:\\text\{{)?{letter}\}}?\s*", candidate)
        if m:
            return m.group(1)
    matches = re.findall(rf"(?i:answer)\s*(?:is|:)\s*:?\s*{letter}(?![A-Za-z0-9])", text)
    if matches:
        return matches[-1]
    standalone = re.findall(rf"(?<![A-Za-z])\(([{valid}])\)", text)
    return standalone[-1] if standalone else None


def check_answer(completion_text: str, reference: str) -> bool:
    """True when the completion's final answer equals `reference` (a number compared by exact value, a choice
    letter 'A'-'J', or text compared after normalisation)."""
    reference = str(reference).strip()
    if re.fullmatch(rf"\(?[{LETTERS}]\)?", reference):
        return extract_choice(completion_text, num_choices=len(LETTERS)) == reference.strip("()")
    answer = extract_answer(completion_text)
    if answer is None:
        return False
    expected_value, got_value = parse_number(reference), parse_number(answer)
    if got_value is None and (m := _LAST_NUMBER.search(answer)):  # "7 apples", "28 cm": the leading number
        got_value = parse_number(m.group())
    if expected_value is not None:
        return got_value is not None and got_value == expected_value
    return normalize_answer(answer) == normalize_answer(reference)


def check_choice(completion_text: str, answer_index: int, num_choices: int) -> bool:
    """True when the completion picks choice number `answer_index` (0-based) of `num_choices`."""
    return extract_choice(completion_text, num_choices) == LETTERS[answer_index]


def extract_code(completion_text: str) -> str:
    """The program in a completion: the last fenced block tagged python/py (or untagged), else the whole text."""
    blocks = [(lang.lower(), body) for lang, body in _CODE_BLOCK.findall(completion_text)]
    python_blocks = [body for lang, body in blocks if lang in ("python", "py", "python3", "")]
    if python_blocks:
        return python_blocks[-1]
    if "```" in completion_text:  # an unterminated block: take what follows the opening fence
        tail = completion_text.split("```", 1)[1]
        return tail.split("\n", 1)[1] if "\n" in tail else ""
    return completion_text


def check_code_many(completions: list[str], tests: list[str], timeout_s: float = 5.0,
                    memory_mb: int = 512) -> list[bool]:
    """Each completion's code against its tests (top-level asserts), in the sandbox, judged outside it; several
    completions share a sandbox start, each in its own process."""
    if len(completions) != len(tests):
        raise ValueError(f"check_code_many: {len(completions)} completions but {len(tests)} test suites")
    results = run_python_many([(extract_code(c), t) for c, t in zip(completions, tests)], timeout_s, memory_mb)
    return [r.passed for r in results]


def check_code(completion_text: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512) -> bool:
    """True when the completion's code passes `tests` in the sandbox."""
    return check_code_many([completion_text], [tests], timeout_s, memory_mb)[0]


def check_program_many(completions: list[str], stdins: list[str], expected_stdouts: list[str],
                       timeout_s: float = 5.0, memory_mb: int = 512) -> list[bool]:
    """Each completion's code run as a program on its stdin; True when it exits normally and prints the expected
    output (trailing whitespace aside), compared outside the sandbox."""
    if not len(completions) == len(stdins) == len(expected_stdouts):
        raise ValueError(f"check_program_many: {len(completions)} completions, {len(stdins)} stdins, "
                         f"{len(expected_stdouts)} expected outputs")
    items = [(extract_code(c), i, o) for c, i, o in zip(completions, stdins, expected_stdouts)]
    return [r.passed for r in run_program_many(items, timeout_s, memory_mb)]


def check_item(item: dict, completion_text: str, timeout_s: float = 5.0, memory_mb: int = 512) -> bool:
    """The oracle of a question item (`pts_questions.jsonl` / `eval_questions.jsonl` row): its 'oracle' field picks
    'math' (answer match against item['answer']), 'code' (item['tests'] in the sandbox) or 'stdio' (the program
    fed item['stdin'] must print item['stdout'])."""
    oracle = item.get("oracle")
    if oracle == "math":
        return check_answer(completion_text, item["answer"])
    if oracle == "code":
        return check_code(completion_text, item["tests"], timeout_s, memory_mb)
    if oracle == "stdio":
        return check_program_many([completion_text], [item["stdin"]], [item["stdout"]], timeout_s, memory_mb)[0]
    raise ValueError(f"question {item.get('id', '?')}: oracle={oracle!r}; expected 'math', 'code' or 'stdio'")
