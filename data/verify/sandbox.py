"""Run model-written Python against unit tests, or as a program on stdin, and decide the verdict outside the sandbox.

Tests (`assert add(2, 3) == 5` lines) are split by `data.verify.checks` before anything runs: only the candidate's
code and the probe expressions (`add(2, 3)`) enter the sandbox (`data.verify.isolation`), which returns the probes'
values as type-tagged JSON; the expected values never enter it and are compared here. A program's stdout is
compared here with the expected output, ignoring trailing whitespace at line ends and trailing blank lines.
Nothing the code prints, raises, exits with or writes can mark it passed: only values equal to the expected ones.
"""
from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass

from data.verify.checks import CheckPlan, UncheckableTests, parse_tests, verdict
from data.verify.isolation import Limits, SandboxUnavailable, execute, isolation, mode
from data.verify.values import Unencodable, decode

__all__ = ["SandboxResult", "SandboxUnavailable", "UncheckableTests", "isolation", "mode", "run_program_many",
           "run_python", "run_python_many"]


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed (a check or exception) | timeout | memory | error (syntax error, sandbox fault)
    stdout: str
    stderr: str
    duration_s: float
    returncode: int | None = None  # the item's exit code; negative = killed by that signal; None = no record
    reason: str = ""  # why it did not pass, for logs


def _unfinished(record: dict, cpu_limit_s: int) -> tuple[str, str, dict | None]:
    """(status, reason, child result) of a record; status is '' when the item ran to its end."""
    if "broken" in record:
        return ("timeout" if record["timed_out"] else "error"), record["broken"], None
    try:
        result = json.loads(record["result"]) if record["result"] is not None else None
    except (ValueError, RecursionError):  # the item may have written anything there
        result = None
    if not isinstance(result, dict):
        result = None
    rc = record["exit"]
    if record["timed_out"] or rc == -signal.SIGXCPU:
        return "timeout", "the time limit was reached", result
    if record["truncated"]:
        return "failed", "the output went over the limit", result
    if result is None:
        if rc == -signal.SIGKILL:  # the hard CPU limit, or the kernel's OOM killer
            return ("timeout", "killed at the CPU limit", None) if record["cpu_s"] >= cpu_limit_s else (
                "memory", "killed (out of memory)", None)
        if rc >= 0:
            return "failed", f"exited (code {rc}) before its tests finished", None
        return "error", f"killed by signal {-rc}", None
    if "fault" in result:
        return "error", f"sandbox fault: {result['fault']}"[:1000], result
    if "syntax" in result:
        return "error", str(result["syntax"])[-1000:], result
    if "error" in result:
        return ("memory" if result.get("memory") else "failed"), str(result["error"])[-1000:], result
    if result.get("done") is not True:
        return "failed", "the code did not run to its end", result
    return "", "", result


def _judge_tests(record: dict, plan: CheckPlan, cpu_limit_s: int) -> SandboxResult:
    status, reason, result = _unfinished(record, cpu_limit_s)
    if not status:
        probes = result.get("probes")
        if not isinstance(probes, list) or len(probes) != len(plan.checks) or any(
                not isinstance(p, list) or len(p) != len(c.probes) for p, c in zip(probes, plan.checks)):
            status, reason = "failed", "the sandbox returned no value for some checks"
        else:
            for check, encoded in zip(plan.checks, probes):
                values = []
                for value in encoded:
                    try:
                        values.append(decode(value))
                    except (ValueError, TypeError, OverflowError):
                        values.append(Unencodable("malformed value"))
                ok, why = verdict(check, values)
                if not ok:
                    status, reason = "failed", why
                    break
            else:
                status = "passed"
    return SandboxResult(status == "passed", status, record.get("stdout", ""), record.get("stderr", ""),
                         record.get("wall_s", 0.0), record.get("exit"), reason)


def _limits(timeout_s, memory_mb, max_output_bytes, max_processes) -> Limits:
    return Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
                  max_processes=max_processes)


def run_python_many(items: list[tuple[str, str]], timeout_s: float = Limits.timeout_s,
                    memory_mb: int = Limits.memory_mb, max_output_bytes: int = Limits.max_output_bytes,
                    max_processes: int = Limits.max_processes, workers: int | None = None) -> list[SandboxResult]:
    """Run each (code, tests) pair: the code, then its tests' setup lines and probes, in its own sandboxed process
    with these limits; passed when every assert holds, judged here. UncheckableTests for tests that cannot be split."""
    limits = _limits(timeout_s, memory_mb, max_output_bytes, max_processes)
    plans = []
    for i, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != 2 or not all(isinstance(s, str) for s in item):
            raise TypeError(f"sandbox item {i}: expected a (code: str, tests: str) pair, got {type(item).__name__}")
        try:
            plans.append(parse_tests(item[1]))
        except UncheckableTests as e:
            raise UncheckableTests(f"sandbox item {i}: {e}") from None
    jobs = [{"code": code, "steps": [list(s) for s in plan.steps], "stdin": None}
            for (code, _), plan in zip(items, plans)]
    records = execute(jobs, limits, workers)
    cpu_limit_s = max(1, math.ceil(timeout_s))
    return [_judge_tests(r, plan, cpu_limit_s) for r, plan in zip(records, plans)]


def run_python(code: str, tests: str, timeout_s: float = Limits.timeout_s, memory_mb: int = Limits.memory_mb,
               max_output_bytes: int = Limits.max_output_bytes) -> SandboxResult:
    """Run `code` then `tests` (top-level asserts) in the sandbox; passed when every assert holds."""
    return run_python_many([(code, tests)], timeout_s, memory_mb, max_output_bytes)[0]


def normalize_stdout(text: str) -> str:
    """Output as judged: trailing spaces of each line and trailing blank lines do not count."""
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")


def run_program_many(items: list[tuple[str, str, str]], timeout_s: float = Limits.timeout_s,
                     memory_mb: int = Limits.memory_mb, max_output_bytes: int = Limits.max_output_bytes,
                     max_processes: int = Limits.max_processes, workers: int | None = None) -> list[SandboxResult]:
    """Run each (code, stdin, expected_stdout) as a program (`__name__ == "__main__"`); passed when it ends
    normally (exit status 0) and its stdout equals the expected one (`normalize_stdout`), compared here."""
    limits = _limits(timeout_s, memory_mb, max_output_bytes, max_processes)
    for i, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != 3 or not all(isinstance(s, str) for s in item):
            raise TypeError(f"sandbox item {i}: expected a (code, stdin, expected_stdout) triple of str")
    records = execute([{"code": code, "steps": None, "stdin": stdin} for code, stdin, _ in items], limits, workers)
    cpu_limit_s = max(1, math.ceil(timeout_s))
    results = []
    for record, (_, _, expected) in zip(records, items):
        status, reason, _ = _unfinished(record, cpu_limit_s)
        if not status:
            same = normalize_stdout(record["stdout"]) == normalize_stdout(expected)
            status, reason = ("passed", "") if same else ("failed", "the output differs from the expected output")
        results.append(SandboxResult(status == "passed", status, record.get("stdout", ""),
                                     record.get("stderr", ""), record.get("wall_s", 0.0), record.get("exit"),
                                     reason))
    return results
