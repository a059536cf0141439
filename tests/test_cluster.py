"""The study on a Dask cluster (scripts/cluster.py, `make study BACKEND=dask`): a LocalCluster of 2
single-slot workers on 127.0.0.1, a bare git repo as the git remote and a local folder as the DVC
remote. Each grid point runs in its own clone, pushes its experiment, and the coordinator pulls it:
the study equals the local queue's, a rerun runs nothing, a worker killed mid-training has its
trial rerun elsewhere with nothing pushed twice or half, and a trial's own failure is reported
once. One Dask study, with the kill in it, serves the tests; the local queue's is their reference.
Every cluster is stopped by its handle, every process by its id. The trials' stages start warm,
from a server with the environment a Dask worker has (ftstudy/warm.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, TIMING, once, pinned, process_group
from ftstudy import warm
from scripts import cluster, sandbox

# One pytest-xdist worker runs this file: its module-scoped fixtures are built once.
pytestmark = pytest.mark.xdist_group("cluster")

GRID = ["--full-lr", "2e-3,2e-3", "--lora-lr", "5e-3,2e-2", "--seeds", "42"]
NAMES = ["s42-f0p002-l0p005", "s42-f0p002-l0p02"]
RUN_FACTS = {"wall_s", "ran", "reused"}  # what a study run did, not what it found


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING | RUN_FACTS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def git(repo, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def base(demo_build):
    """The committed demo build. Each grid point keeps its full.lr, so a trial retrains LoRA only
    (and what follows it), as a study of lora.lr does, and pulls the rest."""
    return demo_build[0]


def worker_environ() -> dict:
    """The environment a LocalCluster's nanny gives its worker here, read from a real one-worker
    cluster: distributed's pre-spawn-environ (OMP_NUM_THREADS=1 and more) and PYTHONHASHSEED."""
    from distributed import Client, LocalCluster

    with cluster.kept_environ(), LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                                              dashboard_address="127.0.0.1:0") as c, Client(c) as client:
        return next(iter(client.run(lambda: dict(os.environ)).values()))


@pytest.fixture(scope="module")
def worker_warm():
    """A warm server with a Dask worker's environment, for the trials' stages; the one conftest
    starts has this process's, which the nannies change, and the local queue's stages use it."""
    with sandbox.warm_server(worker_environ(), export=False) as address:
        assert address, "the warm server did not start"
        yield address


def with_remotes(base, where, bare=None):
    """A copy of `base` with a bare repo as its git remote (new unless given) and a folder as its DVC remote."""
    repo = where / "repo"
    shutil.copytree(base, repo, symlinks=True)
    if bare is None:
        bare = where / "remote.git"
        git(where, "init", "-q", "--bare", str(bare))
    git(repo, "remote", "add", "origin", str(bare))
    git(repo, "push", "-q", "origin", "main")
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "store", str(bare.parent / "store")],
                   cwd=repo, check=True, capture_output=True)
    return repo, bare


def study_cmd(repo, *extra) -> list[str]:
    return [sys.executable, "-m", "scripts.study", "--dir", str(repo), *GRID, *extra]


def pushed(bare) -> list[str]:
    return sorted(ref.rsplit("/", 1)[1] for ref in cluster.remote_refs(str(bare), "refs/exps/*"))


