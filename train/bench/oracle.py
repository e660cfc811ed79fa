"""Throughput of the code oracle: completions checked per second, the old sandbox against the current one.

    git worktree add ../phi4-before b0beb48     # the last commit before the bubblewrap sandbox
    python -m train.bench.oracle --baseline ../phi4-before [--repeats 5] [--questions 4] [--rollouts 64]

The workload is what Pivotal Token Search sends: per question (a smoke exercise from data.smoke.code_items),
`rollouts` distinct completions (half the reference solution, half the buggy one, in a ```python block) checked
against the same tests in one `check_code_many` call, as `train.pts.run.make_judge` does for a prefix estimate; and
single completions (a complete response, one call each). "before" imports `check_code_many` from the checkout given
by --baseline (`data.answers` or `data.verify.answers`), "after" from this repository; each runs in its own fresh
interpreter, the two interleaved (ABAB...) `--repeats` times; medians are printed with their ratio, and CPU
milliseconds per completion (the measuring process and all its descendants, so sandbox start-up counts). Both must
give the same verdicts. The single-call row is also the cost of one sandbox per completion, against which the
64-item row shows what batching buys.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

from data.smoke.code_items import make_code_item

REPO = Path(__file__).parents[2]

# Runs in a fresh interpreter with the checkout under test first on sys.path; the workload arrives on stdin.
# It is a child subreaper and reaps orphans, so the CPU time of processes their own parents did not wait for (a
# sandbox's init, say) is counted too.
_MEASURE = r"""
import ctypes, json, os, resource, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
sys.path.insert(0, sys.argv[1])
try:
    from data.verify.answers import check_code_many
except ImportError:
    from data.answers import check_code_many
def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return
def cpu():
    reap()
    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
job = json.loads(sys.stdin.read())
check_code_many(job["calls"][0][0][:2], job["calls"][0][1][:2])  # warm-up: imports, the sandbox's first start
time.sleep(0.2)
wall0, cpu0 = time.perf_counter(), cpu()
verdicts = [check_code_many(completions, tests) for completions, tests in job["calls"]]
wall = time.perf_counter() - wall0
time.sleep(0.2)  # orphans still exiting
print(json.dumps({"wall_s": wall, "cpu_s": cpu() - cpu0, "verdicts": verdicts}))
"""


def workload(questions: int, rollouts: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """One check_code_many call per question: `rollouts` distinct completions sharing that question's tests."""
    rng = random.Random(seed)
    calls = []
    for q in range(questions):
        item = make_code_item(rng)
        completions = [f"```python\n# rollout {k}\n{item['code'] if rng.random() < 0.5 else item['buggy']}```"
                       for k in range(rollouts)]
        calls.append((completions, [item["tests"]] * rollouts))
    return calls


def measure(checkout: Path, calls: list) -> dict:
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(checkout)], input=json.dumps({"calls": calls}),
                          capture_output=True, text=True, cwd=checkout, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def lscpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True,
                    help="a checkout of the old sandbox, e.g. `git worktree add ../phi4-before b0beb48`")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--questions", type=int, default=4, help="PTS estimates per repeat")
    ap.add_argument("--rollouts", type=int, default=64, help="completions per estimate (PTS's `rollouts`)")
    ap.add_argument("--singles", type=int, default=16, help="single-completion calls per repeat")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if not (args.baseline / "data").is_dir():
        ap.error(f"--baseline {args.baseline}: no data/ package there (a checkout of the repository before the "
                 f"sandbox change is expected)")
    batched = workload(args.questions, args.rollouts)
    singles = [([c], [t]) for completions, tests in workload(args.singles, 1, seed=1) for c, t in
               zip(completions, tests)]
    print(f"machine: {lscpu_model()}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.repeats} interleaved repeats")
    rows = {}
    for label, calls in ((f"{args.rollouts} completions per call (a PTS estimate)", batched),
                         ("1 completion per call (a complete response)", singles)):
        n = sum(len(c) for c, _ in calls)
        runs = {"before": [], "after": []}
        for r in range(args.repeats):
            for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                runs[side].append(measure(args.baseline if side == "before" else REPO, calls))
        if runs["before"][0]["verdicts"] != runs["after"][0]["verdicts"]:
            raise SystemExit(f"{label}: the two sandboxes disagree on some verdicts")
        rate = {s: n / statistics.median(x["wall_s"] for x in runs[s]) for s in runs}
        cpu = {s: statistics.median(x["cpu_s"] for x in runs[s]) / n for s in runs}
        rows[label] = {"completions": n, "before_per_s": rate["before"], "after_per_s": rate["after"],
                       "ratio": rate["after"] / rate["before"], "before_cpu_ms": 1e3 * cpu["before"],
                       "after_cpu_ms": 1e3 * cpu["after"],
                       "passed": sum(sum(v) for v in runs["after"][0]["verdicts"])}
    print(f"{'workload':48} {'before /s':>10} {'after /s':>10} {'ratio':>7} {'CPU ms before':>14} "
          f"{'CPU ms after':>13}")
    for label, row in rows.items():
        print(f"{label:48} {row['before_per_s']:10.1f} {row['after_per_s']:10.1f} {row['ratio']:6.2f}x "
              f"{row['before_cpu_ms']:14.1f} {row['after_cpu_ms']:13.1f}")
    pts = rows[next(iter(rows))]
    print(f"one PTS estimate ({args.rollouts} rollouts) costs the oracle {args.rollouts / pts['after_per_s']:.2f} s "
          f"of wall time here (before: {args.rollouts / pts['before_per_s']:.2f} s); load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        from data.fileio import atomic_write
        atomic_write(args.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
