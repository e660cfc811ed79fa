"""Run untrusted (model-written) Python code against unit tests in a sandboxed subprocess.

One fresh interpreter (`python -I -S -B`, no site-packages, no PYTHON* variables, minimal environment) runs in a fresh
temporary directory, inside a network namespace (`unshare -n`, or `unshare -rn` as a normal user) when this machine
allows it, and in its own process group. That runner forks one child per item, so items never share memory (they
share the call's working directory). Each child gets an address-space limit (RLIMIT_AS), a CPU-time limit
(RLIMIT_CPU), a file-size limit that also caps its output, a wall-clock limit enforced by the runner (SIGKILL), stdin
from /dev/null, and a lockdown preamble: socket creation, process creation and the networking/process/ctypes modules
are refused. Without a network namespace the preamble is the only network barrier and it is best effort: determined
code can undo it. The outer process group is killed at the end, whatever happened.

A child passes only when its tests ran to the end: it then writes a per-run random nonce to a pipe, so code that calls
`os._exit(0)` before the tests does not pass (best effort too: the nonce is in the forked child's memory).
"""
from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

STATUSES = ("passed", "failed", "timeout", "memory", "error")


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed (an assertion or exception) | timeout | memory | error (syntax error, sandbox fault)
    stdout: str
    stderr: str
    duration_s: float
    returncode: int | None = None  # child exit code; negative = killed by that signal; None = never finished


# The runner is trusted code, written into the temp dir and run by the sandboxed interpreter. Exit codes of a child:
# 0 tests ran to the end, 1 an exception (assertion included), 2 syntax error, 3 MemoryError.
_RUNNER = r'''
import builtins, json, os, resource, select, signal, sys, time, traceback
import socket, _socket, posix  # imported before the lockdown so it can patch them

BLOCKED = {"ssl", "_ssl", "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "ctypes", "_ctypes",
           "socketserver", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib", "urllib.request",
           "http.client", "http.server", "xmlrpc", "pty", "webbrowser", "asyncio", "select", "selectors"}


class _BlockImports:
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.split(".")[0] in BLOCKED:
            raise ImportError(f"import of {name} is disabled in the sandbox")
        return None


def _refuse(*args, **kwargs):
    raise PermissionError("network and process creation are disabled in the sandbox")


class _NoSocket:
    def __init__(self, *args, **kwargs):
        _refuse()


def _lockdown():
    for mod in (socket, _socket):
        for name in ("socket", "SocketType"):
            setattr(mod, name, _NoSocket)
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        setattr(socket, name, _refuse)
    for mod in (os, posix):
        for name in dir(mod):
            if name.startswith(("exec", "spawn", "fork", "posix_spawn")) or name in (
                    "system", "popen", "kill", "killpg", "setsid", "setpgid", "setpgrp"):
                setattr(mod, name, _refuse)
    for name in list(sys.modules):
        if name in BLOCKED or name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, _BlockImports())


def _child(item, index, job, w_fd, nonce):
    code = 1
    try:
        for fd, kind in ((1, "out"), (2, "err")):
            path = os.path.join(job["io_dir"], f"{kind}_{index}.txt")
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(job["work_dir"])  # shared by the items of one call (a directory each costs ms on busy disks)
        cpu_s = job["cpu_s"]
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        try:
            solution = compile(item["code"], "solution.py", "exec")
            tests = compile(item["tests"], "tests.py", "exec")
        except (SyntaxError, ValueError):
            traceback.print_exc()
            code = 2
            return
        _lockdown()
        namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        exec(solution, namespace)
        exec(tests, namespace)
        sys.stdout.flush()
        os.write(w_fd, nonce.encode())
        code = 0
    except MemoryError:
        code = 3
        try:
            os.write(2, b"MemoryError: the sandbox memory limit was reached\n")
        except BaseException:
            pass
    except BaseException:
        code = 1
        try:
            traceback.print_exc()
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


def _wait(pid, timeout_s, start):
    """Wait for `pid` up to `timeout_s` of wall time; returns (status word, rusage, timed_out)."""
    ready = None
    if hasattr(os, "pidfd_open"):  # Linux >= 5.3: sleep exactly until the child exits
        try:
            fd = os.pidfd_open(pid)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            ready = lambda wait_s: poller.poll(max(0.0, wait_s) * 1000)
        except OSError:
            ready = None
    delay = 0.0005
    while True:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid:
            return status, usage, False
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            return status, usage, True
        if ready is not None:
            ready(left)
        else:
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.01)


def main():
    nonce = sys.stdin.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    with open("job.json") as f:
        job = json.load(f)
    os.unlink("job.json")
    memory = job["memory_bytes"]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["max_output_bytes"], job["max_output_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for index, item in enumerate(job["items"]):
        r_fd, w_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(r_fd)
            _child(item, index, job, w_fd, nonce)
        os.close(w_fd)
        status, usage, timed_out = _wait(pid, job["timeout_s"], start)
        duration = time.monotonic() - start
        os.set_blocking(r_fd, False)
        try:
            proof = os.read(r_fd, 256).decode(errors="replace")
        except BlockingIOError:
            proof = ""
        os.close(r_fd)
        record = {"index": index, "returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "duration_s": duration, "proof": proof == nonce}
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


main()
'''


