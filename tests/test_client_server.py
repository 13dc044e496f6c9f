"""The client library against the REAL Triton server (the tritonserver binary) on the stand-in repository.

One module-scoped server serves every model of tests/test_client_standin.py's repository; the test of
a server going away starts a second, short-lived one of its own (only `lorax_slow`, so it starts fast)
and SIGKILLs it while requests are in flight. Expected answers come from the same ONNX files run
in-process (test_client_standin.Reference), never from numbers written down here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from aigis import contract, preprocess
from aigis.cli import main as aigis_main
from aigis.client import (
    AsyncAttributionClient,
    Attribution,
    AttributionClient,
    ClientClosedError,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    ProtectionClient,
    ServerUnavailableError,
)
from aigis.serving.server import TritonServer, free_port
from polling import poll
from test_client_standin import (
    ALL_MODELS,
    CROP,
    SLOW_MODEL,
    TASKS,
    VERSION,
    Reference,
    build_repository,
    png_bytes,
    random_images,
    write_images,
)

CLASS_NAMES = contract.class_names(TASKS)
TOLERANCE = 1e-5


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("standin_repo"))


@pytest.fixture(scope="module")
def reference(repo) -> Reference:
    return Reference(repo)


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(repo, models=ALL_MODELS) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with AttributionClient(server.grpc_url, timeout_s=20) as attribution:
        yield attribution


# ---- helpers -------------------------------------------------------------------------------------
def probs_of(results: list[Attribution]) -> np.ndarray:
    """Probabilities in class order; also checks every result names the classes in that order."""
    for result in results:
        assert list(result.probabilities) == CLASS_NAMES
    return np.array([list(result.probabilities.values()) for result in results])


def eval_views(paths: list[Path]) -> np.ndarray:
    """What training evaluation feeds the model for these files."""
    return np.stack([preprocess.center_crop(preprocess.load_image(p), CROP) for p in paths])


def counts(connection, model: str) -> tuple[int, int]:
    """(requests that succeeded, images they carried) for `model`, from Triton's statistics API."""
    stats = connection.statistics(model)["model_stats"]
    entry = next(s for s in stats if s["name"] == model)
    requests = int(entry.get("inference_stats", {}).get("success", {}).get("count", 0))
    return requests, int(entry.get("inference_count", 0))


def counts_after(connection, model: str, before: tuple[int, int], images: int) -> tuple[int, int]:
    """counts() once `images` more images than `before` have been recorded (or the wait timed out)."""
    return poll(lambda: counts(connection, model), lambda now: now[1] - before[1] >= images)


# ---- answers -------------------------------------------------------------------------------------
def test_single_image_and_batches_equal_the_in_process_reference(server, client, reference):
    images = random_images(9, seed=1)
    expected = reference.probs(images)

    single = client.attribute(images[0])
    assert isinstance(single, Attribution)
    np.testing.assert_allclose(probs_of([single])[0], expected[0], atol=TOLERANCE)

    batch = client.attribute(images)
    assert isinstance(batch, list) and len(batch) == 9
    np.testing.assert_allclose(probs_of(batch), expected, atol=TOLERANCE)

    # A batch larger than max_batch_size goes out as several requests and comes back in input order.
    with AttributionClient(server.grpc_url, max_batch_size=4) as chunked:
        before = counts(chunked, contract.ENSEMBLE_MODEL)
        np.testing.assert_allclose(probs_of(chunked.attribute(list(images))), expected, atol=TOLERANCE)
        after = counts_after(chunked, contract.ENSEMBLE_MODEL, before, 9)
    assert (after[0] - before[0], after[1] - before[1]) == (3, 9)   # ceil(9 / 4) requests, 9 images


