"""Small Python exercises with unit tests for the smoke corpora: kept only when they pass in the sandbox.

Each template draws a function name and parameters, and returns the task text, a reference solution, a buggy
variant (for DPO "rejected"), and assert-based tests whose expected values the generator computes itself (here, in
this process), so running the solution text in the sandbox checks it against an independent computation.
"""
from __future__ import annotations

import random
import textwrap

from data.verify.sandbox import run_python_many


def _asserts(func: str, cases: list[tuple[tuple, object]]) -> str:
    return "\n".join(f"assert {func}({', '.join(map(repr, args))}) == {expected!r}" for args, expected in cases)


def _item(func, task, code, buggy, cases):
    return {"func": func, "task": task, "code": textwrap.dedent(code).strip() + "\n",
            "buggy": textwrap.dedent(buggy).strip() + "\n", "tests": _asserts(func, cases)}


def _affine(rng):
    a, b = rng.randint(2, 9), rng.randint(1, 20)
    f = rng.choice(["scale_and_shift", "affine", "linear_map"])
    xs = rng.sample(range(-10, 30), 4)
    return _item(f, f"Write a function `{f}(x)` that returns {a} times `x` plus {b}.",
                 f"def {f}(x):\n    return {a} * x + {b}", f"def {f}(x):\n    return {a} * (x + {b})",
                 [((x,), a * x + b) for x in xs])


def _sum_multiples(rng):
    k = rng.randint(2, 9)
    f = rng.choice(["sum_of_multiples", "multiples_total"])
    ns = [k * rng.randint(2, 12) for _ in range(3)] + [rng.randint(1, 60)]
    return _item(f, f"Write a function `{f}(n)` that returns the sum of all non-negative multiples of {k} "
                    f"that are smaller than `n`.",
                 f"""
                 def {f}(n):
                     total = 0
                     for i in range(n):
                         if i % {k} == 0:
                             total += i
                     return total""",
                 f"""
                 def {f}(n):
                     total = 0
                     for i in range(n + 1):
                         if i % {k} == 0:
                             total += i
                     return total""",
                 [((n,), sum(range(0, n, k))) for n in ns])


def _count_char(rng):
    ch = rng.choice("aeiost")
    f = rng.choice(["count_char", "occurrences"])
    words = ["banana", "statistics", "test", "assessment", "idea", "eerie", "loops", "", "tattoo", "Seattle"]
    return _item(f, f"Write a function `{f}(s)` that returns how many times the letter '{ch}' occurs in the "
                    f"string `s` (lowercase only).",
                 f"def {f}(s):\n    return sum(1 for c in s if c == {ch!r})",
                 f"def {f}(s):\n    return len(s.split({ch!r})) - 2",
                 [((w,), w.count(ch)) for w in rng.sample(words, 5)])


def _reverse_words(rng):
    f = rng.choice(["reverse_words", "backwards_sentence"])
    pool = ["hello world", "the quick brown fox", "a b c", "one", "data beats opinions", "keep it simple"]
    return _item(f, f"Write a function `{f}(s)` that returns the words of `s` in reverse order, separated by "
                    f"single spaces.",
                 f"def {f}(s):\n    return ' '.join(reversed(s.split()))",
                 f"def {f}(s):\n    return s[::-1]",
                 [((s,), " ".join(reversed(s.split()))) for s in rng.sample(pool, 4)])


def _palindrome(rng):
    f = rng.choice(["is_palindrome", "reads_same_backwards"])
    pool = ["Level", "racecar", "python", "Noon", "ab", "x", "Madam", "step"]
    return _item(f, f"Write a function `{f}(s)` that returns True when `s` reads the same backwards, ignoring "
                    f"upper/lower case, and False otherwise.",
                 f"def {f}(s):\n    s = s.lower()\n    return s == s[::-1]",
                 f"def {f}(s):\n    return s == s[::-1]",
                 [((s,), s.lower() == s.lower()[::-1]) for s in rng.sample(pool, 5)])


