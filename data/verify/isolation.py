"""The OS-level sandbox for untrusted (model-written) Python: bubblewrap, batches, one pipe per item.

Isolation is bubblewrap's (`bwrap`, Debian package `bubblewrap`, the tool Flatpak uses): every sandbox gets its own
PID, network, IPC, UTS and mount namespaces, no new privileges, a read-only view of the system's /usr and the Python
installation only (no /etc, /home, /root, repository, virtual environment or host /proc), a fresh /proc of its own
PID namespace, a minimal /dev and a size-capped tmpfs /tmp as the only writable place. Started as root, bwrap keeps
only CAP_SETUID/CAP_SETGID for the trusted runner, which drops to a fresh unprivileged uid (one per sandbox, so no
process count or signal crosses sandboxes); started by a normal user, it runs in a user namespace as that user.
`--die-with-parent` ties the sandbox to this process and the PID namespace dies with its init, so nothing outlives
a call. Inside, `data/verify/sandbox_runner.py` runs the items of a batch one after another, each in a forked
child with RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE (which also caps stdout/stderr), RLIMIT_NPROC and a wall-clock
limit, and kills all the item's processes before the next one.

Each item's record comes back through its own pipe. When a batch breaks while item k runs (its runner killed,
stopped, or silent past the limit), item k is run again in a sandbox of its own, whose outcome is final, and the
items after it in a new batch, so one item cannot change the outcome of another.

Without bubblewrap every call raises SandboxUnavailable saying what to install, unless PHI4_SANDBOX=unsafe-local
opts into the old Python-level best effort (no OS isolation: for a trusted machine and trusted code only).
"""
from __future__ import annotations

import functools
import json
import marshal
import math
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SETTING = "PHI4_SANDBOX"  # "bwrap" (the default) or "unsafe-local"
INSTALL_HINT = ("the code sandbox needs bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install "
                "bubblewrap`; to run model-written code without OS isolation anyway, set PHI4_SANDBOX=unsafe-local")
MAX_BATCH = 64  # items per sandbox start (one pipe each)
_RUNNER = (Path(__file__).parent / "sandbox_runner.py").read_text(encoding="utf-8")
_STARTUP_S = 20.0  # bwrap + interpreter start on a loaded machine, before the first item's own limit counts
_SLACK_S = 2.0  # per item, past its wall limit: killing, reading and cleaning up after it
_UID_RANGE = (1 << 30, (1 << 30) + (1 << 24))  # uids no account uses: one per sandbox when started as root


class SandboxUnavailable(RuntimeError):
    """No usable OS-level sandbox on this machine (and the unsafe mode was not chosen)."""


class SandboxStartError(SandboxUnavailable):
    """A sandbox failed to start (no item had run yet)."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    max_processes: int = 8  # tasks (processes and threads) an item may have at once; memory bound: x memory_mb
    scratch_mb: int = 64

    def __post_init__(self):
        bad = {k: v for k, v in vars(self).items() if not v > 0}
        if bad:
            raise ValueError(f"sandbox limits must be positive: {bad}")


def mode() -> str:
    """'bwrap' or 'unsafe-local', from PHI4_SANDBOX (checked here so a typo is not a silent downgrade)."""
    value = os.environ.get(SETTING, "bwrap") or "bwrap"
    if value not in ("bwrap", "unsafe-local"):
        raise ValueError(f"{SETTING}={value!r}: expected 'bwrap' (the default) or 'unsafe-local'")
    return value


def _python() -> tuple[str, list[str]]:
    """The base interpreter (never a venv's) and the directories it needs read-only."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe))}
    dirs = sorted(d for d in dirs if d != "/usr" and not d.startswith("/usr/"))
    return exe, [d for d in dirs if not any(d.startswith(other + "/") for other in dirs)]  # outermost only


def _bwrap_command(bwrap: str, as_root: bool, limits: Limits, disable_userns: bool) -> list[str]:
    cmd = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
           "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox", "--cap-drop", "ALL"]
    if as_root:
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--uid", "65534", "--gid", "65534"] + (["--disable-userns"] * disable_userns)
    cmd += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    exe, dirs = _python()
    made = set()
    for d in dirs:
        parts = Path(d).parts
        for i in range(2, len(parts)):  # bwrap would create the parents 0700: the dropped uid could not pass
            parent = str(Path(*parts[:i]))
            if parent not in made:
                made.add(parent)
                cmd += ["--perms", "0755", "--dir", parent]
        cmd += ["--ro-bind", d, d]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--size", str(limits.scratch_mb << 20),
            "--tmpfs", "/tmp", "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "LC_ALL", "C.UTF-8", "--", exe, "-I", "-S", "-B", "-c", _RUNNER, "root" if as_root else "user"]
    return cmd


