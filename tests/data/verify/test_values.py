"""Type-tagged values: the sandbox runner's encoder and data.verify.values' decoder agree, and bad input is refused."""
import math
from collections import Counter, namedtuple
from pathlib import Path

import pytest

from data.verify.values import Unencodable, canonical, decode


@pytest.fixture(scope="module")
def encode():
    """The runner's own encoder (the runner is a script run inside the sandbox: load its functions without main)."""
    source = (Path(__file__).parents[3] / "data" / "verify" / "sandbox_runner.py").read_text()
    namespace = {"__name__": "runner_under_test"}
    exec(compile(source.replace("\nmain()\n", "\n"), "sandbox_runner.py", "exec"), namespace)
    return namespace["encode"]


@pytest.mark.parametrize("value", [None, True, False, 0, -7, 10 ** 40, 0.1, -0.0, math.inf, 1 + 2j, "",
                                   "héllo\n\udc80", b"\x00\xff", [1, [2, (3,)]], (), {"a": {1: None}, (1, 2): [True]},
                                   {1, "x"}, frozenset({(1, 2)})])
def test_round_trip(encode, value):
    back = decode(encode(value))
    assert canonical(back) == canonical(value) and type(back) is type(value)


def test_subclasses_travel_as_their_base_value(encode):
    class AlwaysEqual(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    assert decode(encode(AlwaysEqual(3))) == 3 and type(decode(encode(AlwaysEqual(3)))) is int
    point = namedtuple("Point", "x y")(1, 2)
    assert decode(encode(point)) == (1, 2) and decode(encode(Counter("aab"))) == {"a": 2, "b": 1}


def test_other_objects_become_unencodable(encode):
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    back = decode(encode(AlwaysEqual()))
    assert isinstance(back, Unencodable) and back.type_name == "AlwaysEqual"
    assert canonical(back) != canonical(5)
    with pytest.raises(TypeError, match="cannot leave the sandbox"):
        bool(back)
    nested = []
    for _ in range(200):
        nested = [nested]
    assert "nested too deeply" in str(encode(nested))


def test_nan_equals_nothing_and_bool_is_not_a_number():
    assert canonical(float("nan")) != canonical(float("nan"))  # (decoded values are never the same object)
    assert canonical(True) != canonical(1) and canonical(2) == canonical(2.0)
    assert canonical([1, 2]) != canonical((1, 2)) and canonical({1}) == canonical(frozenset({1}))


@pytest.mark.parametrize("data", [5, [], ["Q"], ["I", 5], ["B", 1], ["L", 5], ["D", [[["L", []], ["N"]]]],
                                  ["E", [["L", []]]], ["N", 1], ["I", "1" * 5000]])
def test_malformed_values_are_refused(data):
    with pytest.raises(ValueError):
        decode(data)