def test_result_fields_follow_the_manifest(client, reference):
    assert client.class_names == tuple(CLASS_NAMES)
    assert client.manifest.version == VERSION and client.manifest.crop == CROP
    assert client.manifest.tasks == tuple(TASKS)

    images = random_images(32, seed=2)
    expected = reference.probs(images)
    results = client.attribute(images)
    for result, row in zip(results, expected):
        best = int(np.argmax(row))
        assert result.label == CLASS_NAMES[best]
        assert result.is_fake == (best % 2 == 1)
        assert result.generator == (TASKS[best // 2] if best % 2 else None)
        assert result.fake_score == pytest.approx(float(row[1::2].sum()), abs=TOLERANCE)
        assert result.probabilities[result.label] == pytest.approx(float(row.max()), abs=TOLERANCE)
        # The version that answered, from the response: the stand-in serves version directory 1.
        assert result.model_version == "1"
        json.dumps(result.to_dict())   # what the CLI writes must be JSON-serialisable


def test_a_file_is_preprocessed_like_training_evaluation(client, reference, tmp_path):
    """Files larger than the crop (and a JPEG) are decoded and centre-cropped client-side exactly as in
    training evaluation, so the served answer equals the in-process answer for the eval view."""
    paths = write_images(tmp_path, 5, seed=5)
    expected = reference.probs(eval_views(paths))
    np.testing.assert_allclose(probs_of(client.attribute(paths)), expected, atol=TOLERANCE)
    single = client.attribute(str(paths[0]))           # the JPEG, given as a str path
    np.testing.assert_allclose(probs_of([single])[0], expected[0], atol=TOLERANCE)


def test_the_bytes_model_gives_the_same_answers(server, client, reference, tmp_path):
    images = random_images(6, seed=3)
    paths = write_images(tmp_path, 3, seed=4)
    with AttributionClient(server.grpc_url, model=contract.BYTES_ENSEMBLE_MODEL) as thin:
        assert thin.served.takes_bytes
        assert thin.manifest == client.manifest          # borrowed from `lorax` (lorax_bytes has none)
        before = counts(thin, contract.BYTES_ENSEMBLE_MODEL)
        from_bytes = thin.attribute([png_bytes(image) for image in images])
        from_files = thin.attribute(paths)                # sent encoded: the server decodes and crops
        after = counts_after(thin, contract.BYTES_ENSEMBLE_MODEL, before, 9)
    np.testing.assert_allclose(probs_of(from_bytes), reference.probs(images), atol=TOLERANCE)
    np.testing.assert_allclose(probs_of(from_files), reference.probs(eval_views(paths)), atol=TOLERANCE)
    assert after[1] - before[1] == 9                      # all nine went through lorax_bytes


def test_an_unknown_model_or_version_is_named_with_what_the_server_has(server, repo):
    # The server's index needs its control key: a client tells only what is ready (a model that is not may be
    # loading after a restart, so that error is retried until the deadline; retries=0 here).
    with pytest.raises(ModelNotReadyError, match=r"'loraxx' .* not ready: .*does not exist \(ready models:.*lorax"):
        AttributionClient(server.grpc_url, model="loraxx", retries=0)
    with pytest.raises(ModelNotFoundError, match=r"'lorax' version 2 .* not loaded \(ready versions of 'lorax': 1\)"):
        AttributionClient(server.grpc_url, version=2, retries=0)
    # With the index open, a missing model is told apart from an unloaded one, and is not retried.
    with TritonServer(repo, models=[SLOW_MODEL], control_key="") as open_index:
        with pytest.raises(ModelNotFoundError, match=r"no model named 'loraxx'.*ready models:.*lorax_slow"):
            AttributionClient(open_index.grpc_url, model="loraxx")
    with AttributionClient(server.grpc_url, version=1) as pinned:
        assert pinned.attribute(random_images(1)[0]).model_version == "1"


# ---- micro-batching ------------------------------------------------------------------------------
def test_concurrent_single_submissions_are_grouped_bounded_and_routed(server, reference):
    count, max_batch, max_in_flight = 48, 8, 2
    images = random_images(count, seed=6)
    expected = reference.probs(images)
    with AttributionClient(
        server.grpc_url, max_batch_size=max_batch, max_delay_ms=20, max_in_flight=max_in_flight
    ) as batched:
        # Count requests in flight around the real gRPC call (the call itself is untouched).
        real_infer, lock, active, peak = batched._transport.infer, threading.Lock(), [0], [0]

        def counting_infer(*args, **kwargs):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                return real_infer(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1

        batched._transport.infer = counting_infer
        before = counts(batched, contract.ENSEMBLE_MODEL)
        start = threading.Barrier(count)

        def one(i: int) -> tuple[int, Attribution]:
            start.wait()
            return i, batched.submit(images[i]).result(timeout=60)

        with ThreadPoolExecutor(max_workers=count) as pool:
            answers = list(pool.map(one, range(count)))
        after = counts_after(batched, contract.ENSEMBLE_MODEL, before, count)
        stats = batched.batch_stats

    # Routed: each caller got the answer for ITS image (the images differ, so their answers differ).
    for i, result in answers:
        np.testing.assert_allclose(probs_of([result])[0], expected[i], atol=TOLERANCE)
    # Grouped: the server saw fewer requests than submissions, and exactly the batches the client sent.
    assert stats.items == count
    assert stats.batches < count and max(stats.batch_sizes) > 1 and max(stats.batch_sizes) <= max_batch
    assert (after[0] - before[0], after[1] - before[1]) == (stats.batches, count)
    # Bounded: never more requests in flight than allowed.
    assert 1 <= peak[0] <= max_in_flight


def test_async_client_gathers_many_submissions(server, reference):
    images = random_images(40, seed=7)
    expected = reference.probs(images)

    async def run() -> tuple[list[Attribution], list[Attribution], object]:
        async with AsyncAttributionClient(server.grpc_url, max_batch_size=16, max_delay_ms=20) as aclient:
            futures = await asyncio.gather(*(aclient.submit(image) for image in images))
            submitted = await asyncio.gather(*futures)
            batch = await aclient.attribute(images[:5])
            return list(submitted), batch, aclient.batch_stats

    submitted, batch, stats = asyncio.run(run())
    np.testing.assert_allclose(probs_of(submitted), expected, atol=TOLERANCE)
    np.testing.assert_allclose(probs_of(batch), expected[:5], atol=TOLERANCE)
    assert stats.items == len(images) and stats.batches < len(images)


# ---- deadlines and a server that goes away -------------------------------------------------------
def test_a_short_deadline_raises_the_typed_error_quickly(server):
    with AttributionClient(server.grpc_url, model=SLOW_MODEL, timeout_s=0.3, retries=3) as slow:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match=SLOW_MODEL):
            slow.attribute(random_images(1, seed=8)[0])
        elapsed = time.monotonic() - started
    # The model sleeps 1.5 s; a deadline is not retried, so the error comes after about 0.3 s.
    assert 0.25 <= elapsed < 1.2, elapsed


def test_the_async_client_has_the_same_deadline(server):
    async def run() -> float:
        async with AsyncAttributionClient(server.grpc_url, model=SLOW_MODEL, timeout_s=0.3) as slow:
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError, match=SLOW_MODEL):
                await slow.attribute(random_images(1, seed=8)[0])
            return time.monotonic() - started

    elapsed = asyncio.run(run())
    assert 0.25 <= elapsed < 1.2, elapsed


def test_a_server_killed_mid_request_gives_unavailable_and_a_restart_within_the_retry_window_recovers(repo):
    """SIGKILL a server while requests are in flight (on `lorax_slow`, which takes 1.5 s per request).

    A client with a short retry window fails with ServerUnavailableError soon after, not a hang nor a
    raw gRPC error; a client with the default deadline (60 s), which covers a restart on the same port, gets
    its answer.
    """
    ports = {name: free_port() for name in ("grpc_port", "http_port", "metrics_port")}
    server = TritonServer(repo, models=[SLOW_MODEL], **ports).start()
    image = random_images(1, seed=9)[0]

    def async_call() -> Attribution:
        """The asyncio client in its own loop and thread, failing the same way as the sync one."""

        async def run() -> Attribution:
            async with AsyncAttributionClient(
                server.grpc_url, model=SLOW_MODEL, timeout_s=10, retries=2, backoff_s=0.1
            ) as aclient:
                return await (await aclient.submit(image))

        return asyncio.run(run())

    clients: list[AttributionClient] = []
    try:
        short = AttributionClient(server.grpc_url, model=SLOW_MODEL, timeout_s=10, retries=2, backoff_s=0.1)
        clients.append(short)
        # Retries until 60 s after its first attempt: a restart (5-10 s here) fits.
        patient = AttributionClient(server.grpc_url, model=SLOW_MODEL, timeout_s=10, backoff_s=0.25)
        clients.append(patient)
        with ThreadPoolExecutor(max_workers=5) as pool:
            doomed = [pool.submit(short.attribute, image) for _ in range(3)] + [pool.submit(async_call)]
            survivor = pool.submit(patient.attribute, image)
            time.sleep(0.7)                          # all five are sent; the first is executing
            assert not any(f.done() for f in doomed + [survivor])
            killed_at = time.monotonic()
            os.kill(server.pid, signal.SIGKILL)
            for future in doomed:
                error = future.exception(timeout=10)
                assert isinstance(error, ServerUnavailableError), repr(error)
                assert "gave up after 3 attempts" in str(error) and SLOW_MODEL in str(error)
            assert time.monotonic() - killed_at < 5
            assert not survivor.done()               # still retrying
            server.stop()                            # reap the stubs of the killed server
            server.start()                           # same ports
            down_for = time.monotonic() - killed_at
            if down_for > 45:
                pytest.fail(f"the restart took {down_for:.1f} s, too close to the 60 s deadline to test")
            result = survivor.result(timeout=60)
        assert result.probabilities == {name: pytest.approx(0.25) for name in CLASS_NAMES}  # lorax_slow's answer
    finally:
        for opened in clients:
            opened.close()
        server.stop()


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, CROP, CROP, 3), np.float32), r"images\[0\]: dtype float32, expected uint8"),
        (np.zeros((CROP, CROP, 4), np.uint8), r"image: shape \[16, 16, 4\], expected \[H, W, 3\]"),
        (np.zeros((2, CROP + 1, CROP, 3), np.uint8), r"images\[0\]: size 17x16, the model expects 16x16"),
    ],
)
def test_wrong_shape_or_dtype_is_refused_before_sending(client, bad, message):
    before = counts(client, contract.ENSEMBLE_MODEL)
    with pytest.raises(InvalidInputError, match=message):
        client.attribute(bad)
    with pytest.raises(InvalidInputError, match=message.replace("images\\[0\\]", "image")):
        client.submit(bad[0] if bad.ndim == 4 else bad)
    assert counts(client, contract.ENSEMBLE_MODEL) == before   # nothing reached the server


