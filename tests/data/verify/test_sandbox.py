"""The sandboxed code oracle (data.verify.sandbox) and the answer oracles (data.verify.answers) that PTS and evals use."""
import os
import socket
import time
from fractions import Fraction

import pytest

from data.verify.answers import (check_answer, check_choice, check_code, check_code_many, check_item, extract_answer,
                          extract_choice, extract_code, normalize_answer, parse_number)
from data.verify.sandbox import network_isolation, run_python, run_python_many

ADD = "def add(a, b):\n    return a + b\n"


def test_pass_fail_syntax_and_exception_statuses():
    results = run_python_many([
        (ADD, "assert add(2, 3) == 5\nprint('ran')"),
        (ADD, "assert add(2, 3) == 6"),
        ("def add(a, b:\n    return a\n", "assert add(1, 1) == 2"),
        ("def add(a, b):\n    return a + undefined_name\n", "assert add(1, 1) == 2"),
    ], timeout_s=5.0)
    assert [r.status for r in results] == ["passed", "failed", "error", "failed"]
    assert [r.passed for r in results] == [True, False, False, False]
    assert results[0].stdout == "ran\n"
    assert "AssertionError" in results[1].stderr
    assert "SyntaxError" in results[2].stderr
    assert "NameError" in results[3].stderr


def test_infinite_loops_are_killed_within_the_limit():
    start = time.monotonic()
    busy, sleepy = run_python_many([("while True:\n    pass\n", "pass"),
                                    ("import time\nwhile True:\n    time.sleep(0.05)\n", "pass")], timeout_s=1.0)
    assert busy.status == "timeout" and not busy.passed
    assert sleepy.status == "timeout" and not sleepy.passed  # wall clock, not only CPU time
    assert busy.duration_s < 3.0 and sleepy.duration_s < 3.0
    assert time.monotonic() - start < 10.0


def test_memory_bombs_are_stopped():
    results = run_python_many([("x = bytearray(4 * 1024 ** 3)\n", "pass"),
                               ("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n", "pass")],
                              timeout_s=10.0, memory_mb=256)
    for r in results:
        assert r.status == "memory" and not r.passed, r
        assert r.duration_s < 10.0


@pytest.mark.parametrize("isolate_network", [True, False])
def test_sockets_and_processes_are_refused(isolate_network):
    results = run_python_many([
        ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n", "pass"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "pass"),
        ("import os\nos.system('true')\n", "pass"),
        ("import subprocess\n", "pass"),
        ("import ctypes\n", "pass"),
    ], isolate_network=isolate_network)
    assert [r.status for r in results] == ["failed"] * 5
    assert "PermissionError" in results[0].stderr and "ImportError" in results[3].stderr


def test_network_namespace_stops_a_preamble_bypass():
    """Code that digs out the real socket type still cannot reach a server on this machine's loopback."""
    if network_isolation() == "preamble":
        pytest.skip("no network namespace on this machine (unshare -n / -rn unavailable): preamble only")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    code = ("import _socket\n"
            "real = [c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket'][0]\n"
            f"s = real(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n")
    try:
        result = run_python(code, "pass", timeout_s=5.0)
    finally:
        server.close()
    assert result.status == "failed" and "OSError" in result.stderr, result


def test_exit_before_tests_and_sys_exit_do_not_pass():
    results = run_python_many([("import os\nos._exit(0)\n", "assert False"),
                               ("import sys\nsys.exit(0)\n", "pass")])
    assert [r.passed for r in results] == [False, False]
    assert results[0].returncode == 0  # it did exit 0: only the missing completion proof fails it


def test_items_do_not_share_state_and_run_in_a_temp_dir():
    results = run_python_many([
        ("import builtins\nbuiltins.len = lambda x: 0\nopen('note.txt', 'w').write('x')\n", "assert len([1]) == 0"),
        ("", "assert len([1, 2]) == 2"),
        ("import os\ncwd = os.getcwd()\n", f"assert not cwd.startswith({os.getcwd()!r})\nimport tempfile\n"
                                           "assert cwd.startswith(tempfile.gettempdir())"),
    ])
    assert [r.status for r in results] == ["passed"] * 3


def test_output_is_capped():
    r = run_python("while True:\n    print('x' * 1000)\n", "pass", max_output_bytes=20_000)
    assert not r.passed and len(r.stdout) <= 20_000


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python(ADD, "pass", timeout_s=0)
    with pytest.raises(TypeError, match="item 0"):
        run_python_many([(ADD,)])


# ---- answers ----

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
    assert check_item({"oracle": "code", "tests": tests}, reply)
    assert check_item({"oracle": "math", "answer": "7"}, "3 + 4 = 7.\nThe answer is 7.")
    with pytest.raises(ValueError, match="oracle"):
        check_item({"id": "q1", "oracle": "judge"}, "x")
