"""The trusted runner inside the sandbox (standard library only: the sandbox sees no repository).

`data/verify/isolation.py` runs this file's text as `python -I -S -B -c <text> <mode>` and writes the job
(marshal) to its stdin. It imports only built-in and C modules: json, traceback, shutil and signal would pull in re
and enum, most of a sandbox's start-up time. Modes: `root` (bubblewrap started as root, leaving this process only
CAP_SETUID/CAP_SETGID: it drops to the job's unprivileged uid first, which also makes it non-dumpable), `user`
(bubblewrap run by an unprivileged user: it makes itself non-dumpable with prctl), `unsafe` (no bubblewrap: the
Python-level lockdown below, best effort only).

Items run one at a time, each in a forked child with its own limits, cwd, stdin and output files in a fresh scratch
directory. The child runs the candidate's code, then the test steps, and writes the probes' values (type-tagged JSON,
see data/verify/values.py) to a file. When the child has ended (or was killed at the wall-clock limit), every other
process of the item is killed (kill(-1) inside the PID namespace), its files are read (capped), the scratch is
emptied, and one JSON record goes to that item's own pipe, which the host opened and no child ever holds. Being
non-dumpable, this process cannot be ptraced and its /proc/<pid>/fd and memory cannot be opened by the items'
processes (which share its uid). Catchable signals are ignored; SIGKILL or SIGSTOP from an item only breaks the
batch, which the host detects.
"""
import _json
import _signal
import builtins
import gc
import marshal
import os
import resource
import select
import stat
import sys
import time

# Captured before any candidate runs: the encoder keeps working when the tested code patches builtins.
_isinstance, _type, _list, _len = isinstance, type, list, len
_SIGNALS = [getattr(_signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
                                         "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGVTALRM", "SIGPROF")]
_MAX_DEPTH = 100


def _dumps(obj):
    """JSON text of dicts, lists, str, int, float, bool and None (the records and results this runner writes)."""
    if obj is None:
        return "null"
    if obj is True or obj is False:
        return "true" if obj else "false"
    if _type(obj) is str:
        return _json.encode_basestring_ascii(obj)
    if _type(obj) is int:
        return int.__repr__(obj)
    if _type(obj) is float:
        return float.__repr__(obj)
    if _type(obj) is dict:
        return "{" + ", ".join(_json.encode_basestring_ascii(k) + ": " + _dumps(v) for k, v in obj.items()) + "}"
    return "[" + ", ".join(_dumps(v) for v in obj) + "]"


def _describe(e):
    return f"{_type(e).__name__}: {e}"[-2000:]


def encode(value, depth=0):
    """Type-tagged JSON-ready form of a builtin value; ["?", type name] for anything else."""
    if depth > _MAX_DEPTH:
        return ["?", "value nested too deeply"]
    if value is None:
        return ["N"]
    if _isinstance(value, bool):
        return ["B", value is True]
    if _isinstance(value, int):
        try:
            return ["I", int.__repr__(value)]
        except ValueError:  # over Python's int-to-str digit limit
            return ["?", "int with too many digits"]
    if _isinstance(value, float):
        return ["F", float.__repr__(value)]
    if _isinstance(value, complex):
        return ["C", float.__repr__(float(value.real)), float.__repr__(float(value.imag))]
    if _isinstance(value, str):
        return ["S", str.__str__(value)]
    if _isinstance(value, bytes):
        return ["Y", bytes.hex(value)]
    for kind, tag in ((list, "L"), (tuple, "T"), (set, "E"), (frozenset, "Z")):
        if _isinstance(value, kind):
            return [tag, [encode(v, depth + 1) for v in _list(value)]]
    if _isinstance(value, dict):
        return ["D", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in _list(dict.items(value))]]
    return ["?", _type(value).__name__]


def _lockdown():
    """unsafe mode only: refuse process creation, sockets and their modules. Determined code can undo this."""
    blocked = {"subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing", "ctypes", "_ctypes", "socket",
               "_socket", "ssl", "_ssl", "asyncio", "pty", "select", "selectors", "signal"}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ImportError(f"import of {name} is disabled in the unsafe-local sandbox")

    def refuse(*args, **kwargs):
        raise PermissionError("process creation and signals are disabled in the unsafe-local sandbox")

    for name in dir(os):
        if name.startswith(("exec", "spawn", "fork", "posix_spawn")) or name in (
                "system", "popen", "kill", "killpg", "setsid", "setpgid", "pidfd_open"):
            setattr(os, name, refuse)
    for name in _list(sys.modules):
        if name.split(".")[0] in blocked:
            del sys.modules[name]
    sys.meta_path.insert(0, Blocker())