def test_a_corrupt_or_missing_file_is_named(client, tmp_path):
    good = write_images(tmp_path, 1, seed=10)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes(random_images(1)[0])[:40])
    with pytest.raises(InvalidInputError, match=r"broken\.png: not a readable image"):
        client.attribute([good, broken])
    with pytest.raises(InvalidInputError, match=r"missing\.png: cannot read"):
        client.attribute(tmp_path / "missing.png")


def test_the_server_rejecting_one_upload_fails_only_that_one(server, reference, tmp_path):
    """Bytes model: the server decodes, so a corrupt upload is found there; only its future fails."""
    images = random_images(3, seed=11)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with AttributionClient(server.grpc_url, model=contract.BYTES_ENSEMBLE_MODEL, max_delay_ms=50) as thin:
        futures = [thin.submit(png_bytes(images[0])), thin.submit(broken), thin.submit(png_bytes(images[1]))]
        error = futures[1].exception(timeout=30)
        good = [futures[0].result(timeout=30), futures[2].result(timeout=30)]
        with pytest.raises(InvalidInputError, match=r"images\[1\]: .*not a readable image"):
            thin.attribute([png_bytes(images[2]), b"garbage"])
    assert isinstance(error, InvalidInputError), repr(error)
    assert str(error).startswith(str(broken)) and "not a readable image" in str(error)
    np.testing.assert_allclose(probs_of(good), reference.probs(images[:2]), atol=TOLERANCE)


