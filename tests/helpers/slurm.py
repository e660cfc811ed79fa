"""Helpers for tests/slurm/test_slurm.py: submit sbatch jobs to the test cluster (.ci/slurm-up.sh) and wait for them.

No accounting database runs there, so job state comes from `scontrol show job` (records kept MinJobAge=600 s) and the
job's log files. Also runnable under torchrun as a tiny distributed job:
`python -m tests.helpers.slurm <any existing file> out_dir=<dir>` all-reduces over gloo and writes
`<dir>/rank<R>.json` (how the launcher's rendezvous is tested without the trainer).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The test cluster has no GPUs and one CPU per node; the wrappers' defaults ask for 8 GPUs per node.
# A short --time needs a short --signal lead, or the warning fires at once (see slurm/README.md).
TEST_SBATCH_OPTS = ["--gpus-per-node=0", "--time=15", "--signal=USR1@60"]


def cluster_problem() -> str | None:
    """None when a Slurm cluster with at least 2 usable nodes answers, else why not."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client commands (sinfo, sbatch) not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    usable = {line.split()[0] for line in out.stdout.splitlines()
              if len(line.split()) == 2 and re.fullmatch(r"(idle|alloc|mix|comp)", line.split()[1])}
    if len(usable) < 2:
        return f"fewer than 2 usable Slurm nodes: {out.stdout.strip()!r} (start them with .ci/slurm-up.sh)"
    return None


def require_cluster() -> None:
    """Skip without a usable cluster, unless PHI4_REQUIRE_SLURM=1 (CI), where that is a failure."""
    import pytest

    problem = cluster_problem()
    if problem:
        if os.environ.get("PHI4_REQUIRE_SLURM") == "1":
            pytest.fail(f"PHI4_REQUIRE_SLURM=1 but no usable Slurm cluster: {problem}")
        pytest.skip(problem)


def sbatch(script: str | Path, args: list[str], *, cwd: Path, opts: list[str] = (), env: dict | None = None) -> int:
    """Submit `script args` with the test options plus `opts`, from `cwd` (where the logs land); return the job id."""
    cmd = ["sbatch", "--parsable", *TEST_SBATCH_OPTS, *opts, str(script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}")
    return int(out.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, NodeList, StartTime, EndTime, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"scontrol show job {job_id}: {out.stderr.strip()}")
    # Values have no spaces except Command/WorkDir-like fields at the end; a key=value scan is enough here.
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_state(job_id: int, states: set[str], timeout_s: float, poll_s: float = 1.0) -> dict[str, str]:
    """Poll until the job's state is one of `states`; return its info. Raises TimeoutError with the last info."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s:.0f} s: {info}")


def wait_done(job_id: int, timeout_s: float) -> dict[str, str]:
    """Wait for the job to end for good (a requeued job passes through PENDING again, which is not the end)."""
    return wait_state(job_id, FINAL_STATES, timeout_s)


def cancel(job_id: int) -> None:
    subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)


def job_logs(cwd: Path, job_id: int) -> str:
    """Everything the job wrote to its --output and --error files (named <job-name>-<id>.out/.err in `cwd`)."""
    return "".join(p.read_text(errors="replace") for p in sorted(cwd.glob(f"*-{job_id}.*")) if p.suffix in (".out", ".err"))


def read_metrics(run_dir: Path) -> list[dict]:
    """The trainer's metrics.jsonl records that carry a step and a loss, in file order."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if "step" in r and "loss" in r]


def _allreduce(argv: list[str]) -> int:
    """torchrun worker: all-reduce rank+1 over gloo and record what this rank saw."""
    import torch
    import torch.distributed as dist

    from data.fileio import atomic_write

    opts = dict(a.split("=", 1) for a in argv[1:])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    rec = {"rank": rank, "world_size": world, "sum": t.item(), "node": os.environ.get("SLURMD_NODENAME"),
           "node_id": os.environ.get("SLURM_NODEID"), "master_addr": os.environ.get("MASTER_ADDR"),
           "group_rank": os.environ.get("GROUP_RANK"), "local_rank": os.environ.get("LOCAL_RANK")}
    atomic_write(Path(opts["out_dir"]) / f"rank{rank}.json", json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_allreduce(sys.argv[1:]))
