"""Replicas served from object storage: `aigis serve --repo s3://BUCKET/PREFIX`, end to end.

moto's server mode (a real S3-compatible HTTP server on 127.0.0.1) holds a tiny exported repository; two
`aigis serve` replicas read it through the real tritonserver and answer attribution requests over real gRPC
exactly as a server on the local folder does; a replica whose tritonserver is killed comes back on the version
the bucket's pointer names. The launcher's up-front checks name what is wrong (bucket, prefix, endpoint, TLS,
credentials) before tritonserver could blame "account credentials".
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aigis import contract, preprocess
from aigis.cli import main as aigis_main
from aigis.client import AttributionClient
from aigis.data.cddb import CDDB
from aigis.export import TargetOptions, export_run, load_version
from aigis.serving.cli import default_models
from aigis.objectstore import (ObjectStoreError, S3Repository, S3Url, open_repository, triton_url,
                                       upload_repository)
from aigis.serving.server import TritonServer, free_port
from tiny_run import TASKS, synthetic_root, train_tasks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BUCKET, PREFIX = "aigis-models", "replicas/prod"
URL = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, s3_endpoint) -> dict:
    """A tiny run exported as versions 2 and 3 (the pointers serve 2) into a folder, copied to the bucket."""
    import boto3

    base = tmp_path_factory.mktemp("s3repo")
    root = synthetic_root(base)
    run, repo = base / "run", base / "repo"
    for count in (2, 3):
        train_tasks(root, run, count)
        export_run(run, repo, progress=False, options=TargetOptions(cpu_accelerator="none"))
    data = CDDB(root, TASKS, progress=False)
    paths = [s.path for t in range(len(TASKS)) for s in data.samples(t, "val")][:12]
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    written = upload_repository(repo, URL)
    return {"repo": repo, "client": client, "written": written, "paths": paths,
            "images": np.stack([preprocess.eval_view_from_file(p, 32) for p in paths])}


def start_replica(url: str, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, queue.Queue]:
    """`aigis serve --repo URL` as a real process on free ports; its output lines go to a queue."""
    command = [sys.executable, "-m", "aigis.cli", "serve", "--repo", url, "--grpc-port", str(free_port()),
               "--metrics-port", str(free_port()), "--log", str(log)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**env, "AIGIS_CONTROL_KEY": "replica-test-key"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    return process, lines


def read_until(lines: queue.Queue, marker: str, timeout: float) -> str:
    """Output up to and including the first line holding `marker`."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if marker in line:
            return "".join(seen)
    pytest.fail(f"no line with {marker!r} after {timeout} s:\n" + "".join(seen))


def answers(grpc_url: str, exported: dict) -> list[tuple]:
    """(label, probabilities, version) per image through both ensembles: arrays to lorax, files to lorax_bytes."""
    found = []
    for model, images in ((contract.ENSEMBLE_MODEL, exported["images"]),
                          (contract.BYTES_ENSEMBLE_MODEL, [Path(p).read_bytes() for p in exported["paths"]])):
        with AttributionClient(grpc_url, model=model, timeout_s=30) as client:
            found += [(a.label, tuple(a.probabilities.items()), a.model_version) for a in client.attribute(images)]
    return found


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert [(label, version) for label, _, version in got] == [(label, version) for label, _, version in want]
    for (_, p, _), (_, q, _) in zip(got, want):
        assert [name for name, _ in p] == [name for name, _ in q]
        np.testing.assert_allclose([v for _, v in p], [v for _, v in q], rtol=0, atol=1e-6)


