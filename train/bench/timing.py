"""Benchmark plumbing shared by the CPU benchmarks: machine facts and interleaved, repeated timing."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict:
    import transformers

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def interleaved(fns: dict, repeats: int) -> dict[str, dict]:
    """Wall and CPU seconds of each callable, run in turn `repeats` times (ABAB...) so drift hits all alike."""
    runs = {name: {"wall_s": [], "cpu_s": []} for name in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            runs[name]["wall_s"].append(time.perf_counter() - w0)
            runs[name]["cpu_s"].append(time.process_time() - c0)
    for r in runs.values():
        r["median_wall_s"] = statistics.median(r["wall_s"])
        r["median_cpu_s"] = statistics.median(r["cpu_s"])
    return runs