def _open_out(path):
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)


def _enter_box(item, box, job):
    """In the forked child: its files as stdin/stdout/stderr, its own cwd, its limits, no other descriptor."""
    os.setsid()
    os.closerange(3, 1 << 16)  # every item's pipe, the runner's own files
    fd = os.open(os.path.join(box, "stdin") if item.get("stdin") is not None else os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.dup2(_open_out(os.path.join(box, "stdout")), 1)
    os.dup2(_open_out(os.path.join(box, "stderr")), 2)
    os.closerange(3, 1 << 16)
    work = os.path.join(box, "work")
    os.chdir(work)
    os.environ.update(HOME=work, TMPDIR=work)
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    for sig in _SIGNALS:
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    limits = job["limits"]
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    for res, value in ((resource.RLIMIT_AS, limits["memory_bytes"]), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_FSIZE, limits["max_output_bytes"]), (resource.RLIMIT_NOFILE, 256)):
        resource.setrlimit(res, (value, value))
    if job["mode"] != "unsafe":  # without a uid of its own it would count (or, as root, ignore) all the user's jobs
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))


def _run_item(item, job):
    """The candidate's code, then the test steps: the probes' encoded values, or what stopped them."""
    result = {"probes": []}
    program = item["steps"] is None
    try:
        code = compile(item["code"], "solution.py", "exec")
    except (SyntaxError, ValueError) as e:
        result["syntax"] = _describe(e)
        return result
    if job["mode"] == "unsafe":
        _lockdown()
    namespace = {"__name__": "__main__" if program else "__sandbox__", "__builtins__": builtins}
    try:
        exec(code, namespace)
        for kind, source, lineno in item["steps"] or ():
            padded = "\n" * (lineno - 1)  # tracebacks name the test's own line
            if kind == "exec":
                exec(compile(padded + source, "tests.py", "exec"), namespace)
            else:
                values = []
                for expr in source:
                    values.append(encode(eval(compile(padded + "(" + expr + ")", "tests.py", "eval"), namespace)))
                result["probes"].append(values)
        result["done"] = True
    except SystemExit as e:  # a program may end with sys.exit(); in a function task it ends the tests early
        if program and e.code in (None, 0):
            result["done"] = True
        else:
            result["error"] = f"SystemExit: {e.code!r}"
    except BaseException as e:
        result["error"] = _describe(e)
        result["memory"] = _isinstance(e, MemoryError)
        try:
            sys.__excepthook__(_type(e), e, e.__traceback__.tb_next)  # to its stderr, from the item's frames on
        except BaseException:
            pass
    return result


def _child(item, box, job):
    """Runs in the forked child; never returns."""
    try:
        _enter_box(item, box, job)
        result = _run_item(item, job)
    except BaseException as e:  # the runner's own set-up failed: a sandbox fault, not the item's
        result = {"fault": _describe(e)}
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BaseException:
        pass
    try:
        fd = _open_out(os.path.join(box, "result"))
        data = _dumps(result).encode()
        if _len(data) > job["limits"]["max_output_bytes"]:
            data = b'{"probes": [], "error": "the tested values are over the output limit"}'
        os.write(fd, data)
    except BaseException:
        pass
    os._exit(0)


