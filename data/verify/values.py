"""The values that leave the sandbox: type-tagged JSON, decoded here into plain builtin values.

The encoder is in `data/verify/sandbox_runner.py` (it runs inside the sandbox, which sees no repository). Each
value is a JSON list whose first item is a tag:

    ["N"] None   ["B", true] bool   ["I", "12"] int (decimal text)   ["F", "0.5"] float (repr, also nan/inf)
    ["C", "1.0", "-2.0"] complex   ["S", "text"] str   ["Y", "00ff"] bytes (hex)
    ["L", [...]] list   ["T", [...]] tuple   ["D", [[k, v], ...]] dict   ["E", [...]] set   ["Z", [...]] frozenset
    ["?", "TypeName"] a value of any other type (it cannot be compared here, so its check fails)

Subclasses of these types travel as their base type (a namedtuple as a tuple, a Counter as a dict): whatever their
methods claim, only the base value is compared, so an object whose `__eq__` always returns True gains nothing.
"""
from __future__ import annotations

_MAX_DEPTH = 100


class Unencodable:
    """Stands for a value the sandbox could not send (its type name is kept for messages); equal to nothing."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<unsendable {self.type_name}>"

    def _refuse(self, *args):
        raise TypeError(f"the tested code returned a {self.type_name}, which cannot leave the sandbox (only None, "
                        f"bool, int, float, complex, str, bytes, list, tuple, dict, set and frozenset can)")

    __bool__ = __str__ = _refuse  # `assert f(x)` or `str(f(x)) == ...` must not pass on such a value


def decode(data, depth: int = 0):
    """Plain value of one tagged JSON value; ValueError when it is malformed."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError(f"not a tagged value: {str(data)[:80]}")
    tag, rest = data[0], data[1:]

    def one(kind):
        if len(rest) != 1 or not isinstance(rest[0], kind):
            raise ValueError(f"bad {tag!r} value")
        return rest[0]

    if tag == "N" and not rest:
        return None
    if tag == "B":
        return one(bool)
    if tag == "I":
        return int(one(str))
    if tag == "F":
        return float(one(str))
    if tag == "C" and len(rest) == 2 and all(isinstance(x, str) for x in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag == "S":
        return one(str)
    if tag == "Y":
        return bytes.fromhex(one(str))
    if tag in ("L", "T", "E", "Z"):
        items = [decode(x, depth + 1) for x in one(list)]
        kind = {"L": list, "T": tuple, "E": set, "Z": frozenset}[tag]
        try:
            return kind(items)
        except TypeError:  # an unhashable element of a set
            raise ValueError("unhashable set element") from None
    if tag == "D":
        out = {}
        for pair in one(list):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError("bad dict item")
            key = decode(pair[0], depth + 1)
            try:
                out[key] = decode(pair[1], depth + 1)
            except TypeError:
                raise ValueError("unhashable dict key") from None
        return out
    if tag == "?":
        return Unencodable(one(str))
    raise ValueError(f"unknown value tag {tag!r}")


def canonical(value):
    """A hashable key equal for two values exactly when the checks call them equal: Python's == on builtin values,
    except that a bool equals only a bool (True != 1, False != 0)."""
    if value is None or isinstance(value, (str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float, complex)):
        return ("number", value)  # 2 == 2.0 == 2+0j, as in Python
    if isinstance(value, list):
        return ("list", tuple(canonical(v) for v in value))
    if isinstance(value, tuple):
        return ("tuple", tuple(canonical(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(canonical(v) for v in value))
    if isinstance(value, dict):
        return ("dict", frozenset((canonical(k), canonical(v)) for k, v in value.items()))
    if isinstance(value, type):
        return ("type", value)
    return ("object", id(value))  # Unencodable: equal only to itself