# ---- protection ----------------------------------------------------------------------------------
def test_protection_round_trips_shapes_and_captions(server):
    images = random_images(3, seed=12, size=20)[:, :, :18]          # non-square on purpose
    captions = ["a cat", "une photo d'été", ""]
    with ProtectionClient(server.grpc_url) as protection:
        protected = protection.protect(images, captions)
        one = protection.protect(images[0], "just one")
        with pytest.raises(InvalidInputError, match="2 captions for 3 images"):
            protection.protect(images, captions[:2])
        with pytest.raises(InvalidInputError, match="dtype float32"):
            protection.protect(images.astype(np.float32), captions)
    assert protected.images.dtype == np.uint8 and protected.images.shape == images.shape
    assert np.array_equal(protected.images, 255 - images)           # the stand-in inverts pixels
    assert protected.captions == [c + " [protected]" for c in captions]
    assert protected.model_version == "1"
    assert one.images.shape == (1, *images.shape[1:]) and one.captions == ["just one [protected]"]


def test_protection_splits_batches_larger_than_the_served_limit(server):
    images = random_images(70, seed=15, size=8)                     # the stand-in's max_batch_size is 64
    captions = [f"caption {i}" for i in range(70)]
    with ProtectionClient(server.grpc_url) as protection:
        assert protection.max_batch_size == 64
        protected = protection.protect(list(images), captions)
    assert np.array_equal(protected.images, 255 - images)
    assert protected.captions == [c + " [protected]" for c in captions]


