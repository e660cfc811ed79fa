"""The synthetic-data engine as a Slurm array on the real test cluster (.ci/slurm-up.sh: nodes n1 and n2).

slurm/submit_synth.sh submits N shards (slurm/synth.sbatch, one array task each) and the merge after them
(afterok + kill-on-invalid-dep). The shards run our own model in process (a random tiny model, `init:`), so the data
is noise but every step runs; what is checked: one task per node, the merge after both, its output byte for byte the
same as the same shards and merge run here; a failed shard cancels the merge, and rerunning only that shard lets a
new merge complete; and the per-node server (SYNTH_SERVER_CMD: llama.cpp's OpenAI server on a GGUF, as a vLLM node
would run) is started, used, stopped, and fails the task loudly when it dies or never answers.

The reference is the sharded local run, not the one-process run: merge keeps shard order (shard 0's records, then
shard 1's), while one process writes them in input order. With `backend.inprocess.batch_size: 1` each request is its
own generate() call, so the texts do not depend on which requests share a batch and the one-process run has the same
records (compared as sorted lines) and the same step counts; with larger batches the texts differ between shard
splits (a batch's sampling generator is seeded from the batch's seeds), which is why the byte comparison is against
the same split. Skips without a cluster, unless PHI4_REQUIRE_SLURM=1 (CI) makes that a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from tests.helpers.slurm import FINAL_STATES, REPO, TEST_SBATCH_OPTS, cancel, job_info, require_cluster, wait_done
from tests.helpers.synth import write_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_TIMEOUT_S = 300
N = 2
TYPES = ("web_rewrite", "qa", "code_reversal")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PHI4_PYTHON": sys.executable}  # as the local reference runs
SUBMIT = REPO / "slurm" / "submit_synth.sh"
# The test cluster has no GPUs; a B: signal lead well inside --time (see slurm/README.md).
OPTS = [o for o in TEST_SBATCH_OPTS if not o.startswith("--signal")] + ["--signal=B:USR1@60"]


@pytest.fixture(scope="module")
def cluster():
    require_cluster()


TOPICS = ["photosynthesis", "prime numbers", "plate tectonics", "binary search", "the water cycle", "vectors"]


def _passage(topic: str, k: int) -> str:  # ~400 characters: one passage each (passage_chars 600, min_chars 100)
    return (f"Paragraph {k} about {topic}. " + f"The study of {topic} explains how simple rules build complex "
            f"results, and students of {topic} learn to reason step by step from definitions to conclusions. ") * 2


def _write_config(root: Path, **changes) -> Path:
    """Small inputs (6 seed passages in a .txt and a .jsonl, 3 organic questions, 3 code snippets, one failing its
    own tests) and a config answering them with the random tiny model: a shard takes seconds on one CPU."""
    (root / "seeds.txt").write_text("\n\n".join(_passage(t, k) for k, t in enumerate(TOPICS[:3])) + "\n")
    write_jsonl(root / "seeds.jsonl", [{"text": _passage(t, 9)} for t in TOPICS[3:]])
    questions = ["What is 2 + 3?", "Name a prime above 10.", "What is the capital of France?"]
    write_jsonl(root / "questions.jsonl", [{"question": q} for q in questions])
    write_jsonl(root / "code.jsonl", [
        {"code": "def add(a, b):\n    return a + b\n", "tests": "assert add(2, 3) == 5\n"},
        {"code": "def sq(x):\n    return x * x\n", "tests": "assert sq(4) == 16\n"},
        {"code": "def bad(x):\n    return x\n", "tests": "assert bad(1) == 2\n"}])
    write_jsonl(root / "bench.jsonl", [{"question": "What is the boiling point of water at sea level in kelvin?"}])
    cfg = {"output_dir": str(root / "unused"), "name": "t", "seed": 0,
           "backend": {"kind": "inprocess", "inprocess": {"model": f"init:{REPO / 'configs/model/tiny.yaml'}",
                                                          "max_seq_len": 1024, "batch_size": 1, "device": "cpu"}},
           "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16},
           "seeds": {"inputs": [str(root / "seeds.txt"), str(root / "seeds.jsonl")], "passage_chars": 600,
                     "min_chars": 100, "score": "none"},
           "rewrite": {"styles": ["textbook"], "drop_truncated": False},
           "revision": {"enabled": False},
           "questions": {"organic": [str(root / "questions.jsonl")], "answers": 3, "question_max_tokens": 16},
           "reversal": {"inputs": [str(root / "code.jsonl")], "instruction_max_tokens": 16},
           "validation": {"timeout_s": 20},
           "decontaminate": {"benchmarks": [{"name": "bench", "path": str(root / "bench.jsonl"),
                                             "fields": ["question"]}]}}
    for key, value in changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    path = root / ("synth.yaml" if not changes else f"synth-{len(list(root.glob('synth*.yaml')))}.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, cluster):
    root = tmp_path_factory.mktemp("synth_slurm")
    return root, _write_config(root)


def _local(config: Path, *args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "train.synth", str(config), *args], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def references(work):
    """Here, without Slurm: the same 2 shards and merge (`sharded`), and the whole run in one process (`one`)."""
    root, config = work
    sharded, one = root / "ref_sharded", root / "ref_one"
    for i in range(N):
        _local(config, f"output_dir={sharded}", "--shard", f"{i}/{N}")
    _local(config, f"output_dir={sharded}", "--merge", str(N))
    _local(config, f"output_dir={one}")
    return sharded, one


def _submit(root: Path, config: Path, out: Path, *flags: str, env=None) -> tuple[int, int, str]:
    proc = subprocess.run(["bash", str(SUBMIT), *flags, str(config), str(N), *OPTS, "--", f"output_dir={out}"],
                          cwd=root, env=env or ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = re.search(r"^shards: array job (\d+) ", proc.stdout, re.M)
    merge = re.search(r"^merge: job (\d+) after (\d+) ", proc.stdout, re.M)
    assert array and merge and merge[2] == array[1], proc.stdout
    return int(array[1]), int(merge[1]), proc.stdout


def array_tasks(array_id: int) -> dict[int, dict[str, str]]:
    """The array's tasks by index, from `scontrol show job -o` (one line per task; a pending rest is one line with
    a range as its ArrayTaskId, left out here)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(array_id)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    tasks = {}
    for line in out.stdout.splitlines():
        info = dict(re.findall(r"(\w+)=(\S*)", line))
        if info.get("ArrayTaskId", "").isdigit():
            tasks[int(info["ArrayTaskId"])] = info
    return tasks


