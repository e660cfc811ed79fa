"""The answer oracles PTS and the evals call (data.verify.answers): extraction, normalisation, choices, and the code
oracles over the sandbox (needs bubblewrap: `apt-get install bubblewrap`)."""
from fractions import Fraction

import pytest

from data.verify.answers import (
    check_answer,
    check_choice,
    check_code,
    check_code_many,
    check_item,
    check_program_many,
    extract_answer,
    extract_choice,
    extract_code,
    normalize_answer,
    parse_number,
)
from data.verify.sandbox import UncheckableTests

ADD = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("text, expected", [
    ("so the total is \\boxed{\\frac{3}{4}} units", "\\frac{3}{4}"),
    ("first \\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),
    ("work...\n#### 1,234", "1,234"),
    ("Step 1: 2 + 2 = 4.\nThe answer is 4.", "4"),
    ("The final answer is 3.5. Done.", "3.5"),
    ("we get 12 apples and then 15 pears", "15"),
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalisation_and_numeric_equality():
    assert parse_number("1,234") == 1234 and parse_number("3.50") == Fraction(7, 2)
    assert parse_number("\\frac{6}{8}") == Fraction(3, 4) and parse_number("-7/2") == Fraction(-7, 2)
    assert parse_number("$12.") == 12 and parse_number("x = 5") == 5 and parse_number("40%") == Fraction(2, 5)
    assert parse_number("1/0") is None and parse_number("seven") is None
    assert normalize_answer("1234.0") == "1234" and normalize_answer(" Paris. ") == "paris"
    assert check_answer("... The answer is 1,234.0.", "1234")
    assert check_answer("\\boxed{0.75}", "3/4") and check_answer("\\boxed{\\dfrac{3}{4}}", "0.75")
    assert check_answer("#### 5", "5") and not check_answer("#### 6", "5")
    assert check_answer("The answer is Paris.", "paris") and not check_answer("The answer is Rome.", "Paris")
    assert not check_answer("I am not sure.", "5")
    assert check_answer("The answer is 28 cm.", "28") and not check_answer("The answer is 27 cm.", "28")
    assert check_answer("The answer is 12. Next we check it: 12 - 7 = 5.", "12")  # stated answer, not last number


def test_multiple_choice():
    assert extract_choice("Let me think. The answer is (C).") == "C"
    assert extract_choice("\\boxed{B}") == "B" and extract_choice("Answer: D") == "D"
    assert extract_choice("the answer is a dog") is None  # lowercase words are not letters
    assert extract_choice("Options (A) and (B) fail, so (C)") == "C"
    assert extract_choice("The answer is E", num_choices=4) is None
    assert check_answer("The answer is (B).", "B") and not check_answer("The answer is (B).", "C")
    assert check_choice("Answer: B", 1, 4) and not check_choice("Answer: B", 0, 4)


def test_code_oracle():
    reply = f"Here you go:\n```python\n{ADD}```\nThis adds the numbers."
    assert extract_code(reply) == ADD
    assert extract_code("```py\nx = 1\n```\ntext\n```python\ny = 2\n```") == "y = 2\n"
    assert extract_code("```python\nz = 3\n") == "z = 3\n"  # unterminated block
    assert extract_code(ADD) == ADD  # bare code
    tests = "assert add(2, 2) == 4"
    assert check_code(reply, tests)
    assert not check_code(reply.replace("a + b", "a - b"), tests)
    assert check_code_many([reply, "```python\nwhile True: pass\n```"], [tests, tests], timeout_s=1.0) == [True, False]
    always = "```python\nclass S:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return S()\n```"
    assert not check_code(always, tests)  # an object equal to everything is not the expected value
    with pytest.raises(UncheckableTests, match="line 1"):
        check_code(reply, "assert add(2, 2) == add(1, 3)")
    assert check_item({"oracle": "code", "tests": tests}, reply)
    assert check_item({"oracle": "math", "answer": "7"}, "3 + 4 = 7.\nThe answer is 7.")
    with pytest.raises(ValueError, match="oracle"):
        check_item({"id": "q1", "oracle": "judge"}, "x")


def test_program_oracle():
    doubling = "```python\nn = int(input())\nprint(n * 2)\n```"
    assert check_program_many([doubling, doubling, "print(1)"], ["4\n", "5\n", ""], ["8", "11", "1\n"]) == [
        True, False, True]
    assert check_item({"oracle": "stdio", "stdin": "21\n", "stdout": "42\n"}, doubling)
    with pytest.raises(ValueError, match="2 completions, 1 stdins"):
        check_program_many([doubling, doubling], ["1"], ["2", "2"])
