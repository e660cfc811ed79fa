"""The code oracle's sandbox (data.verify.sandbox over data.verify.isolation): statuses, limits, program tasks,
batches, the PHI4_SANDBOX setting and both ways of starting bubblewrap (as root, as a normal user). Needs bubblewrap
(`apt-get install bubblewrap`): without it these tests fail with that message. The attacks are in test_isolation.py."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from data.verify import isolation as iso
from data.verify.sandbox import (
    SandboxUnavailable,
    UncheckableTests,
    isolation,
    run_program_many,
    run_python,
    run_python_many,
)

REPO = Path(__file__).parents[3]
ADD = "def add(a, b):\n    return a + b\n"


def test_pass_fail_syntax_and_exception_statuses():
    results = run_python_many([
        (ADD, "assert add(2, 3) == 5\nprint('ran')"),
        (ADD, "assert add(2, 3) == 6"),
        ("def add(a, b:\n    return a\n", "assert add(1, 1) == 2"),
        ("def add(a, b):\n    return a + undefined_name\n", "assert add(1, 1) == 2"),
        (ADD, "import math\nx = math.floor(2.5)\nassert add(x, 1) == 3\ny = 1 / 0\nassert add(0, 0) == 0"),
    ], timeout_s=5.0)
    assert [r.status for r in results] == ["passed", "failed", "error", "failed", "failed"]
    assert [r.passed for r in results] == [True, False, False, False, False]
    assert results[0].stdout == "ran\n"  # setup statements of the tests run inside, in order
    assert results[1].reason == "tests.py line 1: assert add(2, 3) == 6 failed (add(2, 3) = 5)"
    assert "SyntaxError" in results[2].reason
    assert "NameError" in results[3].reason and 'solution.py", line 2' in results[3].stderr
    assert "ZeroDivisionError" in results[4].reason and 'tests.py", line 4' in results[4].stderr


def test_limits_time_memory_output():
    start = time.monotonic()
    busy, sleepy, big, flood = run_python_many([
        ("while True:\n    pass\n", "assert f() == 1"),
        ("import time\nwhile True:\n    time.sleep(0.05)\n", "assert f() == 1"),
        ("x = bytearray(1 << 30)\n", "assert f() == 1"),
        ("while True:\n    print('x' * 1000)\n", "assert f() == 1"),
    ], timeout_s=1.0, memory_mb=256, max_output_bytes=20_000)
    assert busy.status == sleepy.status == "timeout"  # wall clock, not only CPU time
    assert busy.duration_s < 3.0 and sleepy.duration_s < 3.0
    assert big.status == "memory" and "MemoryError" in big.reason
    assert flood.status == "failed" and len(flood.stdout) <= 20_000
    assert time.monotonic() - start < 20.0


def test_leaving_early_does_not_pass():
    results = run_python_many([("import os\nos._exit(0)\n" + ADD, "assert add(1, 1) == 2"),
                               ("import sys\nsys.exit(0)\n" + ADD, "assert add(1, 1) == 2"),
                               (ADD, "import sys\nsys.exit(0)\nassert add(1, 1) == 3")])
    assert [r.status for r in results] == ["failed"] * 3
    assert results[0].returncode == 0 and "before its tests finished" in results[0].reason
    assert "SystemExit" in results[1].reason


def test_items_of_one_batch_share_nothing():
    results = run_python_many([
        ("import builtins, os\nbuiltins.len = lambda x: 0\nn = len([1])\nopen('note.txt', 'w').write('x')\n"
         "open('/tmp/shared.txt', 'w').write('x')\nos.environ['LEAK'] = '1'\n", "assert n == 0"),
        ("import os\nn = len([1, 2])\nleft = [os.path.exists('note.txt'), os.path.exists('/tmp/shared.txt'), "
         "'LEAK' in os.environ, os.listdir('.')]\n", "assert n == 2\nassert left == [False, False, False, []]"),
        ("import os\ncwd = os.getcwd()\n", f"assert cwd.startswith('/tmp/')\nassert {str(REPO)!r} not in cwd"),
    ], workers=1)
    assert [r.status for r in results] == ["passed"] * 3, [r.reason for r in results]


def test_programs_read_stdin_and_their_stdout_is_compared_outside():
    echo = "import sys\nfor line in sys.stdin:\n    print(int(line) * 2)\n"
    main_guard = "def main():\n    print(input()[::-1])\nif __name__ == '__main__':\n    main()\n"
    results = run_program_many([
        (echo, "1\n2\n", "2\n4\n"),
        (echo, "1\n2\n", "2   \n4\n\n\n"),  # trailing whitespace does not count
        (echo, "1\n2\n", "2\n5\n"),
        (main_guard, "abc\n", "cba"),
        ("print('ok')\nraise SystemExit(0)\n", "", "ok"),
        ("print('ok')\nraise SystemExit(3)\n", "", "ok"),
        ("import os\nos.write(1, b'ok\\n')\nos._exit(0)\n", "", "ok"),  # ended without finishing its run
        ("while True: pass", "", ""),
    ], timeout_s=1.0)
    assert [r.status for r in results] == ["passed", "passed", "failed", "passed", "passed", "failed", "failed",
                                           "timeout"]
    assert results[2].stdout == "2\n4\n" and "differs" in results[2].reason


def test_many_items_over_parallel_sandboxes_keep_their_order():
    items = [(f"def f():\n    return {i}\n", f"assert f() == {i if i % 3 else -1}") for i in range(150)]
    results = run_python_many(items, workers=2)
    assert [r.passed for r in results] == [i % 3 != 0 for i in range(150)]
    assert len({r.reason for r in results if not r.passed}) == 50  # each names its own value


def test_bad_arguments_and_uncheckable_tests_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python(ADD, "assert add(1, 1) == 2", timeout_s=0)
    with pytest.raises(TypeError, match="item 0"):
        run_python_many([(ADD,)])
    with pytest.raises(UncheckableTests, match="sandbox item 1: line 2: this assert is inside a For"):
        run_python_many([(ADD, "assert add(1, 1) == 2"), (ADD, "for i in range(3):\n    assert add(i, 0) == i")])
    with pytest.raises(UncheckableTests, match="no top-level assert"):
        run_python(ADD, "pass")


def test_the_setting_picks_the_mode_and_a_typo_is_refused(monkeypatch):
    monkeypatch.setenv("PHI4_SANDBOX", "bubblewrap")
    with pytest.raises(ValueError, match="PHI4_SANDBOX='bubblewrap'"):
        run_python(ADD, "assert add(1, 1) == 2")
    monkeypatch.setenv("PHI4_SANDBOX", "unsafe-local")
    assert isolation().startswith("unsafe-local")
    results = run_python_many([(ADD, "assert add(1, 1) == 2"), (ADD, "assert add(1, 1) == 3"),
                               ("import subprocess\n" + ADD, "assert add(1, 1) == 2")])
    assert [r.status for r in results] == ["passed", "failed", "failed"]  # the old lockdown, verdicts outside


def test_without_bubblewrap_it_refuses_and_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on this PATH
    iso._bwrap_ready.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap.*PHI4_SANDBOX=unsafe-local"):
            run_python(ADD, "assert add(1, 1) == 2")
    finally:
        monkeypatch.undo()
        iso._bwrap_ready.cache_clear()


def test_bubblewrap_is_here():
    """Fails (never skips) on a machine without a working bubblewrap, naming what to install."""
    assert shutil.which("bwrap"), iso.INSTALL_HINT
    assert isolation().startswith("bwrap"), isolation()


def _unprivileged_python() -> str:
    """An interpreter that uid 65534 can run and bwrap (as that uid) can bind: the system's, usually."""
    for exe in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        probe = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", exe, "-c",
                                "import ctypes"], capture_output=True)
        if probe.returncode == 0:
            return exe
    pytest.fail("no Python interpreter that uid 65534 can run with ctypes (apt-get install python3 util-linux)")


def test_an_unprivileged_caller_gets_the_user_namespace_mode():
    """As root this runs a caller as uid 65534 (bwrap then builds a user namespace); as a user, it runs as is."""
    script = textwrap.dedent("""
        import json
        from data.verify.sandbox import isolation, run_python_many
        probe = ("import os\\ndef proc_fd():\\n    try:\\n        return os.listdir('/proc/2/fd')\\n"
                 "    except OSError as e:\\n        return type(e).__name__\\n")
        results = run_python_many([("def add(a, b):\\n    return a + b\\n", "assert add(2, 3) == 5"),
                                   ("def add(a, b):\\n    return a - b\\n", "assert add(2, 3) == 5"),
                                   (probe, "assert proc_fd() == 'PermissionError'"),
                                   ("import os\\nwhile True:\\n    os.fork()\\n", "assert f() == 1")])
        print(json.dumps([isolation()] + [r.status for r in results]))
    """)
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", _unprivileged_python()]
    else:
        command = [sys.executable]
    done = subprocess.run(command + ["-c", script], capture_output=True, text=True, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/tmp"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '["bwrap in a user namespace", "passed", "failed", "passed", "failed"]'