def wait_array(array_id: int, indices: set[int], timeout_s: float = JOB_TIMEOUT_S) -> dict[int, dict[str, str]]:
    deadline = time.monotonic() + timeout_s
    tasks: dict = {}
    while time.monotonic() < deadline:
        tasks = array_tasks(array_id)
        if set(tasks) == indices and all(t["JobState"] in FINAL_STATES for t in tasks.values()):
            return tasks
        time.sleep(1)
    raise TimeoutError(f"array {array_id}: tasks {sorted(indices)} not all ended after {timeout_s} s: {tasks}")


def array_logs(root: Path, array_id: int) -> dict[int, str]:
    """Each task's .out + .err (phi4-synth-<array>_<task>.out/.err in the submit directory)."""
    logs: dict[int, str] = {}
    for p in sorted(root.glob(f"phi4-synth-{array_id}_*")):
        task = int(p.stem.rsplit("_", 1)[1])
        logs[task] = logs.get(task, "") + p.read_text(errors="replace")
    return logs


def merge_log(root: Path, job: int) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(root.glob(f"phi4-synth-merge-{job}.*")))


def _cancel(*jobs: int) -> None:
    for j in jobs:
        cancel(j)  # no-op once ended; frees the nodes when a wait failed


def _files(out: Path) -> dict[str, bytes]:
    return {t: (out / f"t.{t}.jsonl").read_bytes() for t in TYPES}


