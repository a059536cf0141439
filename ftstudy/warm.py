"""A warm start for the stages: one process that has imported torch, transformers and Accelerate
forks a copy of itself for each `python -m stages.<name>` that asks, so a stage starts in a tenth of
a second instead of the 5-9 s those imports take on a small CPU; DVC still runs one process per
stage, with its caching, locks and run-cache as they are (docs/performance.md, "Stage start-up").

    python -m ftstudy.warm serve --socket PATH     (started and stopped by `make demo` and the tests)
    FTSTUDY_WARM=PATH dvc repro                    (a stage's process asks PATH first)

The asker (stages/__init__.py, before any heavy import) sends its command, folder, environment,
CPU affinity and standard streams (the descriptors themselves); the server forks a worker that
takes them on, drops this project's modules (the stage imports its own copy, as cold) and runs the
module as `python -m` does, in a process group of its own, to which the asker relays signals; the
asker exits with the worker's status, or dies by its signal. The server declines, and the stage
starts cold, when the environment (variables no library reads at import aside), interpreter,
flags, sys.path or CPU affinity differ. A stage about to set a variable that a preloaded library
read at import calls `start_cold`. A worker whose asker is gone kills its group. Nothing is
preloaded that a model stage does not import anyway (not PEFT, bitsandbytes or lm-eval).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import signal
import socket
import struct
import sys

ADDRESS_VAR = "FTSTUDY_WARM"
WORKER_VAR = "FTSTUDY_WARM_WORKER"  # "<pid>:<fd>" in a worker: its connection to its asker
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "accelerate")
# Variables no library reads at import: DVC's and its queue's (Celery, billiard), a Dask worker's
# parent's pid (for distributed's process titles), pytest's current test, the shell's and pyenv's
# bookkeeping (its shims add to PYENV_HOOK_PATH at each level), ours; the two that scikit-learn's
# import sets for Intel's OpenMP, which reads them when it starts its runtime (in the worker, with
# the asker's environment), not when it is loaded; the address that torch's inductor sets in a
# process that loads compiled code, just before it loads it (its children inherit a stale one); and
# a terminal's size, which shells and tools set and progress bars read when they draw.
VOLATILE = ("DVC_", "CELERY_", "_MP_FORK_", "__DASK_PARENT_PID", "PYTEST_CURRENT_TEST", "PYENV_", "_PYENV_", ADDRESS_VAR)
IGNORED_VARS = {"_", "PWD", "OLDPWD", "SHLVL", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "COLUMNS", "LINES"}
OWN = ("ftstudy", "stages")
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ANSWER_S = 60.0  # how long an asker waits for the server's answer
REQUEST_S = 5.0  # how long the server waits for a request, well within the asker's wait
_HEADER = struct.Struct("!I")


def _facts() -> dict:
    """What a warm worker must share with the process it stands in for, raw (the server compares)."""
    argv = sys.orig_argv
    return {"environ": dict(os.environ), "path": sys.path[1:], "executable": sys.executable,
            # the interpreter itself: python and python3.11 (or a shim's choice) are one
            "interpreter": [os.path.realpath(sys.executable), sys.prefix, sys.exec_prefix], "flags": list(sys.flags),
            "options": argv[1:argv.index("-m")] if "-m" in argv else argv[1:],  # -u, -X ...: as python was started
            "xoptions": sys._xoptions, "warnoptions": sys.warnoptions, "affinity": sorted(os.sched_getaffinity(0))}


def _identity(facts: dict, imported_env: dict) -> dict:
    """The facts that must be equal: the environment without the variables no library reads at
    import, nor those the preloaded imports set themselves to the same value (torch's
    TORCHINDUCTOR_CACHE_DIR, in a process that imported torch before it started a stage)."""
    env = {k: v for k, v in facts.get("environ", {}).items()
           if not k.startswith(VOLATILE) and k not in IGNORED_VARS and imported_env.get(k) != v}
    keys = ("path", "interpreter", "flags", "options", "xoptions", "warnoptions", "affinity")
    return {k: facts.get(k) for k in keys} | {"env": env}


def _send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _receive(sock: socket.socket) -> dict | None:
    """One message, or None when the other end closed."""
    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(_HEADER.size)
    body = header and exactly(_HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


# The asking side: a stage's own process.

def forward(address: str) -> None:
    """Run this `python -m stages.<name>` process's stage in a warm worker and exit with its status;
    returns (and the stage starts cold) when no server answers, it declines, or the stage asked to
    start cold (start_cold)."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        module = sys.orig_argv[sys.orig_argv.index("-m") + 1]
        sock.settimeout(ANSWER_S)
        sock.connect(address)
        request = {"module": module, "args": sys.argv[1:], "orig_argv": sys.orig_argv, "cwd": os.getcwd(),
                   "umask": os.umask(0o022), **_facts()}
        os.umask(request["umask"])
        socket.send_fds(sock, [b"w"], [0, 1, 2])
        _send(sock, request)
        answer = _receive(sock)
    except (OSError, ValueError):
        answer = None  # a timeout included: closing the socket ends a worker started meanwhile
    if answer is None or "pid" not in answer:
        sock.close()
        return
    group = answer["pid"]  # the worker leads a process group of its own from its first instruction

    def relay(signum, _frame) -> None:
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            pass

    before = {signum: signal.signal(signum, relay) for signum in RELAYED}
    sock.settimeout(None)
    try:  # the worker's own end, or the server's report of its death
        end = _receive(sock)
    except OSError:
        end = None
    if end is None:
        print(f"{module}: its warm worker ({group}) ended without a status", file=sys.stderr)
        os._exit(1)
    if "cold" in end:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        sock.close()
        print(f"{module}: started cold, for {end['cold']}", file=sys.stderr)
        return
    if "signal" in end:
        if end["signal"] not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(end["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), end["signal"])
    os._exit(end["exit"])


def start_cold(reason: str, imported: str) -> None:
    """In a warm worker where `imported` was imported already (by the server, with its settings):
    end the worker, and its asker runs the stage from the top in its own process, where a setting
    made before that import counts. Anywhere else, nothing. Call it before any output is written."""
    pid, _, fd = os.environ.get(WORKER_VAR, "").partition(":")
    if pid != str(os.getpid()) or imported not in sys.modules:
        return
    try:
        _send(socket.socket(fileno=os.dup(int(fd))), {"cold": reason})
    except (OSError, ValueError):
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


# The serving side.

def _reopen_std() -> None:
    """Standard streams over the asking process's descriptors, made as Python's own start makes
    them: names, newline, stdout line-buffered on a terminal, stderr always, written through under
    PYTHONUNBUFFERED; the encodings are the server's, which has the same environment."""
    raw = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, name: str, like) -> io.TextIOWrapper:
        write = fd > 0
        binary = io.FileIO(fd, "wb" if write else "rb", closefd=False)
        binary.name = f"<{name}>"
        if not (raw and write):
            binary = (io.BufferedWriter if write else io.BufferedReader)(binary)
        return io.TextIOWrapper(binary, encoding=like.encoding, errors=like.errors, newline="\n",
                                line_buffering=fd == 2 or (fd == 1 and os.isatty(1)), write_through=raw and write)

    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        made = stream(fd, name, getattr(sys, f"__{name}__"))
        setattr(sys, name, made)
        setattr(sys, f"__{name}__", made)


def _exit_status(code) -> int:
    """The status Python gives a process that ends with SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _work(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the forked worker: become the asking process, run its module, never return."""
    import atexit
    import runpy
    import threading
    import types

    for signum in (*RELAYED, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [*RELAYED, signal.SIGCHLD])  # held since before the fork
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["environ"] | {WORKER_VAR: f"{os.getpid()}:{conn.fileno()}"})
    _reopen_std()

    def orphaned() -> None:  # the asker gone (killed with its process group) takes the worker's along
        try:
            conn.recv(1)
        finally:
            os.killpg(0, signal.SIGKILL)

    threading.Thread(target=orphaned, daemon=True).start()
    for name in [m for m in sys.modules if m.split(".")[0] in OWN]:
        del sys.modules[name]
    sys.path[0] = request["cwd"]
    sys.orig_argv, sys.executable = request["orig_argv"], request["executable"]
    # Not "-m" while the module is found, so stages/__init__.py does not forward it again.
    sys.argv = ["warm", *request["args"]]
    sys.modules["__main__"] = types.ModuleType("__main__")
    killed_by = None
    try:
        runpy._run_module_as_main(request["module"])
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException as error:
        sys.excepthook(*sys.exc_info())
        status, killed_by = 1, signal.SIGINT if isinstance(error, KeyboardInterrupt) else None
    # What Python does on its way out: wait for threads, run atexit functions, flush.
    for step in (threading._shutdown, atexit._run_exitfuncs, sys.stdout.flush, sys.stderr.flush):
        try:
            step()
        except BaseException:
            pass
    try:  # the end, told by the worker itself: the server may be gone by now
        _send(conn, {"signal": killed_by} if killed_by else {"exit": status})
    except OSError:
        pass
    if killed_by:  # as Python does after an uncaught KeyboardInterrupt
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(status)