@functools.lru_cache(maxsize=1)
def _bwrap_ready() -> tuple[str, bool]:
    """(bwrap's path, whether it has --disable-userns), once bwrap has been seen to start a sandbox here."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(f"bwrap not found on PATH: {INSTALL_HINT}")
    helptext = subprocess.run([bwrap, "--help"], capture_output=True, text=True).stdout
    disable_userns = "--disable-userns" in helptext
    cmd = _bwrap_command(bwrap, os.geteuid() == 0, Limits(), disable_userns)
    cmd = cmd[:cmd.index("-c")] + ["-c", "import os; print(os.getpid())"]
    probe = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or probe.stdout.strip() != "2":
        raise SandboxUnavailable(f"bwrap is installed but could not start a sandbox here (exit {probe.returncode}: "
                                 f"{probe.stderr.strip()[-500:]}); unprivileged users need user namespaces "
                                 f"(sysctl kernel.unprivileged_userns_clone=1); or {INSTALL_HINT}")
    return bwrap, disable_userns


def isolation() -> str:
    """How code is isolated on this machine, in words; raises SandboxUnavailable when it cannot be."""
    if mode() == "unsafe-local":
        return "unsafe-local (no OS isolation: Python-level lockdown only)"
    _bwrap_ready()
    return "bwrap as root, dropping to a fresh uid" if os.geteuid() == 0 else "bwrap in a user namespace"


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap's own processes; the sandbox dies with them
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, ValueError, OSError):  # the sandbox died or was killed first
        pass


def _run_batch(jobs: list[dict], limits: Limits) -> tuple[list[dict], dict | None]:
    """Records of the leading items that completed, and why the batch stopped early (None when it did not):
    {'broken': reason, 'timed_out': bool}."""
    unsafe = mode() == "unsafe-local"
    pipes = [os.pipe() for _ in jobs]
    scratch = tempfile.mkdtemp(prefix="phi4-sandbox-") if unsafe else "/tmp"
    as_root = os.geteuid() == 0
    job = {"items": jobs, "channels": [w for _, w in pipes], "scratch": scratch,
           "uid": random.SystemRandom().randrange(*_UID_RANGE),
           "limits": {"timeout_s": limits.timeout_s, "cpu_s": max(1, math.ceil(limits.timeout_s)),
                      "memory_bytes": limits.memory_mb << 20, "max_output_bytes": limits.max_output_bytes,
                      # its processes and threads, plus the runner (and bwrap's init as a user): one uid
                      "max_processes": limits.max_processes + 2}}
    if unsafe:
        cmd, env = [sys.executable, "-I", "-S", "-B", "-c", _RUNNER, "unsafe"], {
            "PATH": os.defpath, "LC_ALL": "C.UTF-8"}
    else:
        bwrap, disable_userns = _bwrap_ready()
        cmd, env = _bwrap_command(bwrap, as_root, limits, disable_userns), {"PATH": os.defpath}
    records, broke, finished = [], None, False
    proc = None
    ready = os.pipe()
    open_fds = {fd for pipe in pipes + [ready] for fd in pipe}
    try:
        job["ready"] = ready[1]  # the runner's "ready" line, before the first item
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                pass_fds=[ready[1]] + job["channels"], start_new_session=True,
                                cwd=scratch if unsafe else "/", env=env)
        for _, w in pipes + [ready]:  # the sandbox holds the write ends now: EOF means the writer is done
            os.close(w)
            open_fds.discard(w)
        # Fed from a thread: a sandbox that never reads must not block us past the start-up deadline.
        threading.Thread(target=_feed, args=(proc.stdin, marshal.dumps(job)), daemon=True).start()
        records, broke = _collect(proc, ready[0], [r for r, _ in pipes], limits)
        finished = broke is None
    finally:
        for fd in open_fds:  # each exactly once: other threads' pipes may reuse a closed number
            os.close(fd)
        if proc is not None:
            if finished:  # let it exit by itself (its CPU time is then counted as ours); then make sure
                try:
                    proc.wait(timeout=_SLACK_S)
                except subprocess.TimeoutExpired:
                    pass
            _kill(proc)
            proc.stderr.close()  # (stdin is the feeding thread's to close)
        if unsafe:
            shutil.rmtree(scratch, ignore_errors=True)
    return records, broke


def _collect(proc: subprocess.Popen, ready: int, reads: list[int], limits: Limits) -> tuple[list[dict], dict | None]:
    """Read each item's pipe in turn; the item under way gets its wall limit plus slack, then the batch is broken.
    Raises SandboxStartError when the sandbox did not start (no item ran: nothing to blame on one)."""
    cap = 8 * limits.max_output_bytes + (1 << 20)  # JSON escapes can grow text sixfold
    sel = selectors.DefaultSelector()
    for k, fd in enumerate(reads):
        sel.register(fd, selectors.EVENT_READ, k)
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(ready, selectors.EVENT_READ, "ready")
    bufs, ended, early = [bytearray() for _ in reads], [False] * len(reads), set()
    stderr, started = bytearray(), bytearray()
    records, current = [], 0
    deadline = time.monotonic() + _STARTUP_S
    try:
        while current < len(reads):
            left = deadline - time.monotonic()
            if left <= 0 and len(started) < 6:
                raise SandboxStartError(f"the sandbox did not start within {_STARTUP_S:.0f} s: "
                                        f"{stderr.decode(errors='replace').strip()[-2000:]}")
            if left <= 0:
                return records, {"broken": f"the sandbox gave no result within {limits.timeout_s + _SLACK_S:.0f} s",
                                 "timed_out": True}
            for key, _ in sel.select(left):
                if key.data in ("stderr", "ready"):
                    chunk = os.read(key.fd, 1 << 16)
                    kept = stderr if key.data == "stderr" else started
                    kept += chunk[:max(0, 8192 - len(kept))]
                    if not chunk:
                        sel.unregister(key.fd)
                        if key.data == "ready" and started != b"ready\n":
                            raise SandboxStartError(f"the sandbox did not start (exit {proc.poll()}): "
                                                    f"{stderr.decode(errors='replace').strip()[-2000:]}")
                    elif key.data == "ready" and started == b"ready\n":
                        deadline = time.monotonic() + limits.timeout_s + _SLACK_S
                    continue
                k = key.data
                chunk = os.read(key.fd, 1 << 20)
                if not chunk:
                    ended[k] = True
                    sel.unregister(key.fd)
                elif k != current:
                    early.add(k)  # data before its turn: only a subverted runner writes that
                else:
                    bufs[k] += chunk
                    if len(bufs[k]) > cap:
                        return records, {"broken": "the sandbox sent an oversized record", "timed_out": False}
            while current < len(reads) and ended[current]:
                record = _parse_record(bufs[current]) if current not in early else None
                if record is None:
                    why = stderr.decode(errors="replace").strip()[-2000:]
                    return records, {"broken": f"the sandbox runner stopped while this item ran"
                                               f"{': ' + why if why else ''}", "timed_out": False}
                records.append(record)
                current += 1
                deadline = time.monotonic() + limits.timeout_s + _SLACK_S
        return records, None
    finally:
        sel.close()


def _parse_record(data: bytes) -> dict | None:
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    keys = {"exit": int, "timed_out": bool, "wall_s": float, "cpu_s": float, "stdout": str, "stderr": str,
            "truncated": bool}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in keys.items()) or not (
            record.get("result") is None or isinstance(record["result"], str)):
        return None
    return record


def _start_batch(jobs: list[dict], limits: Limits) -> tuple[list[dict], dict | None]:
    try:
        return _run_batch(jobs, limits)
    except SandboxStartError:  # once more, in case the machine was briefly out of processes or memory
        return _run_batch(jobs, limits)


def execute(jobs: list[dict], limits: Limits, workers: int | None = None) -> list[dict]:
    """Run jobs ({'code', 'steps', 'stdin'}) in sandboxes, up to `workers` at once; one record per job, or
    {'broken': reason, 'timed_out': bool} for a job whose own sandbox broke while it ran."""
    if mode() == "bwrap":
        _bwrap_ready()
    n = len(jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, n or 1))
    batches = max(workers, math.ceil(n / MAX_BATCH))
    pending = [(list(range(n))[b::batches], False) for b in range(min(batches, n))]
    out: list = [None] * n
    while pending:
        with ThreadPoolExecutor(min(workers, len(pending))) as pool:
            ran = list(pool.map(lambda p: _start_batch([jobs[i] for i in p[0]], limits), pending))
        retry = []
        for (indices, alone), (records, broke) in zip(pending, ran):
            for i, record in zip(indices, records):
                out[i] = record
            if broke is not None:
                k, rest = indices[len(records)], indices[len(records) + 1:]
                if alone:
                    out[k] = broke
                else:
                    retry.append(([k], True))
                    if rest:
                        retry.append((rest, False))
        pending = retry
    return out