def test_a_closed_client_says_so(server):
    """After close(), every call raises ClientClosedError -- not a ServerError about a closed channel."""
    image = random_images(1, seed=16)[0]
    attribution = AttributionClient(server.grpc_url)
    protection = ProtectionClient(server.grpc_url)
    attribution.close()
    protection.close()
    for call in (
        lambda: attribution.attribute(image),
        lambda: attribution.submit(image),
        attribution.statistics,
        lambda: protection.protect(image, "caption"),
    ):
        with pytest.raises(ClientClosedError, match="closed"):
            call()


# ---- the `aigis attribute` command ---------------------------------------------------------------
@pytest.mark.parametrize("thin", [False, True], ids=["pixels", "bytes"])
def test_cli_writes_one_json_line_per_image_and_names_unreadable_files(server, reference, tmp_path, thin):
    folder = tmp_path / "uploads"
    paths = write_images(folder / "nested", 4, seed=13)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image: skipped by extension")
    out = tmp_path / "answers.jsonl"
    argv = ["attribute", str(folder), "--url", server.grpc_url, "--out", str(out), "--quiet", "--batch-size", "3"]
    code = aigis_main(argv + (["--bytes"] if thin else []))

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 1                                     # some file failed
    assert [r["path"] for r in records] == [str(broken), *map(str, paths)]   # sorted input order
    failed, answered = records[0], records[1:]
    assert failed["error_type"] == "InvalidInputError" and str(broken) in failed["error"]
    assert "label" not in failed
    expected = reference.probs(eval_views(paths))
    got = np.array([[r["probabilities"][name] for name in CLASS_NAMES] for r in answered])
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    assert [r["label"] for r in answered] == [CLASS_NAMES[int(np.argmax(row))] for row in expected]


def test_cli_says_when_the_server_cannot_be_reached(tmp_path, capsys):
    paths = write_images(tmp_path, 1, seed=14)
    url = f"127.0.0.1:{free_port()}"                    # nobody listens there
    started = time.monotonic()
    code = aigis_main(["attribute", str(paths[0]), "--url", url, "--retries", "1", "--quiet"])
    assert code == 2 and time.monotonic() - started < 5
    error = capsys.readouterr().err
    assert f"cannot use {contract.ENSEMBLE_MODEL} at {url}" in error and "gave up after 2 attempts" in error
