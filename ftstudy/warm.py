"""A warm start for the stages: one process that has imported torch, transformers and Accelerate
forks a copy of itself for each `python -m stages.<name>` that asks, so a stage starts in a tenth of
a second instead of the 5-9 s those imports take on a small CPU, while DVC still runs one process
per stage, with its caching, locks and run-cache as they are.

    python -m ftstudy.warm serve --socket PATH     (started and stopped by `make demo` and the tests)
    FTSTUDY_WARM=PATH dvc repro                    (a stage's process asks PATH first)

A stage's process sees FTSTUDY_WARM in stages/__init__.py, before it imports anything heavy, and
sends its command, working folder, environment, CPU affinity and standard streams (the file
descriptors themselves) over the Unix socket. The server forks a worker that takes all of them on,
drops every module of this project (the stage imports its own copy from its own folder, as it
would cold), and runs the module as `python -m` does; the asking process relays signals to it and
exits with its status, or dies by its signal. Nothing is started warm unless it would start the same
cold: the server declines, and the stage starts cold, when the environment (DVC's own DVC_*
variables aside), interpreter, its flags, sys.path or the CPU affinity differ from the server's, or
when no server answers. A worker whose asking process is gone (SIGKILLed with its process group)
kills itself. The server preloads only libraries every model stage imports anyway, and not PEFT,
bitsandbytes or lm-eval, so a worker's modules and memory at start are a cold stage's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import struct
import sys
from contextlib import contextmanager

ADDRESS_VAR = "FTSTUDY_WARM"
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "accelerate")
# Variables no library reads at import: DVC's own (its tools read them at run time), the shell's and
# pyenv's bookkeeping (its shims add to PYENV_HOOK_PATH at each level), and the address itself.
VOLATILE = ("DVC_", "PYENV_", "_PYENV_", ADDRESS_VAR)
SHELL_VARS = {"_", "PWD", "OLDPWD", "SHLVL"}
OWN = ("ftstudy", "stages")
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_HEADER = struct.Struct("!I")


def _facts() -> dict:
    """What a warm worker must share with the process it stands in for, raw (the server compares)."""
    return {"environ": dict(os.environ), "path": sys.path[1:], "executable": sys.executable, "flags": list(sys.flags),
            "xoptions": sys._xoptions, "warnoptions": sys.warnoptions, "affinity": sorted(os.sched_getaffinity(0))}


def _identity(facts: dict) -> dict:
    """The facts that must be equal: the environment without the variables no library reads."""
    env = {k: v for k, v in facts.get("environ", {}).items() if not k.startswith(VOLATILE) and k not in SHELL_VARS}
    return {k: facts.get(k) for k in ("path", "executable", "flags", "xoptions", "warnoptions", "affinity")} | {"env": env}


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
    returns (and the stage starts cold) when no server answers or it declines."""
    module = sys.orig_argv[sys.orig_argv.index("-m") + 1]
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
        request = {"module": module, "args": sys.argv[1:], "orig_argv": sys.orig_argv, "cwd": os.getcwd(),
                   "umask": os.umask(0o022), **_facts()}
        os.umask(request["umask"])
        socket.send_fds(sock, [b"w"], [0, 1, 2])
        _send(sock, request)
        answer = _receive(sock)
    except OSError:
        return
    if answer is None or "pid" not in answer:
        return
    pid = answer["pid"]
    for signum in RELAYED:
        signal.signal(signum, lambda signum, _frame: os.kill(pid, signum))
    end = _receive(sock)
    if end is None:
        print(f"{module}: its warm worker ({pid}) ended without a status", file=sys.stderr)
        os._exit(1)
    if "signal" in end:
        signal.signal(end["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), end["signal"])
    os._exit(end["exit"])


# The serving side.

def _reopen_std() -> None:
    """Standard streams over the asking process's descriptors, buffered as Python's own start makes
    them: stdout line-buffered on a terminal, stderr always; written through under PYTHONUNBUFFERED.
    The encodings are the server's, which has the same environment."""
    raw = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, mode: str, like, line: bool) -> io.TextIOWrapper:
        binary = io.open(fd, mode + "b", buffering=0 if raw and mode == "w" else -1, closefd=False)
        return io.TextIOWrapper(binary, encoding=like.encoding, errors=like.errors, line_buffering=line,
                                write_through=raw and mode == "w")

    sys.stdin = stream(0, "r", sys.__stdin__, False)
    sys.stdout = stream(1, "w", sys.__stdout__, os.isatty(1))
    sys.stderr = stream(2, "w", sys.__stderr__, True)


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
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["environ"])
    _reopen_std()
    def orphaned() -> None:  # the asking process gone (killed with its process group) takes its worker along
        try:
            conn.recv(1)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=orphaned, daemon=True).start()
    for name in [m for m in sys.modules if m.split(".")[0] in OWN]:
        del sys.modules[name]
    sys.path[0] = request["cwd"]
    sys.orig_argv = request["orig_argv"]
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
    try:
        threading._shutdown()
    except Exception:
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            pass
    if killed_by:  # as Python does after an uncaught KeyboardInterrupt
        signal.signal(killed_by, signal.SIG_DFL)
        os.kill(os.getpid(), killed_by)
    os._exit(status)