@functools.lru_cache(maxsize=None)
def _network_prefix() -> tuple[str, ...]:
    """The command prefix that puts the sandbox in an empty network namespace here, or () when none works."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "-n"), ("unshare", "-rn")):
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], capture_output=True,
                                   timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def network_isolation() -> str:
    """How the sandbox keeps code off the network on this machine: 'unshare -n', 'unshare -rn' or 'preamble'."""
    return " ".join(_network_prefix()) or "preamble"


def _read_capped(path: str, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _classify(record: dict, stderr: str, cpu_limit_s: int) -> str:
    rc = record["returncode"]
    if record["timed_out"] or rc == -signal.SIGXCPU:
        return "timeout"
    if rc == -signal.SIGKILL:  # hard CPU limit, or the kernel's OOM killer
        return "timeout" if record["cpu_s"] >= cpu_limit_s else "memory"
    if rc == 0:
        return "passed" if record["proof"] else "failed"  # exit 0 without the nonce: left before the tests ended
    if rc == 2:
        return "error"
    if rc == 3 or (rc < 0 and "memory" in stderr.lower()):
        return "memory"
    if rc == 1 or rc == -signal.SIGXFSZ or rc > 0:  # exception, output over the limit, or an explicit exit code
        return "failed"
    return "error"  # killed by another signal (SIGSEGV, ...)


def run_python_many(items: list[tuple[str, str]], timeout_s: float = 5.0, memory_mb: int = 512,
                    max_output_bytes: int = 1 << 20, isolate_network: bool = True) -> list[SandboxResult]:
    """Run each (code, tests) pair in its own forked child of one sandboxed interpreter; limits are per item.
    Code sees the standard library only. `isolate_network=False` skips the network namespace (preamble only)."""
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0:
        raise ValueError(f"sandbox limits must be positive: timeout_s={timeout_s}, memory_mb={memory_mb}, "
                         f"max_output_bytes={max_output_bytes}")
    if not items:
        return []
    for i, item in enumerate(items):
        if len(item) != 2 or not all(isinstance(s, str) for s in item):
            raise TypeError(f"sandbox item {i}: expected a (code: str, tests: str) pair, got {type(item).__name__}")
    cpu_limit_s = max(1, math.ceil(timeout_s))
    tmp = tempfile.mkdtemp(prefix="phi4-sandbox-")
    try:
        io_dir, work_dir = os.path.join(tmp, "io"), os.path.join(tmp, "work")
        os.mkdir(io_dir)
        os.mkdir(work_dir)
        with open(os.path.join(tmp, "runner.py"), "w") as f:
            f.write(_RUNNER)
        job = {"items": [{"code": c, "tests": t} for c, t in items], "timeout_s": timeout_s, "cpu_s": cpu_limit_s,
               "memory_bytes": memory_mb << 20, "max_output_bytes": max_output_bytes, "io_dir": io_dir,
               "work_dir": work_dir}
        with open(os.path.join(tmp, "job.json"), "w") as f:
            json.dump(job, f)
        env = {"PATH": os.defpath, "HOME": work_dir, "TMPDIR": work_dir, "LC_ALL": "C.UTF-8"}
        cmd = [*(_network_prefix() if isolate_network else ()), sys.executable, "-I", "-S", "-B", "runner.py"]
        # Per-item wall limits are enforced inside; this outer limit only catches a runner that is itself stuck.
        outer_limit_s = len(items) * (timeout_s + 0.5) + 10.0
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(input=(secrets.token_hex(16) + "\n").encode(), timeout=outer_limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, err = proc.communicate()
        finally:
            _kill_group(proc.pid)  # whatever the children left behind
        elapsed = time.monotonic() - start
        records = {}
        for line in out.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
                records[record["index"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        runner_err = err.decode(errors="replace")[-4000:]
        results = []
        for i in range(len(items)):
            if i not in records:
                results.append(SandboxResult(False, "error", "", f"sandbox runner failed (exit {proc.returncode}); "
                                             f"item {i} has no result\n{runner_err}", elapsed, None))
                continue
            record = records[i]
            stdout = _read_capped(os.path.join(io_dir, f"out_{i}.txt"), max_output_bytes)
            stderr = _read_capped(os.path.join(io_dir, f"err_{i}.txt"), max_output_bytes)
            status = _classify(record, stderr, cpu_limit_s)
            results.append(SandboxResult(status == "passed", status, stdout, stderr, record["duration_s"],
                                         record["returncode"]))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_python(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 1 << 20, isolate_network: bool = True) -> SandboxResult:
    """Run `code` then `tests` (top-level asserts) in the sandbox; passed only if the tests ran to the end."""
    return run_python_many([(code, tests)], timeout_s, memory_mb, max_output_bytes, isolate_network)[0]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
