"""Verifiable maths exercises for the smoke corpora: arithmetic and algebra word problems with worked solutions.

Every solution is computed step by step with exact fractions (`Calc`), and every item carries `check`, an
independent restatement of the problem as a Python boolean expression with the answer substituted
("3*(5) + 4 == 19"); `verify_math_item` evaluates it with a small safe evaluator. A flawed solution (for DPO
"rejected") replays the same steps with one arithmetic slip that propagates to a wrong final answer.
Difficulty levels: 0 single-digit sums (a tiny model learns these in minutes) up to 3 multi-step problems.
"""
from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction

from data.verify.answers import check_answer

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Ema", "Farid", "Gus", "Hana", "Ivo", "Jun", "Kira", "Leo", "Maya", "Nia",
         "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara"]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cards", "shells", "coins", "stamps", "buttons"]
GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"), ("sandwich", "sandwiches"),
         ("plant", "plants"), ("ball", "balls")]
SYMBOLS = {"+": "+", "-": "-", "*": "×", "/": "÷"}
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def fmt(value: Fraction | int) -> str:
    """An exact value as the answer text: '7', '-3', '5/6'."""
    return str(Fraction(value))


class Calc:
    """Records arithmetic steps as text; with `slip_at` set, that step's result is off by `slip` (a flawed
    solution that stays internally consistent afterwards)."""

    def __init__(self, slip_at: int | None = None, slip: int = 0):
        self.steps: list[str] = []
        self.count = 0
        self.slip_at, self.slip = slip_at, slip

    def op(self, a, sym: str, b, say: str = "{a} {s} {b} = {r}.") -> Fraction:
        r = _OPS[sym](Fraction(a), Fraction(b))
        if self.count == self.slip_at:
            r += self.slip
        self.count += 1
        self.steps.append(say.format(a=fmt(a), b=fmt(b), s=SYMBOLS[sym], r=fmt(r)))
        return r

    def say(self, text: str) -> None:
        self.steps.append(text)


# Each template draws its numbers from `rng` and returns (question, solve, check): solve(calc) -> answer writes the
# steps; check(answer_text) -> a boolean expression that is True exactly when the answer solves the problem, with
# the answer appearing once, as "(answer)".

