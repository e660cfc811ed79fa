"""Unit tests turned into checks whose verdict is decided outside the sandbox.

A test suite is Python source of top-level statements. Each top-level `assert TEST` becomes a check; every other
top-level statement (imports, assignments, helper definitions) is setup that runs inside the sandbox, in order,
between the checks. A check's TEST is split into an outside part and probes:

- the outside part is made of literals, comparisons (`==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `not in`, and
  `is` / `is not` against None/True/False), `and` / `or` / `not`, arithmetic, the builtin type names and calls to a
  few pure builtins (`PURE_CALLS`: abs, len, sorted, set, math.isclose, ...);
- a probe is any other subexpression (a call of the function under test, a name, an attribute, a subscript). Only
  the probe expressions enter the sandbox; their values come back as plain builtin values (`data.verify.values`)
  and the outside part is evaluated here, on those values. Expected values never enter the sandbox.

So `assert add(2, 3) == 5` sends `add(2, 3)` in and compares with 5 here; `assert abs(area(2) - 12.57) < 0.01`
sends `area(2)`. A comparison must have a side without probes (`assert f(x) == g(x)` is refused: code that makes
both sides equal would pass). `assert EXPR` passes when EXPR's value is truthy, `assert not EXPR` when it is falsy.
Equality is Python's on builtin values, except that a bool equals only a bool (`True != 1`); a list never equals a
tuple (as in Python). An assert nested in a loop, `if`, `with` or function cannot be split and is refused, as is a
suite without any top-level assert, with the line named.
"""
from __future__ import annotations

import ast
import functools
import math
import operator
from dataclasses import dataclass

from data.verify.values import canonical

TYPE_NAMES = {t.__name__: t for t in (int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset)}
PURE_CALLS = {"abs": abs, "len": len, "round": round, "sorted": sorted, "set": set, "frozenset": frozenset,
              "list": list, "tuple": tuple, "sum": sum, "min": min, "max": max, "all": all, "any": any, "int": int,
              "float": float, "str": str, "bool": bool, "type": type, "isinstance": isinstance,
              "math.isclose": math.isclose, "math.sqrt": math.sqrt, "math.floor": math.floor,
              "math.ceil": math.ceil, "math.isnan": math.isnan, "math.isinf": math.isinf}
PURE_CONSTANTS = {"math.pi": math.pi, "math.e": math.e, "math.inf": math.inf, "math.nan": math.nan,
                  "math.tau": math.tau}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_ORDER = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_MAX_OUTSIDE_ITEMS = 10 ** 7  # a sequence repeated or a power computed here stays below this size


class UncheckableTests(ValueError):
    """A test suite that cannot be checked outside the sandbox; the message names the line."""


@dataclass(frozen=True)
class Check:
    lineno: int
    source: str  # the assert's test expression, for messages
    tree: ast.expr  # the outside part; probes are ast.Name nodes named _probe_<k>
    probes: tuple[str, ...]  # expressions evaluated inside the sandbox, in this order


@dataclass(frozen=True)
class CheckPlan:
    steps: tuple[tuple, ...]  # ("exec", source, lineno) or ("probe", (expr, ...), lineno), in test order
    checks: tuple[Check, ...]  # one per "probe" step, same order


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return None