def _wait(pid, timeout_s):
    """(wait status, rusage, timed_out) of the child, killed with SIGKILL after `timeout_s` of wall time."""
    start = time.monotonic()
    fd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while True:
            wpid, status, usage = os.wait4(pid, os.WNOHANG)
            if wpid:
                return status, usage, False
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                os.kill(pid, _signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                return status, usage, True
            poller.poll(max(1, int(left * 1000)))
    finally:
        os.close(fd)


def _kill_rest(mode, pid):
    """Kill every process the item left behind. In the sandbox's own PID namespace that is every process but this one
    and its init (kill(-1) spares both); without one, only the child's process group (a daemon escapes)."""
    if mode == "unsafe":
        try:
            os.killpg(pid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    me = str(os.getpid())
    for _ in range(1000):
        try:
            os.kill(-1, _signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        alive = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and entry not in ("1", me):
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                            alive.append(entry)
                except (OSError, IndexError):
                    pass
        if not alive:
            return
        time.sleep(0.001)
    raise RuntimeError(f"processes {alive} survived SIGKILL")


def _read_capped(path, limit):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None, False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device left by the item
            return None, False
        data = os.read(fd, limit + 1)
        return data[:limit].decode("utf-8", errors="replace"), _len(data) > limit
    finally:
        os.close(fd)


def _remove(path):
    try:
        os.chmod(path, 0o700, follow_symlinks=False)  # the item may have made it read-only
    except OSError:
        pass
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            for entry in os.scandir(path):
                _remove(entry.path)
            os.rmdir(path)
        else:
            os.unlink(path)
    except (OSError, RecursionError):
        pass


def _wipe(scratch):
    """Remove everything in the scratch directory, so the next item starts from an empty one."""
    for entry in os.scandir(scratch):
        _remove(entry.path)


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _warm_up():
    """Exercise compile, exec, eval, the encoder and text files once here, so each forked child finds the
    interpreter's lazily built state ready instead of building (and page-copying) it again: ~3 ms per item."""
    namespace = {"__builtins__": builtins}
    exec(compile("def f(a, b):\n    return [a + b, 'x', (1.5, None)]\n", "solution.py", "exec"), namespace)
    _dumps({"probes": [[encode(eval(compile("\n(f(1, 2))", "tests.py", "eval"), namespace))]], "done": True})
    _describe(ValueError("warm-up"))
    open(os.devnull, "w", encoding="utf-8").close()


def main():
    mode = sys.argv[1]
    for sig in _SIGNALS:
        _signal.signal(sig, _signal.SIG_IGN)
    chunks = []
    while chunk := os.read(0, 1 << 20):
        chunks.append(chunk)
    job = marshal.loads(b"".join(chunks))  # written by the host (trusted) with the same interpreter
    job["mode"] = mode
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if mode == "root":
        uid = job["uid"]
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise SystemExit(f"runner: could not drop to uid {uid}")
    elif mode == "user":
        import ctypes  # PR_SET_DUMPABLE = 4: no ptrace, no /proc/<pid>/{fd,mem} for same-uid processes
        if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:
            raise SystemExit("runner: prctl(PR_SET_DUMPABLE, 0) failed")
    scratch = job["scratch"]
    limits = job["limits"]
    _warm_up()
    _write_all(job["ready"], b"ready\n")  # the host starts the first item's clock now, not at bwrap's start
    os.close(job["ready"])
    for index, (item, channel) in enumerate(zip(job["items"], job["channels"])):
        box = os.path.join(scratch, f"item-{index}-{os.urandom(8).hex()}")
        os.mkdir(box, 0o700)
        os.mkdir(os.path.join(box, "work"), 0o700)
        if item.get("stdin") is not None:
            with open(os.path.join(box, "stdin"), "w", encoding="utf-8") as f:
                f.write(item["stdin"])
        start = time.monotonic()
        gc.freeze()  # objects made so far: the child's collector never touches (copies) their pages
        pid = os.fork()
        if pid == 0:
            _child(item, box, job)
        status, usage, timed_out = _wait(pid, limits["timeout_s"])
        wall_s = time.monotonic() - start
        _kill_rest(mode, pid)
        cap = limits["max_output_bytes"]
        stdout, out_cut = _read_capped(os.path.join(box, "stdout"), cap)
        stderr, err_cut = _read_capped(os.path.join(box, "stderr"), cap)
        result, _ = _read_capped(os.path.join(box, "result"), cap)
        _wipe(scratch)
        record = {"exit": os.waitstatus_to_exitcode(status), "timed_out": timed_out, "wall_s": wall_s,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "result": result, "stdout": stdout or "",
                  "stderr": stderr or "", "truncated": out_cut or err_cut}
        _write_all(channel, (_dumps(record) + "\n").encode())
        os.close(channel)


main()