def _add_single(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", lambda c: c.op(a, "+", b), lambda x: f"{a} + {b} == ({x})"


def _sub_single(rng):
    a = rng.randint(1, 9)
    b = rng.randint(0, a)
    return f"What is {a} - {b}?", lambda c: c.op(a, "-", b), lambda x: f"{a} - {b} == ({x})"


def _add_two_digit(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", lambda c: c.op(a, "+", b), lambda x: f"{a} + {b} == ({x})"


def _times_table(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} × {b}?", lambda c: c.op(a, "*", b), lambda x: f"{a} * {b} == ({x})"


def _word_gain(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    q = f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?"
    return q, lambda c: c.op(a, "+", b, f"{name} starts with {{a}} and gets {{b}} more: {{a}} + {{b}} = {{r}}."), \
        lambda x: f"{a} + {b} == ({x})"


def _word_loss(rng):
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(5, 40)
    b = rng.randint(1, a - 1)
    q = f"{name} had {a} {thing} and gave {b} of them to a friend. How many {thing} does {name} have left?"
    return q, lambda c: c.op(a, "-", b, f"{name} gives away {{b}} of {{a}}: {{a}} - {{b}} = {{r}}."), \
        lambda x: f"{a} - {b} == ({x})"


def _word_change(rng):
    name, (one, many) = rng.choice(NAMES), rng.choice(GOODS)
    n, price = rng.randint(2, 9), rng.randint(2, 12)
    bill = rng.choice([b for b in (20, 50, 100, 200) if b >= n * price])
    q = (f"A shop sells one {one} for ${price}. {name} buys {n} {many} and pays with a ${bill} bill. "
         f"How many dollars of change does {name} get?")

    def solve(c):
        cost = c.op(n, "*", price, "The cost is {a} × {b} = {r} dollars.")
        return c.op(bill, "-", cost, "The change is {a} - {b} = {r} dollars.")
    return q, solve, lambda x: f"{bill} - {n} * {price} == ({x})"


def _linear(rng):
    a, x, b = rng.randint(2, 9), rng.randint(-5, 12), rng.randint(1, 20)
    rhs = a * x + b
    q = f"Solve for x: {a}x + {b} = {rhs}."

    def solve(c):
        ax = c.op(rhs, "-", b, "Subtract {b} from both sides: " + f"{a}x" + " = {a} - {b} = {r}.")
        return c.op(ax, "/", a, "Divide both sides by {b}: x = {a} ÷ {b} = {r}.")
    return q, solve, lambda v: f"{a} * ({v}) + {b} == {rhs}"


def _linear_paren(rng):
    a, x, b = rng.randint(2, 6), rng.randint(-4, 10), rng.randint(1, 9)
    rhs = a * (x + b)
    q = f"Solve for x: {a}(x + {b}) = {rhs}."

    def solve(c):
        inner = c.op(rhs, "/", a, "Divide both sides by {b}: x + " + f"{b}" + " = {a} ÷ {b} = {r}.")
        return c.op(inner, "-", b, "Subtract {b}: x = {a} - {b} = {r}.")
    return q, solve, lambda v: f"{a} * (({v}) + {b}) == {rhs}"


def _fraction_add(rng):
    b, d = rng.randint(2, 9), rng.randint(2, 9)
    a, c_ = rng.randint(1, b - 1), rng.randint(1, d - 1)
    q = f"What is {a}/{b} + {c_}/{d}? Give the answer as a fraction in lowest terms."

    def solve(c):
        den = b * d
        left = c.op(a, "*", d, f"Write {a}/{b} over the common denominator {den}: " + "{a} × {b} = {r}, so "
                    + f"{a}/{b} = " + "{r}/" + f"{den}.")
        right = c.op(c_, "*", b, f"Write {c_}/{d} over {den}: " + "{a} × {b} = {r}, so " + f"{c_}/{d} = "
                     + "{r}/" + f"{den}.")
        total = c.op(left, "+", right, "Add the numerators: {a} + {b} = {r}.")
        return c.op(total, "/", den, "Simplify {a}/{b} = {r}.")
    return q, solve, lambda v: f"{a}/{b} + {c_}/{d} == ({v})"


def _percent(rng):
    p = rng.choice([10, 20, 25, 50, 75])
    n = rng.randint(1, 20) * 20
    q = f"What is {p}% of {n}?"

    def solve(c):
        scaled = c.op(n, "*", p, "Multiply: {a} × {b} = {r}.")
        return c.op(scaled, "/", 100, "Divide by 100: {a} ÷ {b} = {r}.")
    return q, solve, lambda v: f"{p} * {n} / 100 == ({v})"


def _rectangle(rng):
    w, h = rng.randint(2, 20), rng.randint(2, 20)
    q = f"A rectangle is {w} cm wide and {h} cm tall. What is its perimeter in cm?"

    def solve(c):
        s = c.op(w, "+", h, "Width plus height is {a} + {b} = {r}.")
        return c.op(2, "*", s, "The perimeter is {a} × {b} = {r} cm.")
    return q, solve, lambda v: f"2 * ({w} + {h}) == ({v})"


def _average(rng):
    k = rng.randint(3, 5)
    xs = [rng.randint(1, 30) for _ in range(k - 1)]
    low = sum(xs) // k + 1
    xs.append(k * rng.randint(low, low + 15) - sum(xs))  # a positive last value that makes the mean whole
    q = f"What is the average of {', '.join(map(str, xs[:-1]))} and {xs[-1]}?"

    def solve(c):
        total = xs[0]
        for x in xs[1:]:
            total = c.op(total, "+", x)
        return c.op(total, "/", k, "Divide the sum {a} by the count {b}: {r}.")
    return q, solve, lambda v: f"({' + '.join(map(str, xs))}) / {k} == ({v})"


def _sequence(rng):
    a, d, n = rng.randint(1, 20), rng.randint(2, 9), rng.randint(5, 15)
    q = f"An arithmetic sequence starts at {a} and increases by {d} each time. What is term number {n}?"

    def solve(c):
        steps = c.op(n, "-", 1, "Term {a} is {r} steps after the first term ({a} - {b} = {r}).")
        grow = c.op(steps, "*", d, "Those steps add {a} × {b} = {r}.")
        return c.op(a, "+", grow, "The term is {a} + {b} = {r}.")
    return q, solve, lambda v: f"{a} + ({n} - 1) * {d} == ({v})"


def _speed(rng):
    speed, hours = rng.randint(3, 90), rng.randint(2, 8)
    extra = rng.randint(1, 50)
    q = (f"A cyclist rides at {speed} km per hour for {hours} hours, then rides {extra} km more. "
         f"How many km did the cyclist ride in total?")

    def solve(c):
        first = c.op(speed, "*", hours, "In {b} hours at {a} km per hour the cyclist rides {a} × {b} = {r} km.")
        return c.op(first, "+", extra, "Adding the last part: {a} + {b} = {r} km.")
    return q, solve, lambda v: f"{speed} * {hours} + {extra} == ({v})"


LEVELS = {
    0: [_add_single, _sub_single],
    1: [_add_two_digit, _times_table, _word_gain, _word_loss],
    2: [_word_change, _linear, _fraction_add, _percent, _rectangle],
    3: [_linear_paren, _average, _sequence, _speed],
}


def solution_text(steps: list[str], answer: str) -> str:
    return "\n".join(steps + [f"The answer is {answer}."])


def make_math_item(rng: random.Random, level: int) -> dict:
    """One exercise: question, worked solution, answer, check expression, and a flawed solution + its answer."""
    template = rng.choice(LEVELS[level])
    question, solve, check = template(rng)
    calc = Calc()
    answer = fmt(solve(calc))
    slip = rng.choice([-3, -2, -1, 1, 2, 3])
    flawed = Calc(slip_at=rng.randrange(calc.count), slip=slip)
    wrong = fmt(solve(flawed))
    return {"kind": template.__name__.lstrip("_"), "level": level, "question": question,
            "solution": solution_text(calc.steps, answer), "answer": answer, "check": check(answer),
            "flawed_solution": solution_text(flawed.steps, wrong), "flawed_answer": wrong}


def verify_math_item(item: dict) -> bool:
    """The answer solves the problem (independent check), the solution states it, the flawed one does not."""
    return (safe_eval(item["check"]) is True and check_answer(item["solution"], item["answer"])
            and not check_answer(item["flawed_solution"], item["answer"]))


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expression: str):
    """Evaluate an arithmetic/comparison expression over exact fractions; anything else raises ValueError."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
            return ev(node.left) == ev(node.comparators[0])
        raise ValueError(f"unsupported expression element {ast.dump(node)[:60]} in {expression!r}")
    return ev(ast.parse(expression, mode="eval"))