def test_two_replicas_on_one_bucket_answer_as_a_local_server_and_restart_on_its_pointer(exported, tmp_path):
    repo, client = exported["repo"], exported["client"]
    # The second replica finds its credentials in a shared credentials file instead of the environment: both
    # boto3's check and tritonserver's own AWS SDK must read it.
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = file-key-id\naws_secret_access_key = file-secret\n")
    from_file = {name: value for name, value in os.environ.items() if not name.startswith("AWS_ACCESS_KEY_ID")
                 and not name.startswith("AWS_SECRET_ACCESS_KEY")} | {"AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    replicas = [start_replica(URL, tmp_path / "replica0.log", dict(os.environ)),
                start_replica(URL, tmp_path / "replica1.log", from_file)]
    try:
        with TritonServer(repo, models=default_models(repo)) as local:
            local_v2 = answers(local.grpc_url, exported)
            reports = [read_until(lines, "Ctrl-C", 180) for _, lines in replicas]
            urls = [re.search(r"gRPC\s+(\S+)", text).group(1) for text in reports]
            assert "credentials from env," in reports[0] and "credentials from shared-credentials-file," in reports[1]
            for text in reports:
                assert f"Triton serving {URL} (pid" in text
                assert f"tritonserver reads s3://{os.environ['AWS_ENDPOINT_URL']}/{BUCKET}/{PREFIX}" in text
                assert "model    lorax (versions 2)" in text and "model    lorax_bytes (versions 2)" in text
            for url in urls:
                assert_same(answers(url, exported), local_v2)
            assert {version for *_, version in local_v2} == {"2"} and len({label for label, *_ in local_v2}) > 1

            # A rollout in the bucket: each ensemble's served-version pointer now names version 3. A replica reads
            # pointers only when it (re)loads: the one whose tritonserver dies comes back on version 3, the other
            # keeps serving version 2 until it loads again.
            for ensemble in (contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL):
                client.copy_object(Bucket=BUCKET, Key=f"{PREFIX}/{ensemble}/config.pbtxt",
                                   CopySource={"Bucket": BUCKET, "Key": f"{PREFIX}/{ensemble}/3/config.pbtxt"})
            os.kill(int(re.search(r"\(pid (\d+)\)", reports[0]).group(1)), signal.SIGKILL)
            with local.control() as control:        # meanwhile the same rollout on the local folder, for reference
                load_version(control, repo, 3)
            local_v3 = answers(local.grpc_url, exported)
            read_until(replicas[0][1], "restart 1: serving again", 120)
            assert_same(answers(urls[0], exported), local_v3)
            assert_same(answers(urls[1], exported), local_v2)
            for process, _ in replicas:          # they stop while the local server does
                process.send_signal(signal.SIGTERM)
        for process, lines in replicas:
            assert process.wait(timeout=60) == 0
            assert "stopped (tritonserver exit status 0" in read_until(lines, "stopped", 10)
    finally:
        for process, _ in replicas:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_what_is_wrong_with_an_s3_repository_is_named_before_tritonserver_starts(exported, monkeypatch, capsys):
    client = exported["client"]
    with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket' at http://127.0.0.1:.* does not exist"):
        open_repository("s3://no-such-bucket/models")
    with pytest.raises(ObjectStoreError, match="holds nothing under replicas/staging/"):
        open_repository(f"s3://{BUCKET}/replicas/staging")
    with pytest.raises(ObjectStoreError, match="no model there .* found prod"):
        open_repository(f"s3://{BUCKET}/replicas")
    with pytest.raises(ObjectStoreError, match="endpoint .* in AWS_ENDPOINT_URL"):
        open_repository(f"s3://127.0.0.1:9000/{BUCKET}/{PREFIX}")       # tritonserver's own form is not the input
    with pytest.raises(ObjectStoreError, match="not an S3 bucket name"):
        open_repository("s3://Models/x")
    client.put_object(Bucket=BUCKET, Key="odd/model (copy)/config.pbtxt", Body=b"")
    client.put_object(Bucket=BUCKET, Key="odd/m/config.pbtxt", Body=b'name: "m"')
    with pytest.raises(ObjectStoreError, match="tritonserver's S3 reader cannot read 'model \\(copy\\)/config.pbtxt'"):
        open_repository(f"s3://{BUCKET}/odd")

    assert aigis_main(["serve", "--repo", "s3://no-such-bucket/models"]) == 1   # before any tritonserver
    assert "aigis serve: s3://no-such-bucket/models: bucket 'no-such-bucket'" in capsys.readouterr().err

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.replace("http://", "https://"))   # moto speaks plain HTTP
    with pytest.raises(ObjectStoreError, match="TLS failed talking to https://127.0.0.1"):
        open_repository(URL)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")          # nothing listens there
    with pytest.raises(ObjectStoreError, match="cannot reach the S3 endpoint http://127.0.0.1"):
        open_repository(URL)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ObjectStoreError, match="no AWS credentials found"):
        open_repository(URL)


def test_an_s3_repository_reads_like_its_folder(exported):
    repo, client = exported["repo"], exported["client"]
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/.aigis-writer.lock", Body=b"")   # a lock copied by hand
    s3 = S3Repository(URL).open()
    local = open_repository(repo)
    assert s3.files() == local.files() and exported["written"] == len(local.files())   # hidden entries stay home
    assert default_models(s3) == default_models(repo) == sorted(
        [contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL])
    assert s3.read_text("lorax/2/config.pbtxt") == (repo / "lorax" / "2" / "config.pbtxt").read_text()
    assert any(".aigis-writer.lock" in note for note in s3.notes)
    mount = s3.triton_environment(Path("/somewhere"))
    assert mount["TRITON_AWS_MOUNT_DIRECTORY"] == "/somewhere" and "AWS_DEFAULT_REGION" not in mount   # set already


def test_the_url_tritonserver_reads():
    url = S3Url.parse("s3://bucket.example/a/b/")
    assert (url.bucket, url.prefix, str(url)) == ("bucket.example", "a/b", "s3://bucket.example/a/b")
    assert triton_url(url, None) == "s3://bucket.example/a/b"                                   # AWS itself
    assert triton_url(url, "https://minio.storage.svc") == "s3://https://minio.storage.svc:443/bucket.example/a/b"
    assert triton_url(S3Url.parse("s3://bucket"), "http://10.0.0.5:9000") == "s3://http://10.0.0.5:9000/bucket"
    for endpoint in ("http://[::1]:9000", "http://host:9000/path", "ftp://host:21"):
        with pytest.raises(ObjectStoreError):
            triton_url(url, endpoint)
    with pytest.raises(ObjectStoreError, match="only A-Z a-z 0-9"):
        S3Url.parse("s3://bucket/models v2")