def _request(conn: socket.socket) -> tuple[list[int], dict | None]:
    """The asker's descriptors and request; closes the descriptors and raises if it fails."""
    fds: list[int] = []
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        return fds, _receive(conn)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _dismiss(conn: socket.socket, fds: list[int], answer: dict) -> None:
    """Answer an asker that starts cold, and let go of its connection and descriptors."""
    try:
        _send(conn, answer)
    except OSError:
        pass
    conn.close()
    for fd in fds:
        os.close(fd)


def serve(address: str) -> None:
    """Listen on `address`, preload, then fork a worker per request; ends on SIGTERM or SIGINT.
    Askers that come while it preloads wait for it (up to ANSWER_S): the socket is there at once,
    so whoever started the server goes on with other work (make demo: the sandbox, dvc's start)."""
    import importlib

    server = os.getpid()
    before = dict(os.environ)
    waiting: dict[int, socket.socket] = {}

    def log(line: str) -> None:
        print(f"warm: {line}", file=sys.stderr, flush=True)

    def reap(_signum, _frame) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if conn := waiting.pop(pid, None):
                end = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
                try:
                    _send(conn, end)
                except OSError:
                    pass
                conn.close()

    def stop(_signum, _frame) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address + ".binding")
    listener.listen(16)
    os.rename(address + ".binding", address)  # there only once it listens
    try:
        for name in PRELOAD:
            importlib.import_module(name)
        # What the imports themselves set (torch: TORCHINDUCTOR_CACHE_DIR), as they would cold.
        imported_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
        own = json.loads(json.dumps(_identity(_facts() | {"environ": before}, {})))
        signal.signal(signal.SIGCHLD, reap)  # after the imports: any child of theirs is theirs to wait for
        log(f"serving {address} (pid {server}; preloaded {', '.join(PRELOAD)})")
        while True:
            conn, _ = listener.accept()
            conn.settimeout(REQUEST_S)
            try:
                fds, request = _request(conn)
            except Exception as error:  # a broken, silent or malformed request: that asker starts cold
                log(f"dropped a request: {error!r}")
                conn.close()
                continue
            theirs = _identity(request or {}, imported_env)
            if theirs != own or len(fds) != 3:
                differs = sorted(k for k in own if theirs.get(k) != own[k]) or ["descriptors"]
                if "env" in differs:
                    keys = sorted(k for k in theirs["env"].keys() | own["env"].keys()
                                  if theirs["env"].get(k) != own["env"].get(k))
                    differs[differs.index("env")] = f"env ({', '.join(keys)})"
                log(f"declined {(request or {}).get('module')}: its {', '.join(differs)} differ")
                _dismiss(conn, fds, {"declined": differs})
                continue
            conn.settimeout(None)
            # Held until the worker is in `waiting`, and in the worker until its handlers are its own.
            held = [*RELAYED, signal.SIGCHLD]
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as error:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
                log(f"could not fork for {request['module']}: {error}")
                _dismiss(conn, fds, {"declined": ["fork"]})
                continue
            if pid == 0:
                try:
                    os.setpgid(0, 0)  # a group of its own, which the asker's relayed signals reach whole
                    listener.close()
                    for other in waiting.values():
                        other.close()
                    _work(conn, fds, request | {"environ": request["environ"] | imported_env})
                finally:
                    os._exit(1)  # never back into the server's loop
            waiting[pid] = conn
            try:
                os.setpgid(pid, pid)  # as the worker does: either comes first, before the asker learns the pid
            except OSError:
                pass
            for fd in fds:
                os.close(fd)
            log(f"{request['module']} in {request['cwd']}: worker {pid}")
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass  # the asker is gone: its worker sees so and ends
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    finally:
        if os.getpid() == server:
            listener.close()
            if os.path.exists(address):
                os.unlink(address)
            gc.freeze()  # it ends as a stage's process does (ftstudy.errors.run_stage): no last sweeps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["serve"])
    ap.add_argument("--socket", required=True, help="the Unix socket's path (what FTSTUDY_WARM names)")
    serve(ap.parse_args().socket)


if __name__ == "__main__":
    main()
