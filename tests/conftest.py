"""Shared fixtures: the bundled tiny assets, and demo params written into a temp project folder."""

# The tests own their environment, whatever the caller exported: set before anything imports
# torch or a Hugging Face client (they read these once). Offline, and an HF_HOME of the run's own,
# so a developer's Hub cache or Accelerate config (which would change how stages launch) plays no
# part; tests that need the Hub (its stand-in) or another HF_HOME set them in their subprocesses.
import atexit
import fcntl
import gc
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="ftstudy-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  HF_HOME=_HF_HOME)
for _name in ("STUDY_TRACEBACK", "HF_ENDPOINT", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
    os.environ.pop(_name, None)
# Under pytest-xdist each worker takes its own share of the usable cores (its CPU affinity, which
# the stages' processes inherit): two workers on two cores each get one, instead of two OpenMP
# thread pools spinning against each other on both (docs/performance.md, "Busy machines"). The
# stages' default thread count (train.cpu_threads: auto) follows the affinity, so every run of a
# test session uses the same count. A test marked serial gets every core back while it runs alone.
ALL_CORES = sorted(os.sched_getaffinity(0))
if _worker := os.environ.get("PYTEST_XDIST_WORKER"):
    _index, _count = int(_worker.removeprefix("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.sched_setaffinity(0, ALL_CORES[_index::_count] or [ALL_CORES[_index % len(ALL_CORES)]])
# OMP_NUM_THREADS is the caller's to leave out: the stages' default (train.cpu_threads: auto) takes
# every usable core whatever else the machine runs, and the tests compare runs bit for bit with it.
os.environ.pop("OMP_NUM_THREADS", None)

import contextlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest
import yaml

from ftstudy.config import set_keys
from ftstudy.data import splits
from ftstudy.synthetic import demo_overrides, no_dropout  # noqa: F401  (no_dropout: for the tests)
from scripts import sandbox
from scripts.sandbox import TIMING, dvc, outcome  # noqa: F401  (the tests' dvc runner, reproducible outcome)

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
TINY_MODEL = ASSETS / "tiny-gpt2"
TINY_WIKI = ASSETS / "tiny-wikitext"


def _short_wiki(articles: int = 25) -> Path:
    """tiny-wikitext with only its first `articles` training articles of 100 (validation and test
    whole), in a temp folder of this process's own: what a stage test checks does not depend on how
    long training runs, and a quarter of the steps is a quarter of the time. The pipeline tests
    (sandboxes) train on the whole demo."""
    folder = Path(tempfile.mkdtemp(prefix="ftstudy-tests-wiki-"))
    atexit.register(shutil.rmtree, folder, True)
    for raw in ("wiki.valid.raw", "wiki.test.raw"):
        shutil.copyfile(TINY_WIKI / raw, folder / raw)
    lines = (TINY_WIKI / "wiki.train.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if splits.ARTICLE_TITLE.fullmatch(line)]
    (folder / "wiki.train.raw").write_text("".join(lines[:starts[articles] - 1]), encoding="utf-8")
    return folder


SHORT_WIKI = _short_wiki()


def demo_params(**overrides) -> dict:
    """params.yaml with assets/demo-params.yaml and dotted `overrides` applied, as a dict, training
    on SHORT_WIKI. The stage tests run in a temp folder without the project's tasks/, so they run no
    benchmarks (tasks.names: [], the stage then writes empty results in a moment) unless they ask:
    the pipeline tests (sandboxes) and tests/test_tasks.py run the demo's."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    set_keys(params, demo_overrides() | {"data.name": str(SHORT_WIKI), "tasks.names": []} | overrides)
    for section in (params["model"], params["data"], *params["data"]["general"]):  # absolute: any cwd works
        section["name"] = str(ROOT / section["name"])
    return params


def params_writer(root: Path):
    """A writer of demo params with dotted overrides into root/params.yaml; it returns `root`."""
    def write(**overrides) -> Path:
        (root / "params.yaml").write_text(yaml.safe_dump(demo_params(**overrides)))
        return root

    return write


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A temp working folder holding a demo params.yaml; returns a writer for more overrides."""
    monkeypatch.chdir(tmp_path)
    write = params_writer(tmp_path)
    write()
    return write


_BUILT: dict = {}


@pytest.fixture(scope="session")
def warm_stages():
    """The stages' processes that the slow tests start (dvc repro in a sandbox, python -m stages...)
    start warm, from one server per test process (ftstudy/warm.py) with this process's environment
    and CPU affinity: those started with other settings (a test's own variables, a serial test's
    cores) start cold, and tests/test_warm.py checks that both give the same bytes."""
    with sandbox.warm_server(dict(os.environ)) as address:
        yield address


def pytest_collection_modifyitems(config, items):
    """Each slow test uses warm_stages, set up before its other fixtures (the demo build's repro
    starts warm). The quick tier starts no server: its stage processes set variables of their own
    (the server declines them), and the preload cost it more than it saved (user CPU 2:50 without
    against 2:58 with, on the 2-core AMD EPYC, 2026-12-05)."""
    for item in items:
        if item.get_closest_marker("slow") is not None and "warm_stages" not in item.fixturenames:
            item.fixturenames.insert(0, "warm_stages")
    # pytest-xdist (--dist loadgroup) hands out groups, largest first, then single tests in this
    # order: the `early` ones first, so that the run does not end on one worker running the longest
    # while the other waits (up to 17 s of the quick tier's 100 s, 2-core AMD EPYC, 2026-12-05).
    items.sort(key=lambda item: item.get_closest_marker("early") is None)


def pytest_unconfigure(config):
    """The test process ends without the collector's last sweeps over everything the libraries made
    (gc.freeze, as a stage's process ends: ftstudy.errors.run_stage): 1.5-2 s of each pytest-xdist
    worker's exit that the run waited for."""
    gc.freeze()


def once(key, build):
    """`build()` once per test process, kept for the process: an expensive module-scoped fixture's
    result, which pytest-xdist may otherwise tear down and build again between tests of one group."""
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def run_main(module, *argv: str) -> None:
    """Run a stage's main() in-process with the given command-line arguments."""
    old = sys.argv
    sys.argv = [module.__name__, *argv]
    try:
        module.main()
    finally:
        sys.argv = old


# The prepare stage's command line in a test folder: prep/, pre/ and m/prepare{,.info}.json.
PREPARE_ARGS = ("--out", "prep", "--pretrained", "pre", "--metrics", "m/prepare.json", "--info", "m/prepare.info.json")


def run_tasks(models=("pretrained", "full", "lora"), folder: str = "models", base: str = "pre") -> None:
    """Stage tasks for each model, into m/tasks/ and task-items/ (compare and report read them)."""
    from stages import tasks

    for model in models:
        run_main(tasks, "--model", f"{folder}/{model}", "--base", base, "--out", f"m/tasks/{model}.json",
                 "--info", f"m/tasks/{model}.info.json", "--items", f"task-items/{model}.npz")


def train_args(tag: str) -> tuple[str, ...]:
    """A training stage's command line in a folder holding prep/ and pre/ (as prepare_in writes
    them): it writes models/<tag>, m/<tag>.json, m/<tag>.info.json, m/plots/<tag> and m/live/<tag>."""
    return ("--data", "prep", "--base", "pre", "--checkpoints", "ckpt", "--out", f"models/{tag}",
            "--metrics", f"m/{tag}.json", "--info", f"m/{tag}.info.json", "--plots", f"m/plots/{tag}",
            "--live", f"m/live/{tag}")


def process_group(pid: int) -> int | None:
    """The process group of `pid`, or None once it is gone: for stopping a test's processes by group."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def prepare_in(project, **overrides) -> Path:
    """Write demo params with `overrides` and run the prepare stage into prep/ and pre/."""
    from stages import prepare

    root = project(**overrides)
    run_main(prepare, *PREPARE_ARGS)
    return root


def prepare_at(root: Path, **overrides) -> Path:
    """prepare_in for a folder that no `project` fixture owns (a module-scoped fixture's): demo
    params with `overrides` written into `root`, and the prepare stage run there."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        return prepare_in(params_writer(root), **overrides)


@contextlib.contextmanager
def pinned(cores):
    """This process on `cores` meanwhile (its CPU affinity), and every process it starts then."""
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def reset_accelerate() -> None:
    """Accelerate keeps its state per process; each in-process stage run starts from none, as a
    launched stage does."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(autouse=True)
def own_environment():
    """What a test sets in os.environ ends with it, whoever set it: the test, a stage it runs
    in-process (stage tasks sets LMEVAL_LOG_LEVEL) or a library it imports (lm-eval sets
    HF_XET_HIGH_PERFORMANCE). The stages that later tests start get this process's environment,
    which the warm server compares with its own: one test that leaked two variables turned every
    later stage of its worker cold (kill-and-resume 142 s against 54 s, 2-core AMD EPYC, 2026-12-05).
    Session and module fixtures set theirs before this snapshot, so theirs last as long as they do."""
    before = dict(os.environ)
    yield
    for key in os.environ.keys() - before.keys():
        del os.environ[key]
    os.environ.update({k: v for k, v in before.items() if os.environ.get(k) != v})


# The pipeline tier: one demo sandbox built for the whole test run (tests copy it before changing it).
SETTINGS = {"train.epochs": 1, "generate.num_samples": 1, "generate.max_new_tokens": 12}
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a test marked `serial` (it measures the machine's load) runs alone: every
    test holds a shared lock on the run's machine.lock from its setup (module fixtures built for it
    included) to its teardown, a serial test an exclusive one, and once a serial test waits, no
    other test starts until it has run."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    shared = item.config._tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's
    waiting = shared / f"serial-waiting-{os.environ['PYTEST_XDIST_WORKER']}"
    serial = item.get_closest_marker("serial") is not None
    with open(shared / "machine.lock", "a") as lock:
        if not serial:
            while any(shared.glob("serial-waiting-*")):
                time.sleep(0.2)
            fcntl.flock(lock, fcntl.LOCK_SH)
            yield  # the lock goes when the file closes
            return
        waiting.touch()
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting.unlink()
        with pinned(ALL_CORES):
            yield


@contextlib.contextmanager
def hanging_network():
    """A local socket that accepts and never answers, as a silent firewall does: yields (its URL,
    the list of connections it saw); every connection is held open until the block ends."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    seen: list = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the block is over
                return
            seen.append(conn)

    listener = threading.Thread(target=accept, daemon=True)
    listener.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    finally:
        try:
            server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept (close alone does not, on Linux)
        except OSError:
            pass
        server.close()
        listener.join(5)
        for conn in seen:
            conn.close()


def behind_a_hanging_network(url: str) -> dict:
    """This process's environment as a newcomer's behind a silent firewall: no Hugging Face variable
    (no offline switch, nor any other that could keep a client off the network) but this run's
    HF_HOME, no TRANSFORMERS_OFFLINE, no DVC_NO_ANALYTICS, no proxy exemption; every proxy variable and
    the Hub's endpoint pointing at `url`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE", "DVC_NO_ANALYTICS")) and k.lower() != "no_proxy"}
    proxies = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    return env | dict.fromkeys(proxies, url) | {"HF_ENDPOINT": url, "HF_HOME": os.environ["HF_HOME"]}


def demo_record(tmp_path_factory) -> Path:
    """Where demo_build keeps its first repro's output, and the connections it saw."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return shared / "pipeline" / "first-repro.json"


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """One demo sandbox, built once for the test run, whatever the number of pytest-xdist workers
    (the first to need it builds it under a lock, in the run's shared temp folder; the others wait
    and read it): (folder, first repro's output, outcome). Tests copy it before changing it.

    Its `dvc repro` runs as a newcomer's would behind a silent firewall (behind_a_hanging_network:
    no offline variable exported, every proxy at a socket that never answers), its stages warm from
    a server with that environment; the connections that socket saw are in the record
    (tests/test_offline.py holds them at none)."""
    record = demo_record(tmp_path_factory)
    dest = record.parent / "sandbox"
    with open(record.parent.parent / "pipeline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not record.is_file():
            with hanging_network() as (url, seen):
                env = behind_a_hanging_network(url)
                with sandbox.warm_server(env, export=False) as address:
                    sandbox.make_sandbox(dest, SETTINGS)
                    first = subprocess.run(["dvc", "repro"], cwd=dest, env=env | {"FTSTUDY_WARM": address or ""},
                                           capture_output=True, text=True, timeout=900)
                connections = len(seen)
            if first.returncode != 0:
                raise sandbox.DvcError(f"dvc repro failed ({first.returncode}):\n{first.stdout}\n{first.stderr}")
            # As a user would (and make demo does): commit the baseline that experiments compare against.
            subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
            subprocess.run(["git", "commit", "-qm", "baseline"], cwd=dest, check=True)
            record.write_text(json.dumps({"stdout": first.stdout, "stderr": first.stderr, "connections": connections}))
    first = json.loads(record.read_text())
    return dest, subprocess.CompletedProcess(["dvc", "repro"], 0, first["stdout"], first["stderr"]), outcome(dest)
