"""The Slurm launch on a real cluster (.ci/slurm-up.sh: slurmctld + two slurmd on this machine, one CPU each).

Real sbatch jobs of slurm/*.sbatch: srun + torchrun c10d rendezvous across 2 nodes, losses equal to plain torchrun,
preemption (a real SIGUSR1) -> checkpoint -> `scontrol requeue` -> resume, a recipe chained with afterok, and bad
configs failing without requeue. Skips without a cluster, unless PHI4_REQUIRE_SLURM=1 (CI) makes that a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.helpers.slurm import (REPO, TEST_SBATCH_OPTS, cancel, job_info, job_logs, read_metrics, require_cluster,
                                 sbatch, wait_done, wait_state)
from tests.helpers.train import check, make_sources, run_train, write_run_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 10  # every training run here: same data, model and schedule, so their losses are comparable
JOB_TIMEOUT_S = 300
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in the plain torchrun reference run (train_helpers.run_train)


@pytest.fixture(scope="module")
def cluster():
    require_cluster()


@pytest.fixture(scope="module")
def work(tmp_path_factory, cluster):
    root = tmp_path_factory.mktemp("slurm")
    return root, make_sources(root / "shards")


def _config(work, name: str, **sections) -> tuple[Path, Path]:
    root, sources = work
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": STEPS, "save_every": 1000, **sections["train"]}
    run_dir = root / name
    return write_run_config(root / f"{name}.yaml", sources, run_dir, **sections), run_dir


def _run_job(work, script: str, args: list[str], opts=(), env=None) -> tuple[int, dict, str]:
    root, _ = work
    job = sbatch(REPO / "slurm" / script, args, cwd=root, opts=list(opts), env=env or ENV)
    try:
        info = wait_done(job, JOB_TIMEOUT_S)
    finally:
        cancel(job)  # no-op once it ended; frees the nodes when a wait failed
    return job, info, job_logs(root, job)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def reference(work):
    """The same run under plain `torchrun --standalone --nproc_per_node 2`."""
    cfg, run_dir = _config(work, "reference")
    check(run_train(cfg, [], nproc=2))
    return run_dir


def test_cluster_has_two_nodes_and_srun_spans_them(cluster):
    out = subprocess.run(["srun", "-N", "2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURM_NODEID $SLURMD_NODENAME"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = sorted(line.split() for line in out.stdout.splitlines())
    assert [r[0] for r in rows] == ["0", "1"] and rows[0][1] != rows[1][1], out.stdout


def test_two_node_rendezvous_allreduce(work):
    """srun -> one torchrun per node -> c10d rendezvous at the head node's NodeAddr -> 2 gloo ranks all-reduce."""
    root, _ = work
    out_dir = root / "allreduce"
    dummy = root / "allreduce.yaml"
    dummy.write_text("{}\n")
    job, info, logs = _run_job(work, "pretrain.sbatch", [str(dummy), f"out_dir={out_dir}"], opts=["--nodes=2"],
                               env={**ENV, "PHI4_MODULE": "tests.helpers.slurm"})
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    recs = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["sum"] == 3.0 for r in recs), recs
    assert {r["node_id"] for r in recs} == {"0", "1"} and recs[0]["node"] != recs[1]["node"], recs
    head = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], capture_output=True, text=True)
    head_addr = re.search(r"NodeAddr=(\S+)", subprocess.run(["scontrol", "show", "node", head.stdout.split()[0]],
                                                              capture_output=True, text=True).stdout).group(1)
    assert f"rendezvous {head_addr}:" in logs and "(store host: 1)" in logs and "(store host: 0)" in logs, logs


