"""An export killed at any point leaves a repository that validates, and the next export completes it.

`aigis export` runs as a real process and is SIGKILLed at points spread over its whole run, and at points
inside its publish window (found by watching the repository for its first staging folder). After each kill:
`validate` finds no problem, the next export finishes the version, and nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aigis import contract
from aigis.export import export_run, validate, versions
from aigis.export.repository import LOCK_FILE, STAGING_PREFIX, leftovers, notes, publish_version, repository_lock
from tiny_run import synthetic_root, train_tasks


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A run over three tasks and a repository holding its version 2 (version 3 is what the kills interrupt)."""
    base = tmp_path_factory.mktemp("heals")
    root = synthetic_root(base)
    run, repo = base / "run", base / "repo"
    train_tasks(root, run, 2)
    export_run(run, repo, progress=False)
    train_tasks(root, run, 3)
    return {"run": run, "repo": repo}


def export_process(run: Path, repo: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aigis.cli", "export", "--run", str(run), "--repo", str(repo),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when_publishing(process: subprocess.Popen, repo: Path, delay_s: float) -> bool:
    """SIGKILL `process` `delay_s` after its first staging folder appears; False if it finished first."""
    while process.poll() is None:
        if publishing(repo):
            time.sleep(delay_s)
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.0005)
    return False


def publishing(repo: Path) -> bool:
    """Whether a staging folder is there now (folders come and go while we look: a vanished one is skipped)."""
    for top in os.listdir(repo):
        if top.startswith(STAGING_PREFIX):
            return True
        try:
            if any(name.startswith(STAGING_PREFIX) for name in os.listdir(repo / top)):
                return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False


@pytest.mark.slow
def test_an_export_killed_at_any_point_leaves_a_valid_repository_and_the_next_one_finishes(base, tmp_path):
    run = base["run"]
    shutil.copytree(base["repo"], tmp_path / "timing")
    started = time.monotonic()
    assert export_process(run, tmp_path / "timing").wait(timeout=300) == 0
    duration = time.monotonic() - started
    assert versions(tmp_path / "timing", contract.ENSEMBLE_MODEL) == [2, 3]

    # 2 kills spread over the run (exporting, checking), 3 inside the publish window.
    points = [("after", duration * f) for f in (0.4, 0.8)] + [("publishing", d) for d in (0.0, 0.005, 0.03)]
    interrupted = 0
    for k, (kind, at) in enumerate(points):
        repo = tmp_path / f"repo{k}"
        shutil.copytree(base["repo"], repo)
        process = export_process(run, repo)
        if kind == "after":
            try:
                process.wait(timeout=at)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                interrupted += 1
        else:
            interrupted += kill_when_publishing(process, repo, at)
        assert validate(repo) == [], (kind, at, validate(repo))
        assert versions(repo, contract.ENSEMBLE_MODEL) in ([2], [2, 3])
        report = export_run(run, repo, progress=False)             # the next export completes the version
        assert report.already_published or report.version == 3
        assert validate(repo) == [] and notes(repo) == [], (kind, at, notes(repo))
        assert versions(repo, contract.ENSEMBLE_MODEL) == [2, 3]
        assert versions(repo, contract.classifier_model(3)) == [1] and versions(repo, contract.decode_model(3)) == [1]
        assert leftovers(repo) == []
    assert interrupted >= 4, f"only {interrupted} of {len(points)} kills landed before the export finished"


def test_stale_leftovers_go_under_the_lock_and_a_live_writer_is_waited_for(base, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(base["repo"], repo)
    (repo / contract.ENSEMBLE_MODEL / f"{STAGING_PREFIX}9-dead").mkdir()
    (repo / f"{STAGING_PREFIX}lorax_classifier_v9-dead").mkdir()
    assert len(leftovers(repo)) == 2 and validate(repo) == []

    # A writer holding the lock (another process in real life): a publish waits for it, then cleans up.
    held, release = threading.Event(), threading.Event()

    def writer() -> None:
        with repository_lock(repo):
            (repo / contract.ENSEMBLE_MODEL / f"{STAGING_PREFIX}live").mkdir()   # this writer's own staging
            held.set()
            release.wait(10)
            os.rmdir(repo / contract.ENSEMBLE_MODEL / f"{STAGING_PREFIX}live")

    thread = threading.Thread(target=writer)
    thread.start()
    assert held.wait(10)
    published = threading.Thread(target=publish_version, args=(repo, "extra_model", 1, {"name": "extra_model",
                                 "backend": "python"}, lambda folder: (folder / "model.py").write_text("")))
    published.start()
    time.sleep(0.5)
    assert (repo / contract.ENSEMBLE_MODEL / f"{STAGING_PREFIX}live").is_dir()   # the live one is untouched
    assert not (repo / "extra_model").exists()
    release.set()
    thread.join(10)
    published.join(10)
    assert (repo / "extra_model" / "1" / "model.py").is_file() and (repo / "extra_model" / "config.pbtxt").is_file()
    assert leftovers(repo) == [] and (repo / LOCK_FILE).is_file()