class _Splitter:
    """Rebuilds a test expression with every probe subtree replaced by a placeholder name."""

    def __init__(self, lineno: int):
        self.lineno, self.probes = lineno, []

    def probe(self, node: ast.expr) -> ast.expr:
        self.probes.append(ast.unparse(node))
        return ast.Name(id=f"_probe_{len(self.probes) - 1}", ctx=ast.Load())

    def split(self, node: ast.expr) -> ast.expr:
        if isinstance(node, ast.Constant):
            return node
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return type(node)(elts=[self.split(e) for e in node.elts], **({"ctx": ast.Load()}
                                                                          if not isinstance(node, ast.Set) else {}))
        if isinstance(node, ast.Dict) and None not in node.keys:
            return ast.Dict(keys=[self.split(k) for k in node.keys], values=[self.split(v) for v in node.values])
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[self.split(v) for v in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            return ast.UnaryOp(op=node.op, operand=self.split(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return ast.BinOp(left=self.split(node.left), op=node.op, right=self.split(node.right))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        name = _dotted(node)
        if name in TYPE_NAMES or name in PURE_CONSTANTS:
            return node
        if isinstance(node, ast.Call) and _dotted(node.func) in PURE_CALLS and not any(
                isinstance(a, ast.Starred) for a in node.args) and all(k.arg for k in node.keywords):
            args = [self.split(a) for a in node.args]
            keywords = [ast.keyword(arg=k.arg, value=self.split(k.value)) for k in node.keywords]
            if _dotted(node.func) == "math.isclose" and len(args) >= 2 and all(_has_probe(a) for a in args[:2]):
                raise UncheckableTests(f"line {self.lineno}: math.isclose compares two values computed in the "
                                      f"sandbox; one side must be a literal")
            return ast.Call(func=node.func, args=args, keywords=keywords)
        return self.probe(node)

    def compare(self, node: ast.Compare) -> ast.expr:
        operands = [self.split(node.left)] + [self.split(c) for c in node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:]):
            if isinstance(op, (ast.Is, ast.IsNot)) and not any(
                    isinstance(x, ast.Constant) and (x.value is None or x.value is True or x.value is False)
                    for x in (left, right)):
                raise UncheckableTests(f"line {self.lineno}: `is` compares identity; only `is None`, `is True` and "
                                      f"`is False` can be checked outside the sandbox")
            if _has_probe(left) and _has_probe(right):
                raise UncheckableTests(f"line {self.lineno}: both sides of {ast.unparse(node)!r} are computed in the "
                                      f"sandbox; the expected side must be a literal")
        return ast.Compare(left=operands[0], ops=node.ops, comparators=operands[1:])


def _has_probe(node: ast.expr) -> bool:
    return any(isinstance(n, ast.Name) and n.id.startswith("_probe_") for n in ast.walk(node))


def _nested_assert(stmt: ast.stmt) -> ast.Assert | None:
    for node in ast.walk(stmt):
        if isinstance(node, ast.Assert):
            return node
    return None


@functools.lru_cache(maxsize=4096)
def parse_tests(source: str) -> CheckPlan:
    """The checks and setup steps of a test suite; UncheckableTests (naming the line) when it cannot be split."""
    try:
        module = ast.parse(source, "tests.py")
    except SyntaxError as e:
        raise UncheckableTests(f"line {e.lineno}: the tests are not valid Python ({e.msg})") from None
    steps, checks = [], []
    for stmt in module.body:
        if isinstance(stmt, ast.Assert):
            splitter = _Splitter(stmt.lineno)
            tree = splitter.split(stmt.test)
            checks.append(Check(stmt.lineno, ast.unparse(stmt.test), tree, tuple(splitter.probes)))
            steps.append(("probe", tuple(splitter.probes), stmt.lineno))
            continue
        nested = _nested_assert(stmt)
        if nested is not None:
            raise UncheckableTests(f"line {nested.lineno}: this assert is inside a {type(stmt).__name__} statement; "
                                  f"only top-level asserts can be checked outside the sandbox")
        steps.append(("exec", ast.unparse(stmt), stmt.lineno))
    if not checks:
        raise UncheckableTests("line 1: the tests contain no top-level assert, so nothing can be checked outside "
                              "the sandbox; write `assert EXPR == EXPECTED` lines")
    return CheckPlan(tuple(steps), tuple(checks))


def _guard_size(value):
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > _MAX_OUTSIDE_ITEMS:
        raise ValueError(f"a value of {len(value):,} items is too large to check")
    return value


def _binop(op, left, right):
    # The operands may come from the sandbox: refuse what would take minutes or gigabytes here.
    if op is operator.pow and isinstance(right, int) and abs(right) > 10_000:
        raise ValueError("exponent too large to check")
    if op is operator.mul:
        seq, times = (left, right) if isinstance(left, (str, bytes, list, tuple)) else (right, left)
        if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int):
            _guard_size(range(min(len(seq) * max(times, 0), _MAX_OUTSIDE_ITEMS + 1)))
    return _guard_size(op(left, right))


def _equal(a, b) -> bool:
    return canonical(a) == canonical(b)


def _contains(container, item) -> bool:
    if isinstance(container, (str, bytes)):
        return item in container
    if isinstance(container, dict):
        container = container.keys()
    key = canonical(item)
    return any(canonical(x) == key for x in container)


def _compare(op: ast.cmpop, left, right) -> bool:
    if isinstance(op, (ast.Eq, ast.NotEq)):
        return _equal(left, right) == isinstance(op, ast.Eq)
    if isinstance(op, (ast.In, ast.NotIn)):
        return _contains(right, left) == isinstance(op, ast.In)
    if isinstance(op, (ast.Is, ast.IsNot)):
        return (left is right) == isinstance(op, ast.Is)
    return bool(_ORDER[type(op)](left, right))


def _eval(node: ast.expr, probes: list):
    """Evaluate the outside part of a check with the probes' (plain, decoded) values; no user code runs here."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id.startswith("_probe_"):
        return probes[int(node.id[7:])]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](_eval(e, probes) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {_eval(k, probes): _eval(v, probes) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.BoolOp):
        value = None
        for v in node.values:
            value = _eval(v, probes)
            if bool(value) == isinstance(node.op, ast.Or):
                return value
        return value
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, probes)
        return {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}[type(node.op)](value)
    if isinstance(node, ast.BinOp):
        return _binop(_BINOPS[type(node.op)], _eval(node.left, probes), _eval(node.right, probes))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, probes)
        for op, comparator in zip(node.ops, node.comparators):
            right = _eval(comparator, probes)
            if not _compare(op, left, right):
                return False
            left = right
        return True
    name = _dotted(node)
    if name in TYPE_NAMES:
        return TYPE_NAMES[name]
    if name in PURE_CONSTANTS:
        return PURE_CONSTANTS[name]
    if isinstance(node, ast.Call):
        args = [_eval(a, probes) for a in node.args]
        return _guard_size(PURE_CALLS[_dotted(node.func)](*args, **{k.arg: _eval(k.value, probes)
                                                                    for k in node.keywords}))
    raise AssertionError(f"unexpected node {ast.dump(node)} outside the sandbox")  # _Splitter never builds one


def short_repr(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def verdict(check: Check, probe_values: list) -> tuple[bool, str]:
    """(passed, reason) of one check given its probes' decoded values."""
    try:
        ok = bool(_eval(check.tree, probe_values))
    except Exception as e:  # a type mismatch (str < int), a value too large: the check fails
        return False, f"tests.py line {check.lineno}: assert {check.source}: {type(e).__name__}: {e}"
    if ok:
        return True, ""
    got = ", ".join(f"{p} = {short_repr(v)}" for p, v in zip(check.probes, probe_values))
    return False, f"tests.py line {check.lineno}: assert {check.source} failed ({got})"