def _clamp(rng):
    lo = rng.randint(-10, 5)
    hi = lo + rng.randint(3, 20)
    f = rng.choice(["clamp", "limit"])
    xs = [lo - 5, lo, (lo + hi) // 2, hi, hi + 7]
    return _item(f, f"Write a function `{f}(x)` that returns `x` limited to the range [{lo}, {hi}]: values below "
                    f"{lo} become {lo} and values above {hi} become {hi}.",
                 f"def {f}(x):\n    return max({lo}, min({hi}, x))",
                 f"def {f}(x):\n    return min({lo}, max({hi}, x))",
                 [((x,), max(lo, min(hi, x))) for x in xs])


def _running_total(rng):
    f = rng.choice(["running_total", "prefix_sums", "cumulative"])
    lists = [[rng.randint(-5, 9) for _ in range(rng.randint(1, 6))] for _ in range(3)] + [[]]

    def expected(xs):
        out, t = [], 0
        for x in xs:
            t += x
            out.append(t)
        return out
    return _item(f, f"Write a function `{f}(xs)` that returns the list of running totals of the list `xs`.",
                 f"""
                 def {f}(xs):
                     out, total = [], 0
                     for x in xs:
                         total += x
                         out.append(total)
                     return out""",
                 f"""
                 def {f}(xs):
                     out, total = [], 0
                     for x in xs[1:]:
                         total += x
                         out.append(total)
                     return out""",
                 [((xs,), expected(xs)) for xs in lists])


def _digit_sum(rng):
    f = rng.choice(["digit_sum", "sum_of_digits"])
    ns = [rng.randint(0, 99999) for _ in range(4)] + [9]
    return _item(f, f"Write a function `{f}(n)` that returns the sum of the decimal digits of the non-negative "
                    f"integer `n`.",
                 f"def {f}(n):\n    return sum(int(d) for d in str(n))",
                 f"def {f}(n):\n    return n % 9",
                 [((n,), sum(int(d) for d in str(n))) for n in ns])


def _factorial(rng):
    f = rng.choice(["factorial", "fact"])
    ns = sorted(rng.sample(range(0, 12), 4))
    product = [1]
    for i in range(1, 12):
        product.append(product[-1] * i)
    return _item(f, f"Write a function `{f}(n)` that returns n! (the product 1 × 2 × ... × n, and 1 for n = 0).",
                 f"""
                 def {f}(n):
                     result = 1
                     for i in range(2, n + 1):
                         result *= i
                     return result""",
                 f"""
                 def {f}(n):
                     result = 1
                     for i in range(2, n):
                         result *= i
                     return result""",
                 [((n,), product[n]) for n in ns if n] + [((0,), 1)])


def _fibonacci(rng):
    f = rng.choice(["fibonacci", "fib"])
    fib = [0, 1]
    while len(fib) < 25:
        fib.append(fib[-1] + fib[-2])
    ns = sorted(rng.sample(range(2, 25), 4))
    return _item(f, f"Write a function `{f}(n)` that returns the n-th Fibonacci number, with {f}(0) = 0 and "
                    f"{f}(1) = 1.",
                 f"""
                 def {f}(n):
                     a, b = 0, 1
                     for _ in range(n):
                         a, b = b, a + b
                     return a""",
                 f"""
                 def {f}(n):
                     a, b = 1, 1
                     for _ in range(n):
                         a, b = b, a + b
                     return a""",
                 [((n,), fib[n]) for n in ns])


def _is_prime(rng):
    f = rng.choice(["is_prime", "prime"])
    ns = rng.sample([2, 3, 4, 9, 15, 17, 25, 29, 49, 97, 1, 0], 6) + [4]

    def prime(n):
        return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))
    return _item(f, f"Write a function `{f}(n)` that returns True when the integer `n` is a prime number.",
                 f"""
                 def {f}(n):
                     if n < 2:
                         return False
                     d = 2
                     while d * d <= n:
                         if n % d == 0:
                             return False
                         d += 1
                     return True""",
                 f"""
                 def {f}(n):
                     if n < 2:
                         return False
                     for d in range(2, n // 2):
                         if n % d == 0:
                             return False
                     return True""",
                 [((n,), prime(n)) for n in ns])


def _caesar(rng):
    k = rng.randint(1, 25)
    f = rng.choice(["caesar", "shift_letters"])
    pool = ["abc", "xyz", "hello", "zebra", "python", "wrap"]

    def shift(s):
        return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in s)
    return _item(f, f"Write a function `{f}(s)` that shifts every lowercase letter of `s` forward by {k} places "
                    f"in the alphabet, wrapping around from 'z' to 'a'.",
                 f"def {f}(s):\n    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) for c in s)",
                 f"def {f}(s):\n    return ''.join(chr(ord(c) + {k}) for c in s)",
                 [((s,), shift(s)) for s in rng.sample(pool, 4)] + [(("xyz",), shift("xyz"))])