def test_two_node_pretraining_matches_plain_torchrun(work, reference):
    cfg, run_dir = _config(work, "two_node")
    job, info, logs = _run_job(work, "pretrain.sbatch", [str(cfg)], opts=["--nodes=2"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", logs
    assert logs.count("torchrun with 1 process(es)") == 2  # one torchrun on each node
    got, ref = _losses(run_dir), _losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref, (got, ref)  # same world size, data and reductions: identical losses


def test_preemption_checkpoints_requeues_and_resumes(work, reference):
    root, _ = work
    cfg, run_dir = _config(work, "preempted")
    job = sbatch(REPO / "slurm" / "pretrain.sbatch", [str(cfg)], cwd=root, opts=["--nodes=2"], env=ENV)
    try:
        # Signal once training runs (the trainers' handlers are installed), well before the last step.
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2:
                break
            assert job_info(job)["JobState"] in ("PENDING", "RUNNING"), job_logs(root, job)
            time.sleep(0.3)
        subprocess.run(["scancel", "--signal=USR1", str(job)], check=True, timeout=30)
        # The job goes back to the queue (same id), waits out the requeue hold, runs again and completes.
        wait_state(job, {"PENDING", "REQUEUED"}, timeout_s=120, poll_s=0.5)
        info = wait_done(job, JOB_TIMEOUT_S)
    finally:
        cancel(job)
    logs = job_logs(root, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["Restarts"] == "1", info
    stopped_at = int(re.search(r"saved a checkpoint at step (\d+) and stopped", logs).group(1))
    assert 2 <= stopped_at < STEPS, logs
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert "(restart 1)" in logs and logs.count("torchrun with 1 process(es)") == 4  # both attempts, both nodes
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1)), steps  # no step lost or repeated across the requeue
    got, ref = _losses(run_dir), _losses(reference)
    assert got[STEPS] == ref[STEPS] and got == ref, (got, ref)
    assert json.loads((run_dir / "exit_status.json").read_text())["status"] == "completed"


def test_scancel_saves_and_stops_without_requeue(work):
    """scancel is the user's stop: the trainers save on SIGTERM, and the job ends instead of requeueing itself."""
    root, _ = work
    cfg, run_dir = _config(work, "cancelled", train={"max_steps": 1000})
    job = sbatch(REPO / "slurm" / "pretrain.sbatch", [str(cfg)], cwd=root, opts=["--nodes=2"], env=ENV)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and not ((run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)):
            assert job_info(job)["JobState"] in ("PENDING", "RUNNING"), job_logs(root, job)
            time.sleep(0.3)
        subprocess.run(["scancel", str(job)], check=True, timeout=30)
        info = wait_done(job, 120)
        time.sleep(2)  # let the batch step's last lines reach the log
    finally:
        cancel(job)
    logs = job_logs(root, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, logs)
    assert "not requeueing" in logs and "requeueing job" not in logs, logs
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["status"] == "preempted" and 1 <= status["step"] < 1000, status
    assert (run_dir / "checkpoints" / f"step_{status['step']:08d}").is_dir()


def test_recipe_chain_runs_stages_in_order(work):
    """submit_recipe.sh: smoke data -> pretraining -> midtraining -> summary as 4 jobs chained with afterok, wired as
    the runner, leaving the runner's records: a local re-run finds every stage complete."""
    root, _ = work
    pre_cfg, _ = _config(work, "chain_pre_cfg", train={"max_steps": 4})
    mid_cfg, _ = _config(work, "chain_mid_cfg", stage="midtrain", model={"rope_theta": 250_000.0},
                         train={"seq_len": 128, "max_steps": 2}, optim={"lr": 3e-4})
    out = root / "chain"
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(out), "stages": [
        {"name": "data", "kind": "smoke_data"},  # not a training stage: one task on one node
        {"name": "pretrain", "kind": "train", "config": str(pre_cfg)},
        {"name": "midtrain", "kind": "train", "config": str(mid_cfg), "overrides": ["train.log_every=1"]},
    ]}))
    proc = subprocess.run(["bash", str(REPO / "slurm" / "submit_recipe.sh"), str(recipe), "--nodes=2",
                           *TEST_SBATCH_OPTS], cwd=root, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = {name: (what, int(job)) for name, what, job in re.findall(r"^(\w+): (\w+) job (\d+)", proc.stdout, re.M)}
    assert jobs == {"data": ("command", jobs["data"][1]), "pretrain": ("pretrain", jobs["pretrain"][1]),
                    "midtrain": ("midtrain", jobs["midtrain"][1]), "summary": ("command", jobs["summary"][1])}, \
        proc.stdout
    ids = [jobs[n][1] for n in ("data", "pretrain", "midtrain", "summary")]
    try:
        assert job_info(ids[2])["Dependency"].startswith(f"afterok:{ids[1]}"), job_info(ids[2])
        infos = [wait_done(j, JOB_TIMEOUT_S) for j in ids]
    finally:
        for j in ids:
            cancel(j)
    assert all(i["JobState"] == "COMPLETED" for i in infos), (infos, [job_logs(root, j) for j in ids])
    for before, after in zip(infos, infos[1:]):  # each stage starts after the previous one ended
        assert datetime.fromisoformat(after["StartTime"]) >= datetime.fromisoformat(before["EndTime"])
    assert (out / "data" / "raw" / "smoke_manifest.json").is_file()
    assert sorted(_losses(out / "pretrain")) == [1, 2, 3, 4] and sorted(_losses(out / "midtrain")) == [1, 2]
    saved = yaml.safe_load((out / "midtrain" / "config.yaml").read_text())
    assert saved["stage"] == "midtrain" and saved["train"]["init_from"] == str(out / "pretrain"), saved["train"]
    assert json.loads((out / "data" / "stage.json").read_text())["status"] == "completed"  # the runner ran it
    summary = json.loads((out / "summary.json").read_text())
    assert [(e["name"], e["status"]) for e in summary["stages"]] == [
        ("data", "completed"), ("pretrain", "completed"), ("midtrain", "completed")]
    assert summary["stages"][1]["steps"] == 4 and (out / "plots" / "midtrain.png").is_file()
    rerun = subprocess.run([sys.executable, "-m", "train.recipe", str(recipe)], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already complete") == 3, rerun.stdout


@pytest.mark.parametrize("name,script,overrides,needle,reached_nodes", [
    ("unknown_key", "pretrain.sbatch", ["train.bogus_key=1"], "unknown key 'train.bogus_key'", False),  # batch step
    ("wrong_script", "sft.sbatch", [], "use slurm/pretrain.sbatch", False),  # a pretraining config sent to sft.sbatch
    ("bad_batch", "pretrain.sbatch", ["train.global_batch=3"], "not divisible", True),  # caught by the trainers
])
def test_bad_config_fails_fast_with_error_in_log(work, name, script, overrides, needle, reached_nodes):
    cfg, run_dir = _config(work, f"bad_{name}")
    t0 = time.monotonic()
    job, info, logs = _run_job(work, script, [str(cfg), *overrides], opts=["--nodes=2"])
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, logs)
    assert info["Restarts"] == "0" and "requeueing" not in logs, logs
    assert needle in logs, logs
    assert ("torchrun with" in logs) == reached_nodes, logs
    assert not (run_dir / "checkpoints").exists()
    assert time.monotonic() - t0 < 120