@pytest.fixture(scope="module")
def queue_study(base, tmp_path_factory):
    repo = tmp_path_factory.mktemp("queue") / "repo"
    shutil.copytree(base, repo, symlinks=True)
    # On one core (a pytest-xdist worker on 2 cores already has one), its stages train with one
    # thread under train.cpu_threads auto, as a Dask worker's do (its nanny sets OMP_NUM_THREADS=1),
    # so both backends train alike; under -n 0 they start cold, their affinity not the warm server's.
    with pinned(sorted(os.sched_getaffinity(0))[:1]):
        proc = subprocess.run(study_cmd(repo), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((repo / "study.json").read_text())


def exp_lock(repo, name) -> dict:
    import yaml

    return yaml.safe_load(git(repo, "show", f"{cluster.exp_ref(git(repo, 'rev-parse', 'HEAD'), name)}:dvc.lock"))


def in_store(store, out: dict) -> bool:
    return (store / "files/md5" / out["md5"][:2] / out["md5"][2:]).exists()


def missing_from_store(repo, name, store) -> list[str]:
    """The outputs experiment `name` pushes by default (all cached ones but the fine-tuned models)
    that the DVC remote `store` lacks."""
    small = set(cluster.pushable_outputs(repo, push_models=False))
    return [o["path"] for stage in exp_lock(repo, name)["stages"].values() for o in stage.get("outs", [])
            if o["path"] in small and not in_store(store, o)]


@pytest.fixture(scope="module")
def dask_study(base, worker_warm, tmp_path_factory):
    """The study on a LocalCluster of 2 single-slot workers, given by --scheduler, whose stages ask
    the warm server with the workers' environment; once a trial's LoRA training has been served,
    its worker is killed by its process id, and Dask reruns the trial on the other. Returns what
    the tests check: the repo, its DVC remote's folder, the bare git remote, the study's stderr,
    the warm server's log, and what was left of the killed trial's process group."""
    return once("dask-study", lambda: run_dask_study(base, worker_warm, tmp_path_factory.mktemp("dask")))


def run_dask_study(base, worker_warm, where) -> SimpleNamespace:
    import psutil
    from distributed import Client, LocalCluster

    repo, bare = with_remotes(base, where)
    log = Path(worker_warm).parent / "log"
    with cluster.kept_environ(**{warm.ADDRESS_VAR: worker_warm}), \
            LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                         resources={"slots": 1}) as dask_cluster, Client(dask_cluster) as client:
        proc = subprocess.Popen(study_cmd(repo, "--backend", "dask", "--scheduler", dask_cluster.scheduler_address,
                                          "--resource", "slots"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            victim = group = None
            deadline = time.time() + 600
            while victim is None and time.time() < deadline and proc.poll() is None:
                served = log.read_text()
                for pid in client.run(os.getpid).values():
                    for child in psutil.Process(pid).children(recursive=True):
                        try:  # a trial's train_lora, once the warm server has served it (mid-training)
                            if any(a == "stages.train_lora" for a in child.cmdline()) \
                                    and f"stages.train_lora in {child.cwd()}:" in served:
                                victim, group = pid, os.getpgid(child.pid)
                        except (psutil.NoSuchProcess, ProcessLookupError):
                            pass
                time.sleep(0.3)
            assert victim is not None, "no trial reached training"
            os.kill(victim, signal.SIGKILL)
            # The killed worker's trial, in its own process group, dies with it.
            for _ in range(40):
                left = [p.pid for p in psutil.process_iter() if process_group(p.pid) == group]
                if not left:
                    break
                time.sleep(0.25)
            out, err = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    return SimpleNamespace(repo=repo, bare=bare, store=where / "store", stderr=err, served=log.read_text(), left=left)


@pytest.mark.slow
def test_the_dask_study_equals_the_queue_study_and_a_rerun_pulls_instead_of_running(base, queue_study, dask_study,
                                                                                    tmp_path):
    repo, bare, err = dask_study.repo, dask_study.bare, dask_study.stderr
    # Every stage of every trial started warm (the server has the workers' environment): both
    # trials' LoRA training, and the killed trial's first try.
    assert "declined" not in dask_study.served and dask_study.served.count("warm: stages.train_lora in") == 3, \
        dask_study.served
    result = json.loads((repo / "study.json").read_text())
    assert result["ran"] == queue_study["ran"] == 2
    assert without_timings(result) == without_timings(queue_study)
    assert pushed(bare) == NAMES
    assert "study (dask): 2 done, 0 running, 0 failed, of 2 trials" in err
    # Each clone pulled what its point leaves unchanged (prepare, the pretrained model's scores, the
    # full fine-tuning at the baseline's full.lr) instead of running it.
    for name in NAMES:
        ran = re.search(rf"^study: trial {name} ran (.*); pushed$", err, re.M).group(1).split(", ")
        assert "train_lora" in ran and not {"prepare", "evaluate@pretrained", "tasks@pretrained", "train_full"} & set(ran)
    # Only metrics and small outputs were pushed by the trials: no fine-tuned model but the baseline's.
    for name in NAMES:
        assert missing_from_store(repo, name, dask_study.store) == []
        lora_model = next(o for o in exp_lock(repo, name)["stages"]["train_lora"]["outs"] if o["path"] == "models/lora")
        assert not in_store(dask_study.store, lora_model)
    # Another coordinator of the same commit and remotes: every point is pulled, none runs again.
    other, _ = with_remotes(base, tmp_path / "other", bare=bare)
    again = subprocess.run(study_cmd(other, "--backend", "dask"), cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "study: 0 experiment(s) ran, 2 reused" in again.stdout
    assert without_timings(json.loads((other / "study.json").read_text())) == without_timings(queue_study)
    assert pushed(bare) == NAMES


@pytest.mark.slow
def test_a_worker_killed_mid_training_has_its_trial_rerun_and_each_point_pushed_once_and_whole(queue_study, dask_study):
    repo, bare = dask_study.repo, dask_study.bare
    assert dask_study.left == []  # the killed trial's process group, gone with its worker
    result = json.loads((repo / "study.json").read_text())
    assert without_timings(result) == without_timings(queue_study)
    assert pushed(bare) == NAMES
    for name in NAMES:
        assert missing_from_store(repo, name, dask_study.store) == []
    # A trial that fails for a reason of its own is reported once, with its error, and not retried;
    # here on a LocalCluster of the study's own (no --scheduler), started and stopped by it.
    ran, failures = cluster.run_trials(repo, {"bad-rank": {"lora.r": 0}}, git_remote="origin", dvc_remote=None,
                                       scheduler=None, workers=1, resource="slots", push_models=False)
    assert ran == 0 and len(failures) == 1 and "lora.r" in failures[0]
    assert pushed(bare) == NAMES


def test_the_dask_backend_refuses_a_dirty_workspace_and_a_commit_the_workers_cannot_clone(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "params.yaml").write_text("seed: 1\n")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "first")
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(repo, "remote", "add", "origin", "../remote.git")  # relative to the repo, as `git remote add` takes it
    with pytest.raises(SystemExit, match=r"commit [0-9a-f]{8} is not a branch tip on git remote 'origin'.*git push origin HEAD"):
        cluster.study_remotes(repo, "origin", None)
    git(repo, "push", "-q", "origin", "main")
    (repo / "params.yaml").write_text("seed: 2\n")
    with pytest.raises(SystemExit, match="the workspace has uncommitted changes, and the workers clone only committed work"):
        cluster.study_remotes(repo, "origin", None)
    git(repo, "checkout", "-q", "--", "params.yaml")
    with pytest.raises(SystemExit, match=r"no DVC remote set as default; the trials share outputs through one \(dvc remote add -d"):
        cluster.study_remotes(repo, "origin", None)
    with pytest.raises(SystemExit, match="git remote 'nowhere' cannot be read"):
        cluster.study_remotes(repo, "nowhere", None)