def _unique(rng):
    f = rng.choice(["unique_in_order", "dedupe"])
    lists = [[rng.randint(0, 5) for _ in range(rng.randint(2, 8))] for _ in range(3)] + [[3, 1, 3, 2, 1]]
    return _item(f, f"Write a function `{f}(xs)` that returns the elements of `xs` without duplicates, keeping "
                    f"the order of their first appearance.",
                 f"""
                 def {f}(xs):
                     seen, out = set(), []
                     for x in xs:
                         if x not in seen:
                             seen.add(x)
                             out.append(x)
                     return out""",
                 f"def {f}(xs):\n    return sorted(set(xs))",
                 [((xs,), list(dict.fromkeys(xs))) for xs in lists])


def _second_largest(rng):
    f = rng.choice(["second_largest", "runner_up"])
    lists = [rng.sample(range(-20, 50), rng.randint(2, 7)) for _ in range(3)] + [[5, 1, 5, 3]]
    return _item(f, f"Write a function `{f}(xs)` that returns the second largest distinct value in the list `xs` "
                    f"(which has at least two distinct values).",
                 f"def {f}(xs):\n    return sorted(set(xs))[-2]",
                 f"def {f}(xs):\n    return sorted(xs)[-2]",
                 [((xs,), sorted(set(xs))[-2]) for xs in lists])


def _count_vowels(rng):
    f = rng.choice(["count_vowels", "vowel_count"])
    pool = ["Education", "rhythm", "AEIOU", "banana split", "", "Queue"]
    return _item(f, f"Write a function `{f}(s)` that returns the number of vowels (a, e, i, o, u, in either case) "
                    f"in `s`.",
                 f"def {f}(s):\n    return sum(1 for c in s.lower() if c in 'aeiou')",
                 f"def {f}(s):\n    return sum(1 for c in s if c in 'aeiou')",
                 [((s,), sum(c in "aeiou" for c in s.lower())) for s in rng.sample(pool, 5)])


def _chunk(rng):
    k = rng.randint(2, 4)
    f = rng.choice(["chunk", "split_into_groups"])
    lists = [list(range(rng.randint(0, 9))) for _ in range(3)]
    return _item(f, f"Write a function `{f}(xs)` that splits the list `xs` into consecutive groups of {k} items; "
                    f"the last group may be shorter.",
                 f"def {f}(xs):\n    return [xs[i:i + {k}] for i in range(0, len(xs), {k})]",
                 f"def {f}(xs):\n    return [xs[i:i + {k}] for i in range(0, len(xs) - {k}, {k})]",
                 [((xs,), [xs[i:i + k] for i in range(0, len(xs), k)]) for xs in lists] + [(([1, 2, 3, 4, 5],),
                  [[1, 2, 3, 4, 5][i:i + k] for i in range(0, 5, k)])])


TEMPLATES = [_affine, _sum_multiples, _count_char, _reverse_words, _palindrome, _clamp, _running_total, _digit_sum,
             _factorial, _fibonacci, _is_prime, _caesar, _unique, _second_largest, _count_vowels, _chunk]


def make_code_item(rng: random.Random) -> dict:
    """One exercise: func, task, code (reference solution), buggy (flawed variant), tests (asserts)."""
    template = rng.choice(TEMPLATES)
    item = template(rng)
    item["kind"] = template.__name__.lstrip("_")
    return item


def filter_code_items(items: list[dict], timeout_s: float = 5.0, memory_mb: int = 256) -> list[dict]:
    """Keep the items whose code passes its tests in the sandbox; mark on each kept item whether its buggy variant
    fails them (`buggy_fails`), so only genuinely flawed variants become DPO "rejected" answers."""
    runs = [(it["code"], it["tests"]) for it in items] + [(it["buggy"], it["tests"]) for it in items]
    results = run_python_many(runs, timeout_s=timeout_s, memory_mb=memory_mb)
    kept = []
    for i, item in enumerate(items):
        if results[i].passed:
            kept.append({**item, "buggy_fails": not results[len(items) + i].passed})
    return kept