def _steps(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["steps"]


def _when(info: dict, key: str) -> datetime:
    return datetime.fromisoformat(info[key])


def test_dry_run_prints_the_array_and_the_dependent_merge(tmp_path):
    root, config = tmp_path, _write_config(tmp_path)
    proc = subprocess.run(["bash", str(SUBMIT), "--dry-run", "--throttle", "3", str(config), "8", "--partition=p",
                           "--", "seed=1"], cwd=root, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, merge = proc.stdout.splitlines()
    assert array.startswith("sbatch --parsable --array=0-7%3 ") and "--partition=p" in array, array
    assert array.endswith(f"slurm/synth.sbatch --num-shards 8 {config} seed=1 "), array
    assert "--dependency=afterok:" in merge and "--kill-on-invalid-dep=yes" in merge, merge
    assert "-m\\ train.synth\\ " in merge and "--merge\\ 8\\ seed=1" in merge, merge
    bad = subprocess.run(["bash", str(SUBMIT), "--dry-run", str(config), "2", "--", "seeds.bogus=1"], cwd=root,
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown key" in bad.stderr and "sbatch" not in bad.stdout, bad


def test_array_runs_a_shard_per_node_then_merge_matches_local_runs(work, references):
    root, config = work
    sharded, one = references
    out = root / "slurm_run"
    array, merge, _ = _submit(root, config, out)
    try:
        dep = job_info(merge)["Dependency"]  # the shards take seconds: the merge is still waiting
        assert dep.startswith(f"afterok:{array}_*"), dep
        tasks = wait_array(array, set(range(N)))
        merged = wait_done(merge, JOB_TIMEOUT_S)
    finally:
        _cancel(array, merge)
    logs = array_logs(root, array)
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks.values()), (tasks, logs)
    assert {t["NodeList"] for t in tasks.values()} == {"n1", "n2"}, tasks  # one task per node, at once
    for i in range(N):
        assert f"array task {i} of {N}:" in logs[i] and f"shard {i}/{N} done" in logs[i], logs[i]
        assert (out / "shards" / f"{i:05d}-of-{N:05d}" / "DONE").is_file()
    assert merged["JobState"] == "COMPLETED", merge_log(root, merge)
    assert _when(merged, "StartTime") >= max(_when(t, "EndTime") for t in tasks.values())  # afterok
    assert f"merged {N} shard(s)" in merge_log(root, merge)
    # Byte for byte the local shards + merge; the same records and counts as one process (in another order).
    got = _files(out)
    assert got == _files(sharded)
    assert got["web_rewrite"].count(b"\n") == 6, got  # every seed was rewritten: nothing compared is empty
    assert _steps(out) == _steps(sharded) == _steps(one)
    assert {t: sorted(b.splitlines()) for t, b in got.items()} == \
        {t: sorted(b.splitlines()) for t, b in _files(one).items()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_shards"] == N and [s["records"]["web_rewrite"] for s in manifest["shards"]] == [3, 3]

    # Relaunching the finished array: both shards exit at once ("already done"), the merge writes the same bytes.
    again, merge2, _ = _submit(root, config, out)
    try:
        tasks = wait_array(again, set(range(N)))
        merged = wait_done(merge2, JOB_TIMEOUT_S)
    finally:
        _cancel(again, merge2)
    logs = array_logs(root, again)
    assert all(t["JobState"] == "COMPLETED" for t in tasks.values()) and merged["JobState"] == "COMPLETED", logs
    assert all("already done" in logs[i] and "requests sent" not in logs[i] for i in range(N)), logs
    assert _files(out) == got


def test_failed_shard_cancels_merge_and_rerunning_only_it_completes(work, references):
    root, config = work
    sharded, _ = references
    out = root / "failing"
    blocker = out / "shards" / f"{1:05d}-of-{N:05d}"  # a file where shard 1's directory goes: shard 1 fails
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way\n")
    array, merge, _ = _submit(root, config, out)
    try:
        tasks = wait_array(array, set(range(N)))
        cancelled = wait_done(merge, JOB_TIMEOUT_S)
    finally:
        _cancel(array, merge)
    logs = array_logs(root, array)
    assert tasks[0]["JobState"] == "COMPLETED" and tasks[1]["JobState"] == "FAILED", (tasks, logs)
    assert tasks[1]["ExitCode"] != "0:0" and "FileExistsError" in logs[1], logs[1]
    assert "shard 1/2 failed with status" in logs[1] and "requeueing" not in logs[1], logs[1]
    assert cancelled["JobState"] == "CANCELLED" and cancelled["Reason"] == "DependencyNeverSatisfied", cancelled
    assert merge_log(root, merge) == ""  # it never started: Slurm made no log for it
    assert not (out / "manifest.json").exists() and not list(out.glob("t.*.jsonl"))
    done0 = out / "shards" / f"{0:05d}-of-{N:05d}" / "DONE"
    assert done0.is_file() and not (out / "shards" / "00001-of-00002" / "DONE").exists()
    done0_mtime = done0.stat().st_mtime_ns

    # Fixed; resubmit shard 1 only (still a shard of 2), and a new merge.
    blocker.unlink()
    rerun, merge2, stdout = _submit(root, config, out, "--only", "1")
    assert "(tasks 1 of 2)" in stdout, stdout
    try:
        tasks = wait_array(rerun, {1})
        merged = wait_done(merge2, JOB_TIMEOUT_S)
    finally:
        _cancel(rerun, merge2)
    logs = array_logs(root, rerun)
    assert tasks[1]["JobState"] == "COMPLETED" and "shard 1/2:" in logs[1] and "requests sent" in logs[1], logs
    assert merged["JobState"] == "COMPLETED", merge_log(root, merge2)
    assert done0.stat().st_mtime_ns == done0_mtime  # shard 0 was not run again
    assert _files(out) == _files(sharded) and _steps(out) == _steps(sharded)


def _sbatch_one(root: Path, config: Path, out: Path, env: dict) -> int:
    """One shard (a 1-task array) through slurm/synth.sbatch directly."""
    cmd = ["sbatch", "--parsable", "--array=0", *OPTS, str(REPO / "slurm" / "synth.sbatch"), str(config),
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().split(";")[0])


def test_node_server_that_dies_or_never_answers_fails_the_task_loudly(work):
    root, config = work
    dies = _sbatch_one(root, config, root / "server_dies",
                       {**ENV, "SYNTH_SERVER_CMD": "echo 'cannot load /models/x on port {port}' >&2; exit 7"})
    hangs = _sbatch_one(root, config, root / "server_hangs",
                        {**ENV, "SYNTH_SERVER_CMD": "echo listening on {port}; exec sleep 297",
                         "SYNTH_SERVER_TIMEOUT_S": "4"})
    try:
        (died,), (hung,) = wait_array(dies, {0}).values(), wait_array(hangs, {0}).values()
    finally:
        _cancel(dies, hangs)
    died_log, hung_log = array_logs(root, dies)[0], array_logs(root, hangs)[0]
    assert died["JobState"] == "FAILED" and died["ExitCode"] == "4:0", (died, died_log)
    assert "the server exited with status 7 before answering" in died_log, died_log
    assert re.search(r"cannot load /models/x on port \d+", died_log), died_log  # the server's log tail
    assert hung["JobState"] == "FAILED" and hung["ExitCode"] == "4:0", (hung, hung_log)
    assert "did not answer GET http://127.0.0.1:" in hung_log and "within 4 s" in hung_log, hung_log
    assert re.search(r"listening on \d+", hung_log) and "stopping the server" in hung_log, hung_log
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 297" not in ps, ps  # the server was killed with its task
    assert not (root / "server_dies" / "shards").exists() and not (root / "server_hangs" / "shards").exists()


def test_each_task_serves_itself_with_llama_cpp(work, references):
    """SYNTH_SERVER_CMD as on a GPU node, with llama.cpp's OpenAI server on a tiny GGUF instead of vLLM: each task
    starts its own server on a free port, the shard talks to it through the openai backend, then it is stopped."""
    import dataclasses

    from data.tokenizer import Phi4Tokenizer
    from tests.helpers.gguf import CFG, LLAMA_MISSING, tiny_model
    from train.export.gguf import to_gguf

    try:
        import llama_cpp.server  # noqa: F401  (CI installs it: .ci/run)
    except ImportError as e:
        pytest.fail(f"{LLAMA_MISSING}; the server also needs llama-cpp-python[server] ({e})")

    root, _ = work
    model = tiny_model()
    model.cfg = dataclasses.replace(CFG, max_seq_len=1024)  # the pipeline's prompts need more than the helper's 256
    gguf = root / "served" / "tiny-f32.gguf"
    gguf.parent.mkdir()
    to_gguf(model, gguf, "f32", tokenizer=Phi4Tokenizer())
    config = _write_config(root, **{"backend.kind": "openai", "backend.concurrency": 4,
                                    "backend.openai": {"model": "tiny", "max_retries": 1, "timeout_s": 60}})
    out = root / "served_run"
    server = (f"{sys.executable} -m llama_cpp.server --model {gguf} --host 127.0.0.1 --port {{port}} --n_ctx 1024 "
              "--n_threads 1 --n_threads_batch 1")
    env = {**ENV, "SYNTH_SERVER_CMD": server, "SYNTH_SERVER_MODEL": "tiny-served", "SYNTH_SERVER_TIMEOUT_S": "120"}
    array, merge, _ = _submit(root, config, out, env=env)
    try:
        tasks = wait_array(array, set(range(N)))
        merged = wait_done(merge, JOB_TIMEOUT_S)
    finally:
        _cancel(array, merge)
    logs = array_logs(root, array)
    assert all(t["JobState"] == "COMPLETED" for t in tasks.values()) and merged["JobState"] == "COMPLETED", logs
    urls = {}
    for i in range(N):
        m = re.search(r"server up after \d+ s: (http://127\.0\.0\.1:(\d+)/v1)", logs[i])
        assert m and "stopping the server" in logs[i], logs[i]
        urls[i] = m[1]
        server_log = (root / f"synth-server-{array}_{i}.log").read_text()
        assert "/v1/chat/completions" in server_log, server_log[-2000:]
        with pytest.raises(OSError):  # stopped with its task
            urllib.request.urlopen(f"{m[1]}/models", timeout=5)
    assert len(set(urls.values())) == N, urls  # each task its own server
    rows = [json.loads(line) for line in (out / "t.web_rewrite.jsonl").read_text().splitlines()]
    assert len(rows) == 6, rows
    backends = {r["provenance"]["backend"]["base_url"] for r in rows}
    assert backends == set(urls.values()), (backends, urls)
    assert {r["provenance"]["backend"]["model"] for r in rows} == {"tiny-served"}
    assert _steps(out)["seeds"] == _steps(references[0])["seeds"]  # the same seeds, whoever answers