def serve(address: str) -> None:
    """Preload, listen on `address`, fork a worker per request; ends on SIGTERM or SIGINT."""
    import importlib

    own = json.loads(json.dumps(_identity(_facts())))
    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # What the imports themselves set (torch sets TORCHINDUCTOR_CACHE_DIR), as they would cold.
    imported_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
    waiting: dict[int, socket.socket] = {}

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

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, stop)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address + ".binding")
    listener.listen(16)
    os.rename(address + ".binding", address)  # there only once it listens
    print(f"warm: serving {address} (pid {os.getpid()}; preloaded {', '.join(PRELOAD)})", file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            try:
                _, fds, _, _ = socket.recv_fds(conn, 1, 3)
                request = _receive(conn)
            except OSError:
                conn.close()
                continue
            theirs = _identity(request or {})
            if theirs != own or len(fds) != 3:
                differs = sorted(k for k in own if theirs.get(k) != own[k]) or ["descriptors"]
                if "env" in differs:
                    differs[differs.index("env")] = "env (" + ", ".join(sorted(
                        k for k in theirs["env"].keys() | own["env"].keys() if theirs["env"].get(k) != own["env"].get(k))) + ")"
                print(f"warm: declined {request and request.get('module')}: its {', '.join(differs)} differ",
                      file=sys.stderr, flush=True)
                try:
                    _send(conn, {"declined": differs})
                except OSError:
                    pass
                conn.close()
                for fd in fds:
                    os.close(fd)
                continue
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])  # the worker in `waiting` before it can end
            pid = os.fork()
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
                listener.close()
                for other in waiting.values():
                    other.close()
                _work(conn, fds, request | {"environ": request["environ"] | imported_env})
            waiting[pid] = conn
            for fd in fds:
                os.close(fd)
            print(f"warm: {request['module']} in {request['cwd']}: worker {pid}", file=sys.stderr, flush=True)
            try:
                _send(conn, {"pid": pid})
            except OSError:
                pass  # the asking process is gone: its worker sees so and ends
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    finally:
        listener.close()
        if os.path.exists(address):
            os.unlink(address)


@contextmanager
def server(env: dict, ready_s: float = 120.0):
    """A server started with `env` on a fresh socket, for the duration: FTSTUDY_WARM names it in
    this process's environment, so the stages' processes started meanwhile with os.environ ask it.
    Yields the address, or None (and stages start cold) when it is not up within `ready_s`; stopped
    by its handle. Its log (a line a request) is `log` beside the socket."""
    import shutil
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="ftstudy-warm-"))
    address = str(folder / "socket")
    with open(folder / "log", "w") as log:
        # `python` as dvc.yaml's commands name it, through the same PATH (and any shim's settings).
        proc = subprocess.Popen(["python", "-m", "ftstudy.warm", "serve", "--socket", address],
                                cwd=Path(__file__).resolve().parents[1], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    earlier = os.environ.get(ADDRESS_VAR)
    try:
        deadline = time.monotonic() + ready_s
        while not os.path.exists(address) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        up = os.path.exists(address)
        if up:
            os.environ[ADDRESS_VAR] = address
        yield address if up else None
    finally:
        if earlier is None:
            os.environ.pop(ADDRESS_VAR, None)
        else:
            os.environ[ADDRESS_VAR] = earlier
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["serve"])
    ap.add_argument("--socket", required=True, help="the Unix socket's path (what FTSTUDY_WARM names)")
    serve(ap.parse_args().socket)


if __name__ == "__main__":
    main()
