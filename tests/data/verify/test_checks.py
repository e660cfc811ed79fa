"""Test suites split into probes (evaluated in the sandbox) and an outside part (evaluated here): data.verify.checks."""
import math

import pytest

from data.verify.checks import UncheckableTests, parse_tests, verdict


def judge(tests: str, *probe_values) -> list[bool]:
    """Verdicts of each check of `tests` given the values its probes would return, in order."""
    plan = parse_tests(tests)
    values = iter(probe_values)
    return [verdict(c, [next(values) for _ in c.probes])[0] for c in plan.checks]


def test_probes_are_the_code_under_test_and_expected_values_stay_outside():
    plan = parse_tests("import math\nxs = [3, 1]\nassert add(2, 3) == 5\nassert abs(area(2) - 12.57) < 0.01\n"
                       "assert sorted(f(xs)) == [1, 3]\nassert is_prime(7)\nassert not is_prime(8)\n")
    assert [c.probes for c in plan.checks] == [("add(2, 3)",), ("area(2)",), ("f(xs)",), ("is_prime(7)",),
                                               ("is_prime(8)",)]
    inside = " ".join(str(s[1]) for s in plan.steps).replace("add(2, 3)", "").replace("area(2)", "")
    for expected in ("5", "12.57", "0.01", "1, 3"):
        assert expected not in inside  # never sent in
    assert [s[0] for s in plan.steps] == ["exec", "exec", "probe", "probe", "probe", "probe", "probe"]
    assert [s[2] for s in plan.steps] == [1, 2, 3, 4, 5, 6, 7]  # line numbers for messages and tracebacks


def test_equality_is_strict_about_bools_and_sequence_types():
    assert judge("assert f() == 5", 5) == [True]
    assert judge("assert f() == 5", 5.0) == [True]  # 5 == 5.0, as in Python
    assert judge("assert f() == 1", True) == [False]  # but a bool is not a number
    assert judge("assert f() == True", 1) == [False]
    assert judge("assert f() == [1, 2]", (1, 2)) == [False]  # a tuple is not a list, as in Python
    assert judge("assert f() == {'a': [1, True]}", {"a": [1, True]}) == [True]
    assert judge("assert f() == {'a': [1, True]}", {"a": [1, 1]}) == [False]
    assert judge("assert f() == {1, 2}", frozenset({1, 2})) == [True]
    assert judge("assert f() != 3", 4) == [True] and judge("assert f() != 3", 3) == [False]
    assert judge("assert f() == float('nan')", math.nan) == [False]


def test_outside_operators_and_pure_builtins():
    assert judge("assert abs(f(2) - 12.57) < 0.01", 12.566) == [True]
    assert judge("assert math.isclose(f(1), math.pi, rel_tol=1e-6)", 3.14159265) == [True]
    assert judge("assert 0 < f() <= 10", 10) == [True] and judge("assert 0 < f() <= 10", 11) == [False]
    assert judge("assert 3 in f()", [1, 2, 3]) == [True] and judge("assert 1 in f()", [True]) == [False]
    assert judge("assert f() is None", None) == [True] and judge("assert f() is not None", 0) == [True]
    assert judge("assert isinstance(f(), int) and f() > 2", 3, 3) == [True]
    assert judge("assert type(f()) == list", (1,)) == [False]
    assert judge("assert len(f()) == 2 or g()", [1], True) == [True]
    assert judge("assert f()", [0]) == [True] and judge("assert f()", []) == [False]  # truthiness of plain values
    assert judge("assert not f()", "") == [True]
    assert judge("assert f() * 3 == 'ababab'", "ab") == [True]


def test_a_value_that_could_not_leave_the_sandbox_fails_every_check():
    from data.verify.values import Unencodable
    odd = Unencodable("AlwaysEqual")
    assert judge("assert f() == 5", odd) == [False]
    assert judge("assert f()", odd) == [False]
    assert judge("assert not f()", odd) == [False]
    assert judge("assert str(f()) == '<unsendable AlwaysEqual>'", odd) == [False]
    assert judge("assert f() != 5", odd) == [True]  # not equal to 5 indeed, and it says nothing about passing


def test_oversized_outside_work_fails_instead_of_hanging():
    assert judge("assert 2 ** f() > 0", 10 ** 9) == [False]
    assert judge("assert f() * 10 ** 8 == ''", "abc") == [False]
    plan = parse_tests("assert f() < 3")
    ok, reason = verdict(plan.checks[0], ["a"])
    assert not ok and "TypeError" in reason and "line 1" in reason


@pytest.mark.parametrize("tests, message", [
    ("for x in range(3):\n    assert f(x) == x", "line 2: this assert is inside a For"),
    ("def check(candidate):\n    assert candidate(1) == 2", "line 2: this assert is inside a FunctionDef"),
    ("assert f(1) == g(1)", "line 1: both sides"),
    ("x = 1\nassert f(x) == [1, x]", "line 2: both sides"),
    ("assert f() is g()", "line 1: `is` compares identity"),
    ("assert f() is 0.0", "line 1: `is` compares identity"),
    ("assert math.isclose(f(), g())", "line 1: math.isclose"),
    ("print(f(1))", "no top-level assert"),
    ("assert f(1) ==", "not valid Python"),
])
def test_suites_that_cannot_be_judged_outside_are_refused(tests, message):
    with pytest.raises(UncheckableTests, match=message.replace("(", r"\(")):
        parse_tests(tests)


def test_failure_reasons_name_the_line_and_the_value():
    plan = parse_tests("x = 1\nassert add(2, 3) == 5")
    ok, reason = verdict(plan.checks[0], [6])
    assert not ok and reason == "tests.py line 2: assert add(2, 3) == 5 failed (add(2, 3) = 6)"
