"""Shared test settings: small thread counts so the suite behaves on 2-core machines; shared fixtures (a tiny
CLIP, an S3-compatible server)."""

import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random CLIP, its tokenizer and a batch of 6 scenes at 32 px (for in-process MEM checks)."""
    from aigis.protection.captions import load_images, read_pairs, synth_captioned
    from aigis.protection.clip import build_clip
    from aigis.protection.tokenizer import Tokenizer

    root = synth_captioned(tmp_path_factory.mktemp("mem-tiny"), 6, 0, size=32, seed=5)
    pairs = read_pairs(root, "train.jsonl")
    captions = [p.caption for p in pairs]
    tokenizer = Tokenizer.train(captions, 700)
    torch.manual_seed(0)
    model = build_clip("rn_tiny", tokenizer.vocab_size).eval()
    return model, tokenizer, load_images(pairs, 32, progress=False), captions


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server as a real process on a free 127.0.0.1 port, and the standard AWS environment naming it
    (any credentials: moto checks none, tritonserver needs some to sign)."""
    pytest.importorskip("boto3", reason="S3 repositories need boto3 (the serve extra): pip install 'aigis[serve]'")
    pytest.importorskip("moto", reason="the S3 stand-in is moto's server mode: pip install 'moto[server]' (test extra)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION",
                     "TRITON_AWS_MOUNT_DIRECTORY"):
            env.delenv(name, raising=False)
        none = str(log.parent / "no-aws-files")             # keep this machine's ~/.aws out of the test
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", none)
        env.setenv("AWS_CONFIG_FILE", none)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        env.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AIGIS_S3_CACHE", str(log.parent / "mirror-cache"))  # not this machine's ~/.cache
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"moto's server did not start:\n{log.read_text()[-2000:]}")
                    time.sleep(0.1)
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def two_version_source(tmp_path_factory) -> dict:
    """The tiny run's repository with versions 2 and 3 (tiny_run.two_version_repo), built once per session; a test
    module takes its own copy with two_version_copy, since rollouts move the pointers."""
    from tiny_run import two_version_repo

    return two_version_repo(tmp_path_factory.mktemp("two-versions"))
