"""The attack suite of the code sandbox (data.verify.isolation, through data.verify.sandbox): every attack is
contained and reported failed / timed out / error, other items keep their own verdicts, and the host is unchanged:
no file outside the sandbox's scratch, no process left, the caller alive. Needs bubblewrap (`apt-get install
bubblewrap`): without it these tests fail with that message."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from data.verify.sandbox import run_python_many

REPO = Path(__file__).parents[3]
MARK = f"phi4attack{uuid.uuid4().hex[:12]}"  # in every attack's file names and spawned command lines
ADD = "def add(a, b):\n    return a + b\n"
BUGGY = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
PASSING_RECORD = json.dumps({"exit": 0, "timed_out": False, "wall_s": 0.1, "cpu_s": 0.1, "stdout": "", "stderr": "",
                             "truncated": False, "result": json.dumps({"probes": [[["I", "5"]], [["I", "0"]]],
                                                                       "done": True})})


def host_processes_with(mark: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mark in cmdline and pid != str(os.getpid()):
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def planted_files() -> list[Path]:
    places = [Path("/tmp"), REPO, Path(sys.prefix), Path(sys.base_prefix), Path.home(), Path("/")]
    return [p for place in places if place.is_dir() for p in place.iterdir() if MARK in p.name]


@pytest.fixture
def host_unchanged():
    """After the test: nothing the attacks spawned is alive and nothing they wrote exists on the host."""
    sandboxes_before = {p.name for p in Path("/tmp").iterdir() if p.name.startswith("phi4-sandbox-")}
    yield
    assert host_processes_with(MARK) == [], "a process started inside the sandbox outlived it"
    assert planted_files() == [], "an attack wrote a file outside the sandbox's scratch"
    leaked = {p.name for p in Path("/tmp").iterdir() if p.name.startswith("phi4-sandbox-")} - sandboxes_before
    assert not leaked, f"temp dirs leaked: {leaked}"


def attack(body: str) -> str:
    """Candidate code: the attack at import time, then a wrong `add` (so only a forged verdict could pass)."""
    return textwrap.dedent(body).replace("MARK", MARK) + "\n" + BUGGY


def run(items, **kw):
    return run_python_many(items, **{"timeout_s": 2.0, **kw})


def test_escaping_the_python_lockdown_spawns_nothing_that_survives(host_unchanged):
    results = run([
        (attack("""
            import sys
            sys.meta_path[:] = [m for m in sys.meta_path if "Block" not in type(m).__name__]
            import subprocess, ctypes
            procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # MARK"])
                     for _ in range(200)]
        """), TESTS),
        (attack("""
            import os, subprocess, sys
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5); open('/tmp/MARK-late', 'w')"
                              "  # MARK"], start_new_session=True)
            if os.fork() == 0:  # a classic daemon: fork, setsid, fork
                os.setsid()
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)  # MARK"])
                os._exit(0)
        """), TESTS),
        (attack("""
            import os
            while True:
                os.fork()
        """), TESTS),
        (ADD, TESTS),
    ])
    assert [r.status for r in results[:3]] == ["failed", "failed", "failed"], [r.reason for r in results]
    assert "BlockingIOError" in results[0].reason or "Resource temporarily unavailable" in results[0].reason
    assert results[3].passed
    assert host_processes_with(MARK) == []  # at once: the PID namespace died with the call
    time.sleep(2.0)  # the detached writer would have written by now


def test_killing_the_caller_and_the_runner_breaks_only_the_attackers_verdict(host_unchanged, tmp_path):
    victim = subprocess.Popen(["sleep", "120"])
    driver = textwrap.dedent(f"""
        import json, os, shutil, sys, tempfile
        sys.path.insert(0, {str(REPO)!r})
        from data.verify.sandbox import run_python_many
        own = tempfile.mkdtemp(dir={str(tmp_path)!r})
        items = json.loads(sys.stdin.read())
        items = [(c.replace("CALLER", str(os.getpid())), t) for c, t in items]
        results = run_python_many(items, timeout_s=2.0)
        shutil.rmtree(own)
        print(json.dumps([r.status for r in results]))
    """)
    kill = attack(f"""
        import os, signal
        for pid in (CALLER, {victim.pid}, os.getppid(), 1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.kill(-1, signal.SIGKILL)
    """)
    stop = attack("""
        import os, signal
        os.kill(os.getppid(), signal.SIGSTOP)
    """)
    items = [(ADD, TESTS), (kill, TESTS), (BUGGY, TESTS), (stop, TESTS), (ADD, TESTS)]
    try:
        done = subprocess.run([sys.executable, "-c", driver], input=json.dumps(items), capture_output=True, text=True,
                              timeout=120)
        assert victim.poll() is None, "a process outside the sandbox was killed"
    finally:
        victim.kill()
        victim.wait()
    assert done.returncode == 0, done.stderr  # the caller survived
    assert json.loads(done.stdout) == ["passed", "error", "failed", "timeout", "passed"]
    assert list(tmp_path.iterdir()) == []  # and cleaned up after itself


def test_forged_results_and_records_are_not_believed(host_unchanged):
    forge_own = attack(r"""
        import gc, json, os, sys
        frame = sys._getframe()
        while frame is not None:  # the runner's state is in this process: rewrite it, then leave
            for value in list(frame.f_locals.values()):
                if isinstance(value, dict) and "probes" in value:
                    value.update(done=True, passed=True, probes=[[["B", True]], [["B", True]]])
            frame = frame.f_back
        secrets = [o for o in gc.get_objects() if isinstance(o, str) and "== 5" in o]
        assert not secrets, secrets  # the expected values never entered the sandbox
        with open(os.path.join(os.path.dirname(os.getcwd()), "result"), "w") as f:
            json.dump({"probes": [[["B", True]], [["B", True]]], "done": True, "passed": True}, f)
        os._exit(0)
    """)
    forge_others = attack(f"""
        import os
        record = ({PASSING_RECORD!r} + "\\n").encode()
        for fd in range(3, 1024):
            try:
                os.write(fd, record)
            except OSError:
                pass
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    for fd in os.listdir(f"/proc/{{pid}}/fd"):
                        with open(f"/proc/{{pid}}/fd/{{fd}}", "wb") as f:
                            f.write(record)
                except OSError:
                    pass
        print({PASSING_RECORD!r})
    """)
    lingering = attack(r"""
        import glob, json, os, time
        if os.fork() == 0:  # stays behind to rewrite the next items' results while they run
            os.setsid()
            forged = json.dumps({"probes": [[["I", "5"]], [["I", "0"]]], "done": True})
            own = os.path.dirname(os.getcwd())
            end = time.time() + 5
            while time.time() < end:
                for path in glob.glob("/tmp/*/result") + glob.glob("/tmp/*/stdout"):
                    if path.startswith(own):
                        continue  # (forging its own values is no more than returning them)
                    try:
                        with open(path, "w") as f:
                            f.write(forged)
                    except OSError:
                        pass
            os._exit(0)
    """)
    too_deep = attack("""
        import os
        with open(os.path.join(os.path.dirname(os.getcwd()), "result"), "w") as f:
            f.write('{"done": true, "probes": ' + "[" * 200_000 + "]" * 200_000 + "}")
        os._exit(0)
    """)
    always_equal = "class Same:\n    def __eq__(self, other):\n        return True\n" \
                   "def add(a, b):\n    return Same()\n"
    int_equal = "class Five(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n" \
                "def add(a, b):\n    return Five(a - b)\n"
    results = run([(forge_own, TESTS), (forge_others, TESTS), (BUGGY, TESTS), (always_equal, TESTS),
                   (int_equal, TESTS), (lingering, TESTS), (BUGGY, TESTS), (too_deep, TESTS), (ADD, TESTS)], workers=1)
    assert [r.status for r in results] == ["failed"] * 8 + ["passed"], [r.reason for r in results]
    assert "True" in results[0].reason  # its forged values were read, and compared with the hidden 5
    assert "Same" in results[3].reason and "-1" in results[4].reason
    assert results[6].reason == "tests.py line 1: assert add(2, 3) == 5 failed (add(2, 3) = -1)"


def test_the_host_filesystem_and_network_are_out_of_reach(host_unchanged, tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"/tmp/{MARK}.sock")
    listener.listen(4)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0{MARK}")
    abstract.listen(4)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    port = tcp.getsockname()[1]
    probe = textwrap.dedent("""
        import os, socket, sys
        def attempt(f, *args):
            try:
                f(*args)
                return "done"
            except OSError as e:
                return type(e).__name__
        def connect(family, address):
            s = socket.socket(family)
            s.settimeout(2)
            return attempt(s.connect, address)
        def write(path):
            return attempt(lambda: open(path, "w").write("x"))
    """)
    refused = ("OSError", "PermissionError", "FileNotFoundError")  # EROFS, or the path is not there at all
    checks = {
        f"write({str(REPO / MARK)!r})": ("FileNotFoundError",),
        f"write({str(Path(sys.prefix) / MARK)!r})": refused,
        "write(os.__file__)": refused,
        "attempt(os.remove, os.__file__)": refused,
        "attempt(lambda: open('/etc/passwd').read())": ("FileNotFoundError",),
        "attempt(os.listdir, '/home')": ("FileNotFoundError",),
        f"attempt(os.listdir, {str(REPO)!r})": ("FileNotFoundError",),
        f"connect(socket.AF_UNIX, '/tmp/{MARK}.sock')": ("FileNotFoundError",),
        f"connect(socket.AF_UNIX, '\\0{MARK}')": ("ConnectionRefusedError",),  # another network namespace
        f"connect(socket.AF_INET, ('127.0.0.1', {port}))": ("ConnectionRefusedError", "OSError"),
        "attempt(os.listdir, '/proc/2/fd')": ("PermissionError",),  # the runner is not dumpable
        "attempt(lambda: open('/proc/2/mem', 'rb'))": ("PermissionError",),
        "attempt(os.kill, 1, 9)": ("PermissionError",),
        f"write('/tmp/{MARK}')": ("done",),  # the private scratch tmpfs, gone with the sandbox
    }
    tests = "\n".join(f"assert {expr} in {want!r}" for expr, want in checks.items())
    tests += "\nassert set(os.listdir('/root')) <= {'.pyenv'}"  # at most the interpreter's own path
    try:
        [result] = run([(probe, tests)])
        listener.setblocking(False)
        abstract.setblocking(False)
        tcp.setblocking(False)
        for server in (listener, abstract, tcp):
            with pytest.raises(BlockingIOError):
                server.accept()  # no connection ever arrived
    finally:
        for server in (listener, abstract, tcp):
            server.close()
        os.unlink(f"/tmp/{MARK}.sock")
    assert result.passed, result.reason


def test_the_code_runs_unprivileged_in_namespaces_of_its_own():
    code = textwrap.dedent("""
        import os, socket
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        caps, no_new_privs = int(status["CapEff"], 16), status["NoNewPrivs"].strip()
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        interfaces = [name for _, name in socket.if_nameindex()]
    """)
    tests = ("assert os.getuid() != 0\nassert os.getuid() != {}\nassert caps == 0\nassert no_new_privs == '1'\n"
             "assert os.getppid() == 2\nassert len(pids) == 3 and pids[:2] == [1, 2]\nassert interfaces == ['lo']\n"
             "assert socket.gethostname() == 'sandbox'").format(os.getuid())
    [result] = run([(code, tests)])
    assert result.passed, result.reason


def test_already_contained_attacks_stay_contained(host_unchanged):
    items = [
        ("while True:\n    pass\n", TESTS),
        ("import time\nwhile True:\n    time.sleep(0.05)\n", TESTS),
        ("x = bytearray(8 * 1024 ** 3)\n", TESTS),
        ("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n", TESTS),
        ("import sys\nwhile True:\n    sys.stdout.write('x' * 100_000_000)\n", TESTS),
        ("import os\nos.write(1, b'y' * 100_000_000)\n" + BUGGY, TESTS),
        (ADD.replace("a + b", "exit(0)"), TESTS),
        ("raise SystemExit(0)\n" + ADD, TESTS),
        ("import os\nos._exit(0)\n" + ADD, TESTS),
        ("import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n" + BUGGY, TESTS),
        ("import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=1)\n" + ADD, TESTS),
    ]
    start = time.monotonic()
    results = run(items, timeout_s=1.0, memory_mb=256, max_output_bytes=1 << 16)
    statuses = [r.status for r in results]
    assert statuses == ["timeout", "timeout", "memory", "memory"] + ["failed"] * 7, [r.reason for r in results]
    assert all(not r.passed for r in results)
    assert all(len(r.stdout) <= 1 << 16 for r in results)
    assert time.monotonic() - start < 30


def test_a_stopped_sandbox_does_not_stall_the_caller(host_unchanged):
    stopper = attack("import os, signal\nos.kill(-1, signal.SIGSTOP)\n")  # every process of the batch
    start = time.monotonic()
    results = run([(stopper, TESTS), (ADD, TESTS)], timeout_s=1.0, workers=1)
    assert [r.status for r in results] == ["timeout", "passed"]
    assert time.monotonic() - start < 30
    assert signal.SIGSTOP  # (the stopped processes died with their namespace: host_unchanged checks)
