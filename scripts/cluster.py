"""The study's trials on a Dask cluster (`make study BACKEND=dask`, `python -m scripts.study --backend dask`).

DVC's own pattern for several machines: each worker works in its own clone and pushes its
experiment; the coordinator pulls them. Here each grid point is one Dask task that
- asks for one unit of a worker resource (`GPU` on a GPU cluster, `slots` on a LocalCluster),
- clones the study's commit from the git remote into the worker's scratch space (a fresh folder
  for every attempt, removed afterwards),
- runs `dvc exp run --pull -n <name> -S seed=... -S full.lr=... -S lora.lr=...`: the stages the
  point leaves unchanged (prepare, the pretrained model's scores) come from the DVC remote instead
  of running again,
- pushes its outputs to the DVC remote (the model folders only when asked: 9 full copies of an
  8B model is 150 GB), then, last, the experiment's ref to the git remote (`dvc exp push`), so a
  ref on the remote always has its outputs there.

Every command of a trial runs under a guard in its own process group that dies with its worker
(the guard kills the group once its parent, the worker, is gone), so a killed worker's `dvc exp
run` can never push later (torchrun's training processes, under a multi-GPU trial, sit in
sessions of their own, out of the guard's reach: they may run on, with nothing left to push). The scheduler reruns a dead worker's trial elsewhere (Dask's
allowed-failures, 3 by default); a trial that fails for a reason of its own is reported once with
its error, not retried. Names are deterministic (`s<seed>-f<full.lr>-l<lora.lr>` under the study's
commit), and a trial whose ref is already on the remote does nothing, so a rerun or a retry never
pushes one point twice. The coordinator then `dvc exp pull`s every point's ref (metrics live in
git) and the study reads them as it reads the local queue's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.sandbox import refuse_uncommitted

# Runs every command of a trial: its own session and process group (start_new_session), the command
# its child; when the worker that started it dies (its parent pid changes), the whole group is killed.
GUARD = """
import os, signal, subprocess, sys
parent = os.getppid()
child = subprocess.Popen(sys.argv[1:])
while True:
    try:
        sys.exit(child.wait(timeout=0.5))
    except subprocess.TimeoutExpired:
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)
"""
# The training stages' model folders: pushed only with --push-models.
MODEL_STAGES = ("train_full", "train_lora")


def _git(repo: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=check).stdout.strip()


def set_args(values: dict) -> list[str]:
    """`dvc exp run`'s -S arguments for params `values` (key -> value)."""
    return [a for k, v in values.items() for a in ("-S", f"{k}={v}")]


def exp_ref(commit: str, name: str) -> str:
    """Where DVC keeps experiment `name` of baseline `commit`, here and on a git remote."""
    return f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"


def remote_refs(git_url: str, pattern: str) -> dict[str, str]:
    """ref -> commit on the git remote, for refs matching `pattern`."""
    out = subprocess.run(["git", "ls-remote", git_url, pattern], capture_output=True, text=True, check=True).stdout
    return {ref: sha for sha, ref in (line.split("\t") for line in out.splitlines() if line)}


def pushable_outputs(repo: Path, push_models: bool) -> list[str]:
    """The DVC-cached outputs of `repo`'s pipeline (the metrics live in git), less the training
    stages' model folders unless `push_models`."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return [o.def_path for stage in dvc_repo.index.stages for o in stage.outs if o.use_cache and
                (push_models or not (stage.name in MODEL_STAGES and o.def_path.startswith("models/")))]


def trial(spec: dict) -> dict:
    """One grid point, on a Dask worker (see the module's text). Returns what it did; raises
    RuntimeError with the failing command's last lines when the trial fails for its own reason."""
    name, commit, git_url = spec["name"], spec["commit"], spec["git_url"]
    if remote_refs(git_url, exp_ref(commit, name)):
        return {"name": name, "ran": False}
    try:
        from distributed import get_worker

        scratch = get_worker().local_directory
    except (ImportError, ValueError):
        scratch = tempfile.gettempdir()
    work = Path(tempfile.mkdtemp(prefix=f"ftstudy-{name}-", dir=scratch))
    log = work / "trial.log"
    repo = work / "repo"

    def step(*cmd: str, cwd: Path = repo) -> None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.run([sys.executable, "-c", GUARD, *cmd], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                  start_new_session=True).returncode
        if code != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({code}):\n" + "\n".join(tail))

    dvc = (sys.executable, "-m", "dvc")
    try:
        step("git", "clone", "--quiet", "--no-checkout", git_url, str(repo), cwd=work)
        step("git", "checkout", "--quiet", commit)
        step("git", "config", "user.name", spec["author"][0])
        step("git", "config", "user.email", spec["author"][1])
        step(*dvc, "remote", "add", "--local", "--default", "--force", spec["dvc_name"], spec["dvc_url"])
        step(*dvc, "exp", "run", "--pull", "-n", name, *set_args(spec["set"]))
        step(*dvc, "push", "--remote", spec["dvc_name"], *pushable_outputs(repo, spec["push_models"]))
        if not remote_refs(git_url, exp_ref(commit, name)):  # another attempt of this point may have pushed meanwhile
            step(*dvc, "exp", "push", "--no-cache", git_url, name)  # last: the ref only once its outputs are there
        stages = re.findall(r"^Running stage '([^']+)'", log.read_text(encoding="utf-8", errors="replace"), re.M)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"name": name, "ran": True, "stages": stages}


