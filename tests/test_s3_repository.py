"""A model repository in S3-compatible object storage, written with the guarantees of a local one.

moto's server mode stands in for S3 (a real HTTP server on 127.0.0.1). `aigis export --repo s3://...` writes what
an export into a folder writes; an export SIGKILLed during its upload leaves a bucket that readers see whole and
the next export completes; nothing published is rewritten; one writer at a time (a lock object, taken over
once its holder stops renewing it); `aigis models list|validate|rollout` and `aigis protect-publish` work on the
bucket, and a rollout moves the pointer the servers read there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aigis import contract
from aigis.cli import main as aigis_main
from aigis.export import remote
from aigis.export.repository import pointed_version
from aigis.objectstore import ObjectStoreError
from tiny_run import synthetic_root, train_tasks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BUCKET = "aigis-exports"


def _export(run: Path, repo: str, tmp: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "aigis.cli", "export", "--run", str(run), "--repo", repo,
               "--cpu-accelerator", "none", "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp,
                          env={**os.environ, **(env or {})})


def _bucket(client, prefix: str) -> dict[str, bytes]:
    """Every object under prefix/ (the writer's lock excepted), by its key below the prefix."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            key = item["Key"][len(prefix) + 1:]
            if key != remote.LOCK_OBJECT:
                found[key] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    return found


def _folder(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_endpoint) -> dict:
    """A tiny run trained through 2 tasks, a copy of it through 3, and a folder export of both (the reference)."""
    import boto3

    from aigis.export import TargetOptions, export_run

    base = tmp_path_factory.mktemp("s3export")
    root = synthetic_root(base)
    two, three = base / "run2", base / "run3"
    train_tasks(root, two, 2)
    import shutil

    shutil.copytree(two, three)
    train_tasks(root, three, 3)
    reference = base / "reference"
    export_run(two, reference, progress=False, options=TargetOptions(cpu_accelerator="none"))
    after_two = _folder(reference)
    export_run(three, reference, progress=False, options=TargetOptions(cpu_accelerator="none"))
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return {"two": two, "three": three, "after_two": after_two, "reference": _folder(reference), "client": client}


@pytest.fixture(scope="module")
def whole(runs, tmp_path_factory) -> str:
    """Both runs exported into the bucket by `aigis export`, one after the other."""
    url = f"s3://{BUCKET}/whole"
    for run in (runs["two"], runs["three"]):
        done = _export(run, url, tmp_path_factory.mktemp("export"))
        assert done.returncode == 0, done.stderr
    return url


def test_an_export_to_s3_writes_what_a_folder_export_writes_and_rewrites_nothing(runs, whole, tmp_path, capsys):
    client, url = runs["client"], whole
    assert _bucket(client, "whole") == runs["reference"]
    assert _export(runs["three"], url, tmp_path).stdout.startswith("version 3 (3 tasks) is already in the repository")
    other = _export(runs["two"], url, tmp_path)  # version 2 again, from the same run: nothing to do
    assert other.returncode == 0 and "already" in other.stdout
    assert _bucket(client, "whole") == runs["reference"]
    assert aigis_main(["models", "list", "--repo", url]) == 0
    assert f"{contract.ENSEMBLE_MODEL:<32} versions [2, 3] (latest 3, served 2)" in capsys.readouterr().out
    assert aigis_main(["models", "validate", "--repo", url]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize("kill_after", [9])
def test_an_export_killed_during_its_upload_leaves_a_whole_repository_that_the_next_completes(runs, tmp_path, capsys,
                                                                                               kill_after):
    client, prefix = runs["client"], f"killed{kill_after}"
    url = f"s3://{BUCKET}/{prefix}"
    assert _export(runs["two"], url, tmp_path).returncode == 0
    killed = _export(runs["three"], url, tmp_path, {remote.KILL_ENV: str(kill_after)})
    assert killed.returncode == -9, killed.stderr
    half = _bucket(client, prefix)
    assert {k: half[k] for k in runs["after_two"]} == runs["after_two"]  # what was published is untouched
    assert 0 < len(half) - len(runs["after_two"]) < len(runs["reference"]) - len(runs["after_two"])
    # Readers see version 2 whole and nothing of 3 (its version folders have no config.pbtxt of their own yet).
    assert aigis_main(["models", "list", "--repo", url, "--json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[contract.ENSEMBLE_MODEL]["versions"] == [2]
    assert aigis_main(["models", "validate", "--repo", url]) == 0
    assert "left by an interrupted writer" in capsys.readouterr().out
    # The lock its holder left is taken over once stale; the next export removes the leftovers and completes.
    done = _export(runs["three"], url, tmp_path, {"AIGIS_S3_LEASE_S": "1"})
    assert done.returncode == 0, done.stderr
    assert _bucket(client, prefix) == runs["reference"]


def test_a_mirror_fetches_only_what_the_last_one_did_not(runs, whole, tmp_path, monkeypatch):
    """Objects are kept by ETag between mirrors: a second mirror downloads nothing, a cache entry whose bytes no
    longer match is fetched again, a pointer a rollout moved is kept as written, and the cache holds only what the
    repository names."""
    from aigis.export.repository import point_to

    client, url = runs["client"], f"s3://{BUCKET}/cached"
    for key in _bucket(client, "whole"):
        client.copy_object(Bucket=BUCKET, Key=f"cached/{key}", CopySource={"Bucket": BUCKET, "Key": f"whole/{key}"})
    monkeypatch.setenv("AIGIS_S3_CACHE", str(tmp_path / "cache"))

    def mirror(write: bool = False, move_to: int | None = None) -> tuple[dict[str, bytes], int, int, Path]:
        with remote.repository_at(url, write=write) as local:
            files = _folder(local)
            cache = remote._MIRRORS[local.resolve()].cache
            if move_to is not None:
                point_to(local, contract.ENSEMBLE_MODEL, move_to)
        return files, cache.hits, cache.downloads, cache.root

    def etags() -> set[str]:
        return {item["ETag"].strip('"') for item in client.list_objects_v2(Bucket=BUCKET, Prefix="cached/")["Contents"]
                if not item["Key"].endswith(remote.LOCK_OBJECT)}

    first, hits, downloads, cache_root = mirror()
    distinct = len(etags())  # files of equal bytes (configs, decode steps) are fetched once
    assert first == runs["reference"] and (hits, downloads) == (len(first) - distinct, distinct) and distinct > 10
    again, hits, downloads, _ = mirror()
    assert again == first and (hits, downloads) == (len(first), 0)

    model = next(k for k in first if k.endswith("model.onnx"))
    entry = cache_root / client.head_object(Bucket=BUCKET, Key=f"cached/{model}")["ETag"].strip('"')
    entry.write_bytes(b"not the model")  # a damaged entry is never served
    repaired, hits, downloads, _ = mirror()
    assert repaired == first and (hits, downloads) == (len(first) - 1, 1)

    mirror(write=True, move_to=3)  # a rollout: the pointer it wrote through is kept for the next mirror
    after, hits, downloads, _ = mirror()
    pointer = f"{contract.ENSEMBLE_MODEL}/config.pbtxt"
    assert after[pointer] == first[f"{contract.ENSEMBLE_MODEL}/3/config.pbtxt"] != first[pointer]
    assert (hits, downloads) == (len(first), 0)
    assert {p.name for p in cache_root.iterdir()} == etags()  # what the repository names, nothing more

    (tmp_path / "a-file").write_text("")
    for setting in ("off", str(tmp_path / "a-file" / "cache")):  # off, or a place no cache can be made: no cache
        monkeypatch.setenv("AIGIS_S3_CACHE", setting)
        with remote.repository_at(url) as local:
            assert _folder(local) == after and remote._MIRRORS[local.resolve()].cache is None


def test_one_writer_at_a_time(runs, monkeypatch):
    client, url = runs["client"], f"s3://{BUCKET}/locked"
    client.put_object(Bucket=BUCKET, Key=f"locked/{remote.LOCK_OBJECT}", Body=b'{"holder": "elsewhere:1"}')
    with pytest.raises(ObjectStoreError, match="another writer holds the repository .*elsewhere:1"):
        with remote.repository_at(url, write=True, lock_timeout_s=1):
            pass
    monkeypatch.setattr(remote, "LEASE_S", 1.0)  # the holder stopped renewing: a second later, it is stale
    time.sleep(1.5)
    with remote.repository_at(url, write=True, lock_timeout_s=5) as local:
        assert local.is_dir()
        held = json.loads(client.get_object(Bucket=BUCKET, Key=f"locked/{remote.LOCK_OBJECT}")["Body"].read())
        assert held["holder"].endswith(f":{os.getpid()}")
    assert "Contents" not in client.list_objects_v2(Bucket=BUCKET, Prefix=f"locked/{remote.LOCK_OBJECT}")


def test_a_rollout_moves_the_pointer_the_servers_read_in_the_bucket(runs, whole, capsys, monkeypatch):
    from aigis.serving.server import TritonServer

    client, url = runs["client"], f"s3://{BUCKET}/served"
    for key in _bucket(client, "whole"):  # the repository the first test exported, copied inside the store
        client.copy_object(Bucket=BUCKET, Key=f"served/{key}", CopySource={"Bucket": BUCKET, "Key": f"whole/{key}"})
    key = "s3-rollout-key"
    monkeypatch.setenv("AIGIS_CONTROL_KEY", key)
    with TritonServer(url, models=[contract.ENSEMBLE_MODEL], control_key=key) as server:
        with server.control() as control:
            assert control.is_ready(contract.ENSEMBLE_MODEL, "2")
        assert aigis_main(["models", "rollout", "--repo", url, "--url", server.grpc_url, "--version", "3"]) == 0
        assert "ensemble version 2 -> 3" in capsys.readouterr().out
        with remote.repository_at(url) as local:
            assert pointed_version(local, contract.ENSEMBLE_MODEL) == 3
        with server.control() as control:  # (a replica that restarts comes back on it: tests/test_objectstore.py)
            assert control.is_ready(contract.ENSEMBLE_MODEL, "3") and not control.is_ready(contract.ENSEMBLE_MODEL, "2")


def test_protect_publish_to_s3(runs, tmp_path, capsys):
    from aigis.protection.artefact import save_surrogate
    from aigis.protection.clip import build_clip
    from aigis.protection.settings import MEMSettings
    from aigis.protection.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["a red circle on the left", "a blue square"], vocab_size=600)
    save_surrogate(tmp_path / "surrogate", build_clip("rn_tiny", vocab_size=tokenizer.vocab_size), tokenizer,
                   MEMSettings(trigger_length=2, candidates=2, pgd_steps=1, batch_size=4))
    url = f"s3://{BUCKET}/protect"
    for expected in (1, 1):  # the same artefact published twice: one version
        assert aigis_main(["protect-publish", "--repo", url, "--job", str(tmp_path / "surrogate")]) == 0
        assert f"{contract.PROTECT_MODEL} version {expected} in {url}" in capsys.readouterr().out
    keys = _bucket(runs["client"], "protect")
    assert f"{contract.PROTECT_MODEL}/config.pbtxt" in keys and f"{contract.PROTECT_MODEL}/1/settings.json" in keys
    assert not [k for k in keys if k.startswith(f"{contract.PROTECT_MODEL}/2/")]
