"""The data arrays (slurm/submit_data_array.sh + slurm/data_array.sbatch) on the real test cluster (.ci/slurm-up.sh:
nodes n1 and n2): decontamination, data.prepare, PTS and evaluation.

slurm/submit_data_array.sh submits N shards (slurm/data_array.sbatch, one array task each, `python -m
data.decontaminate CONFIG --shard i/N`) and the merge after them (afterok + kill-on-invalid-dep). What is checked: one
task per node, the merge after both, and its outputs and report byte for byte those of one process run here with the
same config. Skips without a cluster, unless PHI4_REQUIRE_SLURM=1 (CI) makes that a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.data.test_decontaminate_batch import BOILER, _outputs, _sharded_inputs
from tests.data.synth.test_real_server import free_port, models
from tests.helpers.files import eval_results
from tests.helpers.slurm import REPO, TEST_SBATCH_OPTS, cancel, require_cluster, wait_done
from tests.slurm.test_synth_array import wait_array

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_TIMEOUT_S = 300
N = 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_PYTHON": sys.executable}
SUBMIT = REPO / "slurm" / "submit_data_array.sh"
OPTS = [o for o in TEST_SBATCH_OPTS if not o.startswith("--signal")]


@pytest.fixture(scope="module")
def cluster():
    require_cluster()


def _config(root: Path) -> Path:
    bench, data = _sharded_inputs(root)
    config = root / "decon.yaml"
    config.write_text(json.dumps({"inputs": [str(data)], "output_dir": str(root / "out"), "on_error": "skip",
                                  "allowlist": [BOILER], "max_examples": 50,
                                  "benchmarks": [{"name": "b", "path": bench, "fields": ["q"]}]}))
    return config


def _submit_and_wait(tmp_path: Path, module: str, config, env: dict | None = None) -> tuple[dict, dict, str]:
    """submit_data_array.sh MODULE CONFIG N from tmp_path; (array tasks' info, merge job's info, all job logs)."""
    proc = subprocess.run(["bash", str(SUBMIT), module, str(config), str(N), *OPTS], cwd=tmp_path, env=env or ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = int(re.search(r"^shards: array job (\d+) ", proc.stdout, re.M)[1])
    merge = int(re.search(rf"^merge: job (\d+) after {array} ", proc.stdout, re.M)[1])
    try:
        tasks = wait_array(array, set(range(N)), JOB_TIMEOUT_S)
        merged = wait_done(merge, JOB_TIMEOUT_S)
    finally:
        cancel(array)
        cancel(merge)
    return tasks, merged, "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("phi4-data-*")))


def test_dry_run_prints_the_array_and_the_dependent_merge(tmp_path):
    config = _config(tmp_path)
    proc = subprocess.run(["bash", str(SUBMIT), "--dry-run", "--throttle", "3", "data.decontaminate", str(config),
                           "8", "--partition=p", "--", "max_examples=5"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, merge = proc.stdout.splitlines()
    assert array.startswith("sbatch --parsable --array=0-7%3 ") and "--partition=p" in array, array
    assert array.endswith(f"slurm/data_array.sbatch --module data.decontaminate --num-shards 8 {config} "
                          f"max_examples=5 "), array
    assert "--dependency=afterok:" in merge and "--kill-on-invalid-dep=yes" in merge, merge
    assert "-m\\ data.decontaminate\\ " in merge and "max_examples=5\\ --merge\\ 8" in merge, merge
    bad = subprocess.run(["bash", str(SUBMIT), "--dry-run", "data.decontaminate", str(config), "2", "--",
                          "bogus_key=1"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "configuration error" in bad.stderr and "sbatch" not in bad.stdout, bad


def test_array_and_merge_write_what_one_process_writes(tmp_path, cluster):
    config = _config(tmp_path)
    out = tmp_path / "out"
    local = subprocess.run([sys.executable, "-m", "data.decontaminate", str(config)], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    expected = _outputs(out)
    assert json.loads(expected["decontamination_report.json"])["totals"]["contaminated"] > 0
    shutil.rmtree(out)
    tasks, merged, logs = _submit_and_wait(tmp_path, "data.decontaminate", str(config))
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks.values()), (tasks, logs)
    assert {t["NodeList"] for t in tasks.values()} == {"n1", "n2"}, tasks  # one task per node
    assert merged["JobState"] == "COMPLETED", (merged, logs)
    last_shard = max(datetime.fromisoformat(t["EndTime"]) for t in tasks.values())
    assert datetime.fromisoformat(merged["StartTime"]) >= last_shard  # afterok: the merge waited for both
    assert {p.name for p in (out / "parts" / f"of-{N:05d}").glob("*.done.json")} == {
        f"part-{i:05d}.done.json" for i in range(N)}
    assert _outputs(out) == expected  # every output and the report, byte for byte


def test_prepare_array_and_merge_write_the_shards_one_process_writes(tmp_path, cluster):
    """data.prepare through the same scripts: input files split over two tasks on two nodes, the merge after them,
    shards and manifests byte for byte those of `python -m data.prepare` run here."""
    import yaml

    from tests.data.test_prepare_array import _files, _inputs

    cfg = _inputs(tmp_path / "in")
    raw = {"output_dir": str(tmp_path / "one"), "progress": False,
           "sources": [dict(s.__dict__) for s in cfg.sources]}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "array.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "array")}))
    local = subprocess.run([sys.executable, "-m", "data.prepare", str(tmp_path / "one.yaml")], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    tasks, merged, logs = _submit_and_wait(tmp_path, "data.prepare", str(tmp_path / "array.yaml"))
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks.values()), (tasks, logs)
    assert {t["NodeList"] for t in tasks.values()} == {"n1", "n2"} and merged["JobState"] == "COMPLETED", logs
    one, got = _files(tmp_path / "one"), _files(tmp_path / "array")
    assert one == got and any(k.endswith("manifest.json") for k in one)


def _one_process_then_array(tmp_path: Path, module: str, configs: dict) -> None:
    """`python -m MODULE one.yaml` here, then arr.yaml through the array scripts: every task and the merge done,
    one task per node (configs: {"one": ..., "arr": ...}, written as YAML into tmp_path)."""
    import yaml

    for name, cfg in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    local = subprocess.run([sys.executable, "-m", module, str(tmp_path / "one.yaml")], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    tasks, merged, logs = _submit_and_wait(tmp_path, module, str(tmp_path / "arr.yaml"))
    assert all(t["JobState"] == "COMPLETED" for t in tasks.values()) and merged["JobState"] == "COMPLETED", logs
    assert {t["NodeList"] for t in tasks.values()} == {"n1", "n2"}, tasks


def _pts_inputs(tmp_path: Path, tok) -> dict:
    from tests.train.pts.test_run import answer_chain_model
    from train.export.hf import to_hf

    to_hf(answer_chain_model(tok), tmp_path / "model")
    questions = [{"id": f"q{i}", "question": f"What is {i} + {7 - i}?", "answer": "7", "oracle": "math"}
                 for i in range(4)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"model": str(tmp_path / "model"), "questions": str(tmp_path / "q.jsonl"), "rollouts": 16,
            "batch_size": 16, "max_new_tokens": 7, "device": "cpu", "seed": 3}


def test_pts_array_and_merge_write_the_pairs_one_process_writes(tmp_path, cluster, tok):
    """Pivotal Token Search through the same scripts: questions split over two tasks on two nodes (`train.pts
    --shard i/2`), the merge after them, the pairs byte for byte those of one process."""
    base = _pts_inputs(tmp_path, tok)
    _one_process_then_array(tmp_path, "train.pts", {"one": {**base, "output": str(tmp_path / "one" / "pairs.jsonl")},
                                                    "arr": {**base, "output": str(tmp_path / "arr" / "pairs.jsonl")}})
    one = (tmp_path / "one" / "pairs.jsonl").read_bytes()
    assert one.strip() and (tmp_path / "arr" / "pairs.jsonl").read_bytes() == one


def test_pts_array_samples_through_a_server_on_each_node(tmp_path, cluster, tok):
    """DATA_SERVER_CMD: every task starts its own OpenAI-compatible server on its node (the vLLM test double
    tests/helpers/completion_server.py: token-id prompts, token-id logprobs), waits for /v1/models, runs its shard with
    sampler=backend against it and stops it; the pairs equal one process sampling through the same kind of server."""
    import yaml

    base = {**_pts_inputs(tmp_path, tok), "backend": {"kind": "openai", "concurrency": 4,
                                                      "openai": {"model": "sft", "max_retries": 0}}}
    serve = f"{sys.executable} -m tests.helpers.completion_server --model {tmp_path / 'model'} --name sft --port"
    port = free_port()
    server = subprocess.Popen([*serve.split(), str(port)], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                assert models(f"http://127.0.0.1:{port}/v1") == ["sft"]
                break
            except Exception:
                assert server.poll() is None and time.time() < deadline, "the test-double server did not start"
                time.sleep(0.5)
        one = {**base, "sampler": "backend", "output": str(tmp_path / "one" / "pairs.jsonl")}
        one["backend"]["openai"]["base_url"] = f"http://127.0.0.1:{port}/v1"
        (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
        local = subprocess.run([sys.executable, "-m", "train.pts", str(tmp_path / "one.yaml")], cwd=REPO, env=ENV,
                               capture_output=True, text=True, timeout=300)
        assert local.returncode == 0, local.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(30)
    (tmp_path / "arr.yaml").write_text(yaml.safe_dump({**base, "output": str(tmp_path / "arr" / "pairs.jsonl")}))
    env = {**ENV, "DATA_SERVER_CMD": serve + " {port}", "DATA_SERVER_TIMEOUT_S": "120"}
    tasks, merged, logs = _submit_and_wait(tmp_path, "train.pts", str(tmp_path / "arr.yaml"), env)
    assert all(t["JobState"] == "COMPLETED" for t in tasks.values()) and merged["JobState"] == "COMPLETED", logs
    assert {t["NodeList"] for t in tasks.values()} == {"n1", "n2"}, tasks
    assert logs.count("server up after") == N and logs.count("stopping the server") == N, logs
    assert "sampler=backend backend.kind=openai backend.openai.base_url=http://127.0.0.1:" in logs, logs
    server_logs = sorted(tmp_path.glob("pts-server-*.log"))
    assert len(server_logs) == N and all("POST /v1/completions" in p.read_text() for p in server_logs), server_logs
    got, want = (tmp_path / "arr" / "pairs.jsonl").read_bytes(), (tmp_path / "one" / "pairs.jsonl").read_bytes()
    assert want.strip() and got == want


def test_a_server_command_for_a_module_that_samples_from_none_is_refused(tmp_path, cluster):
    config = _config(tmp_path)
    env = {**ENV, "DATA_SERVER_CMD": "sleep 600 # {port}"}
    tasks, merged, logs = _submit_and_wait(tmp_path, "data.decontaminate", config, env)
    assert all(t["JobState"] == "FAILED" and t["ExitCode"].startswith("2:") for t in tasks.values()), tasks
    assert "DATA_SERVER_CMD is set but data.decontaminate samples from no server (only train.pts does)" in logs, logs


def test_eval_array_and_merge_write_the_results_one_process_writes(tmp_path, cluster, tok):
    """Evaluation through the same scripts: items split over two tasks on two nodes (`train.eval --shard i/2`), the
    merge after them (no model), results and samples those of one process (sampled completions included)."""
    from tests.helpers.eval_models import random_model
    from train.export.hf import to_hf

    to_hf(random_model(4), tmp_path / "model")
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({"question": f"{i} + 1?", "choices": [str(i + 1), "x"],
                                                           "answer": 0}) + "\n" for i in range(5)))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": f"{i} + {i}?", "answer": str(2 * i)}) + "\n"
                                              for i in range(3)))
    base = {"model_path": str(tmp_path / "model"), "batch_size": 1, "seed": 2, "label": "final", "device": "cpu",
            "multiple_choice": [{"name": "mc", "path": str(tmp_path / "mc.jsonl")}],
            "generative": [{"name": "q", "path": str(tmp_path / "q.jsonl"), "max_new_tokens": 4, "temperature": 0.9,
                            "num_samples": 2}],
            "recall": {"lengths": [160], "samples": 2}}
    _one_process_then_array(tmp_path, "train.eval", {name: {**base, "output_dir": str(tmp_path / name)}
                                                     for name in ("one", "arr")})
    one = eval_results(tmp_path / "one")
    assert eval_results(tmp_path / "arr") == one and [r["task"] for r in one] == ["mc", "q", "json_kv"]
    one_samples = sorted(p.name for p in (tmp_path / "one" / "samples").iterdir())
    assert one_samples and all((tmp_path / "arr" / "samples" / n).read_bytes() ==
                               (tmp_path / "one" / "samples" / n).read_bytes() for n in one_samples)