def study_remotes(repo: Path, git_remote: str, dvc_remote: str | None) -> tuple[str, str, str, str]:
    """(commit, git URL, DVC remote name, its URL) for a Dask study of `repo`, after the checks a clone needs:
    a clean workspace (a clone sees only committed work), the commit on the git remote, a DVC
    remote. Each failure is one line naming the fix."""
    refuse_uncommitted(repo, "study --backend dask", "the workers clone only committed work")
    commit = _git(repo, "rev-parse", "HEAD")
    try:
        git_url = _git(repo, "remote", "get-url", git_remote)
    except subprocess.CalledProcessError:
        git_url = git_remote  # a URL or a path given as it is
    if (repo / git_url).exists():  # a local path, relative to the repo: the workers clone from elsewhere
        git_url = str((repo / git_url).resolve())
    try:
        tips = remote_refs(git_url, "refs/heads/*")
    except subprocess.CalledProcessError:
        raise SystemExit(f"study --backend dask: git remote {git_remote!r} cannot be read; add one the workers can "
                         "reach (git remote add origin <url>) or pass --git-remote <url>") from None
    if commit not in tips.values():
        raise SystemExit(f"study --backend dask: commit {commit[:8]} is not a branch tip on git remote {git_remote!r}, "
                         f"so the workers cannot clone it; push it first (git push {git_remote} HEAD)")
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc_repo:
            config = dvc_repo.config  # the repo's, merged with .dvc/config.local
            remotes = {n: r["url"] for n, r in config.get("remote", {}).items()}
            name = dvc_remote or config["core"].get("remote")
    except NotDvcRepoError:
        remotes, name = {}, dvc_remote
    if name not in remotes:
        raise SystemExit("study --backend dask: no DVC remote " + (f"named {name!r}" if name else "set as default") +
                         "; the trials share outputs through one (dvc remote add -d store <s3://, gs://, ssh:// or a "
                         "shared folder>), or pass --dvc-remote <name>")
    return commit, git_url, name, remotes[name]


@contextlib.contextmanager
def kept_environ(**changes: str):
    """This process's environment as it was, back on leaving, with `changes` set meanwhile: a
    LocalCluster's nannies set OMP_NUM_THREADS=1 and more in the process that starts them."""
    before = dict(os.environ)
    os.environ.update(changes)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@contextlib.contextmanager
def connected(scheduler: str | None, workers: int, resource: str):
    """A client of the scheduler at `scheduler`, else of a LocalCluster of `workers` single-slot
    workers on 127.0.0.1 (one thread and one `resource` each), closed on leaving, with this
    process's environment kept from the LocalCluster's nannies."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as e:
            raise SystemExit(f"study --backend dask: no Dask scheduler answers at {scheduler} ({e}); start one "
                             "(dask scheduler) or pass its address") from None
        with client:
            have = [w for w in client.scheduler_info()["workers"].values()
                    if w.get("resources", {}).get(resource, 0) >= 1]
            if client.scheduler_info()["workers"] and not have:
                raise SystemExit(f"study --backend dask: no worker at {scheduler} has the resource {resource!r}; "
                                 f"start workers with --resources {resource}=1 (dask worker), or pass --resource <name>")
            yield client
        return
    from ftstudy.train.launching import gpu_count

    if gpu_count() > 1 and workers > 1:
        raise SystemExit(f"study --backend dask: a LocalCluster cannot give each of its {workers} workers its own GPUs, "
                         "so their trials would share all of them; start one `dask worker --resources GPU=1` per GPU "
                         "with its CUDA_VISIBLE_DEVICES and pass --scheduler, or use --workers 1")
    with kept_environ(), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address="127.0.0.1:0", resources={resource: 1}) as cluster, \
            Client(cluster) as client:
        yield client


def run_trials(repo: Path, sets: dict[str, dict], *, git_remote: str, dvc_remote: str | None, scheduler: str | None,
               workers: int, resource: str, push_models: bool) -> tuple[int, list[str]]:
    """Run the experiments `sets` (name -> its -S values) on Dask and pull them all into `repo`.
    Returns (how many ran now, the failures' messages); a point already on the git remote is
    pulled, not run."""
    commit, git_url, dvc_name, dvc_url = study_remotes(repo, git_remote, dvc_remote)
    pushed = {ref.rsplit("/", 1)[1] for ref in remote_refs(git_url, exp_ref(commit, "*"))}
    todo = {n: s for n, s in sets.items() if n not in pushed}
    ran, failures = 0, []
    if todo:
        baseline = pushable_outputs(repo, push_models=True)  # prepare's and the baseline's, for every trial's --pull
        push = subprocess.run([sys.executable, "-m", "dvc", "push", "--quiet", "--remote", dvc_name, *baseline], cwd=repo,
                              capture_output=True, text=True)
        if push.returncode != 0:
            last = (push.stderr or push.stdout).strip().splitlines()[-1:]
            raise SystemExit(f"study --backend dask: pushing the baseline's outputs to DVC remote {dvc_name!r} failed "
                             f"({' '.join(last)}); check the remote (dvc push -r {dvc_name}) and run again")
        author = (_git(repo, "config", "user.name", check=False) or "ftstudy study",
                  _git(repo, "config", "user.email", check=False) or "study@localhost")
        with connected(scheduler, workers, resource) as client:
            import cloudpickle

            cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import scripts/
            futures = {client.submit(trial, {"name": n, "commit": commit, "git_url": git_url, "dvc_url": dvc_url,
                                             "dvc_name": dvc_name, "set": s, "push_models": push_models, "author": author},
                                     key=f"ftstudy-trial-{commit[:8]}-{n}", resources={resource: 1}, pure=False): n
                       for n, s in todo.items()}
            ran, failures = _follow(client, futures)
    names = {ref.rsplit("/", 1)[1] for ref in remote_refs(git_url, exp_ref(commit, "*"))} & set(sets)
    local = {n for n in names if _git(repo, "for-each-ref", exp_ref(commit, n))}
    for n in sorted(names - local):
        pull = subprocess.run([sys.executable, "-m", "dvc", "exp", "pull", "--no-cache", git_url, n], cwd=repo,
                              capture_output=True, text=True)
        if pull.returncode != 0:
            failures.append(msg := f"{n}: dvc exp pull failed: {' '.join((pull.stderr or pull.stdout).strip().splitlines()[-1:])}")
            print(f"study: trial {msg}", file=sys.stderr, flush=True)
    return ran, failures


def _follow(client, futures: dict) -> tuple[int, list[str]]:
    """Wait for the trials, showing done, running and failed as they change (one line rewritten on a
    terminal); each failure is reported once, with its error."""
    tty, last, ran, failures, running = sys.stderr.isatty(), None, 0, [], 0
    fresh = "\n" if tty else ""  # below the rewritten line
    pending = dict(futures)
    while pending:
        for f in [f for f in pending if f.done()]:
            name = pending.pop(f)
            if f.status == "finished":
                done = f.result()
                ran += done["ran"]
                print(f"{fresh}study: trial {name} " + (f"ran {', '.join(done['stages'])}; pushed" if done["ran"]
                      else "was pushed before"), file=sys.stderr, flush=True)
            else:
                failures.append(msg := f"{name}: {f.exception() if f.status == 'error' else f.status}")
                print(f"{fresh}study: trial {msg}", file=sys.stderr, flush=True)
        try:  # what the workers execute now (the scheduler's `processing` holds tasks waiting for a slot too)
            running = sum(n for n in client.run(lambda dask_worker: len(dask_worker.state.executing),
                                                on_error="return").values() if isinstance(n, int))
        except Exception:  # a worker dying meanwhile: the count waits for the next second
            pass
        counts = (len(futures) - len(pending) - len(failures), min(running, len(pending)), len(failures))
        if counts != last:
            line = f"study (dask): {counts[0]} done, {counts[1]} running, {counts[2]} failed, of {len(futures)} trials"
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            last = counts
        time.sleep(1.0)
    if tty:
        print(file=sys.stderr)
    return ran, failures
