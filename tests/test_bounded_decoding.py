"""Untrusted images cost a bounded amount, and data readers never read outside their root.

Decoding: an image over the pixel budget or the side limit is refused from its header (in-process, in the
served decode step over real gRPC, and in the served protect-on-upload model), and upscaling a thin strip to
the crop resamples only the crop, while ordinary images keep exactly the pixels they always had.
Data roots: `aigis data check` and the protection manifest reader refuse links and paths leading out.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigis import contract, preprocess
from aigis.preprocess import BadImageError

REFUSAL_S = 0.1


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _blank_png(width: int, height: int) -> bytes:
    """A 1-bit PNG: a few bytes on disk however many pixels it claims."""
    return _png(Image.new("1", (width, height)))


def _rgb_png(array: np.ndarray) -> bytes:
    return _png(Image.fromarray(array))


# ---- refusal from the header ------------------------------------------------------------------------------

def test_defaults():
    assert preprocess.MAX_PIXELS == 40_000_000 and preprocess.MAX_SIDE == 16_384


@pytest.mark.parametrize("width, height, reason", [
    (100_000, 1, "100000x1 pixels has a side over the 16384-pixel limit"),
    (1, 100_000, "1x100000 pixels has a side over the 16384-pixel limit"),
    (7000, 7000, "7000x7000 pixels is over the 40000000-pixel limit"),
])
def test_oversized_images_are_refused_from_the_header_at_once(width, height, reason):
    data = _blank_png(width, height)
    assert len(data) < 10_000
    start = time.perf_counter()
    with pytest.raises(BadImageError) as refused:
        preprocess.eval_view_from_bytes(data, 224, name="upload.png")
    assert time.perf_counter() - start < REFUSAL_S
    assert str(refused.value) == f"upload.png: {reason}"


def test_the_data_scan_refuses_a_strip_from_its_header(tmp_path):
    from aigis.data.cddb import header_problem

    strip = tmp_path / "strip.png"
    strip.write_bytes(_blank_png(100_000, 1))
    assert header_problem(strip) == "100000x1 pixels has a side over the 16384-pixel limit"
    assert header_problem(strip, max_side=100_000) is None


def test_limits_are_parameters_everywhere_images_are_decoded(tmp_path):
    data = _rgb_png(np.zeros((30, 20, 3), np.uint8))
    with pytest.raises(BadImageError, match="upload.png: 20x30 pixels has a side over the 25-pixel limit"):
        preprocess.decode_image(data, name="upload.png", max_side=25)
    with pytest.raises(BadImageError, match="over the 500-pixel limit"):
        preprocess.eval_view_from_bytes(data, 16, max_pixels=500)
    path = tmp_path / "small.png"
    path.write_bytes(data)
    with pytest.raises(BadImageError, match=f"{path}: 20x30 pixels has a side over the 29-pixel limit"):
        preprocess.eval_view_from_file(path, 16, max_side=29)
    assert preprocess.load_image(path, max_side=30).shape == (30, 20, 3)


# ---- the crop of a thin strip costs a crop --------------------------------------------------------------------

def _whole_resize_window(image: np.ndarray, size: int, top: int | None = None, left: int | None = None,
                         resample=Image.BILINEAR) -> np.ndarray:
    """The whole short-side resize, then cut: what the crops computed for every image before bounding."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    top = (new_h - size) // 2 if top is None else top
    left = (new_w - size) // 2 if left is None else left
    return resized[top : top + size, left : left + size]


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (31, 64), (64, 31), (17, 17), (1, 40), (3, 500), (8, 32)])
def test_ordinary_images_keep_their_pixels_bit_for_bit(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    assert np.array_equal(preprocess.center_crop(image, 32), _whole_resize_window(image, 32))
    # the training view draws the same window and resamples it the same way
    rng, again = np.random.default_rng(7), np.random.default_rng(7)
    crop = preprocess.random_crop(image, 32, rng)
    new_h, new_w = preprocess.short_side_shape(*shape, 32)
    top, left = int(again.integers(0, new_h - 31)), int(again.integers(0, new_w - 31))
    assert np.array_equal(crop, _whole_resize_window(image, 32, top, left))
    # the protection reader's bicubic fit, down- and upscaling
    from aigis.protection.captions import _fit

    assert np.array_equal(_fit(image, 32), _whole_resize_window(image, 32, resample=Image.BICUBIC))
    assert np.array_equal(_fit(image, 12), _whole_resize_window(image, 12, resample=Image.BICUBIC))


def test_window_resampling_stays_within_a_level_of_the_whole_resize(monkeypatch):
    """The bounded path (forced here for every image) is the same picture as the whole resize."""
    monkeypatch.setattr(preprocess, "EXACT_RESIZE_PIXELS", 0)
    rng = np.random.default_rng(0)
    for _ in range(40):
        size = int(rng.choice([16, 32, 64]))
        short = int(rng.integers(1, size))
        long = int(rng.integers(short, 40 * short + 2))
        shape = (short, long) if rng.random() < 0.5 else (long, short)
        image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
        for resample, levels in ((Image.BILINEAR, 1), (Image.BICUBIC, 2)):
            new_h, new_w = preprocess.short_side_shape(*shape, size)
            top, left = (new_h - size) // 2, (new_w - size) // 2
            window = preprocess.resized_window(image, size, top, left, resample)
            difference = np.abs(window.astype(int) - _whole_resize_window(image, size, resample=resample))
            assert difference.max() <= levels and (difference > 0).mean() < 0.02, (shape, size, resample)


@pytest.mark.parametrize("width, height", [(16_384, 1), (1, 16_384), (16_384, 2)])
def test_a_strip_inside_the_limits_is_cropped_cheaply(width, height):
    # The whole resize would be 3.7 million x 224 pixels (2.4 GB); the window is 224 x 224.
    data = _rgb_png(np.random.default_rng(1).integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    start = time.perf_counter()
    view = preprocess.eval_view_from_bytes(data, 224)
    assert time.perf_counter() - start < 1.0
    assert view.shape == (224, 224, 3) and view.dtype == np.uint8 and view.flags.c_contiguous
    crop = preprocess.random_crop(preprocess.decode_image(data), 224, np.random.default_rng(0))
    assert crop.shape == (224, 224, 3)


# ---- the served decode step ---------------------------------------------------------------------------------

class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _FakeBackendUtils:
    """The few triton_python_backend_utils names the models use, for in-process calls."""

    Tensor = _Tensor

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str = "INTERNAL") -> None:
            self.message, self.code = message, code

    class InferenceResponse:
        def __init__(self, output_tensors: list, error=None) -> None:
            self.outputs = {t.name: t.array for t in output_tensors}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request: dict, name: str) -> _Tensor:
        return _Tensor(name, request[name])


def _bytes_request(*items: bytes) -> dict:
    return {contract.IMAGE_BYTES: np.array([[item] for item in items], dtype=np.object_)}


def test_decode_step_reads_its_limits_from_the_config(monkeypatch):
    from aigis.export import decode_model

    monkeypatch.setattr(decode_model, "pb_utils", _FakeBackendUtils)
    model = decode_model.TritonPythonModel()
    config = {"name": "lorax_decode_v1", "parameters": {"crop": {"string_value": "16"},
                                                        "max_pixels": {"string_value": "1000"}}}
    model.initialize({"model_config": json.dumps(config)})
    assert (model.max_pixels, model.max_side) == (1000, preprocess.MAX_SIDE)
    good = _rgb_png(np.full((30, 20, 3), 9, np.uint8))
    strip, big = _blank_png(100_000, 1), _rgb_png(np.zeros((40, 30, 3), np.uint8))
    answers = model.execute([_bytes_request(good, good), _bytes_request(good, strip), _bytes_request(big)])
    assert answers[0].error is None and answers[0].outputs[contract.IMAGES].shape == (2, 16, 16, 3)
    for answer, reason in ((answers[1], "IMAGE_BYTES[1]: 100000x1 pixels has a side over the 16384-pixel limit"),
                           (answers[2], "IMAGE_BYTES[0]: 30x40 pixels is over the 1000-pixel limit")):
        assert answer.error.code == "INVALID_ARG" and answer.error.message == reason

    config["parameters"]["max_side"] = {"string_value": "lots"}
    with pytest.raises(ValueError, match="lorax_decode_v1: parameter max_side='lots' must be a positive integer"):
        model.initialize({"model_config": json.dumps(config)})


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM), else its current one."""
    import psutil

    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss


@pytest.mark.slow
def test_served_decode_step_refuses_a_strip_at_once_and_keeps_serving(tmp_path):
    import psutil
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from aigis.serving.server import TritonServer
    from test_client_standin import CROP, build_repository, random_images

    repo = build_repository(tmp_path / "repo")
    decode = contract.decode_model(1)
    # The real decode step (as export writes it: a shim importing the package), its pixel budget set lower.
    (repo / decode / "1" / "model.py").write_text("from aigis.export.decode_model import TritonPythonModel  # noqa\n")
    with (repo / decode / "config.pbtxt").open("a") as config:
        config.write('parameters { key: "max_pixels" value: { string_value: "1000000" } }\n')

    def send(client, data: bytes):
        item = grpcclient.InferInput(contract.IMAGE_BYTES, [1, 1], "BYTES")
        item.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        return client.infer(contract.BYTES_ENSEMBLE_MODEL, [item])

    good = _rgb_png(random_images(1, size=CROP + 5)[0])
    with TritonServer(repo, models=[contract.BYTES_ENSEMBLE_MODEL]) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert send(client, good).as_numpy(contract.PROBS).shape == (1, 4)       # warm: every step answers
        for data, reason in ((_blank_png(100_000, 1), "IMAGE_BYTES[0]: 100000x1 pixels has a side over the "
                                                      "16384-pixel limit"),
                             (_blank_png(1, 100_000), "IMAGE_BYTES[0]: 1x100000 pixels has a side over"),
                             (_blank_png(1200, 1000), "IMAGE_BYTES[0]: 1200x1000 pixels is over the "
                                                      "1000000-pixel limit")):
            start = time.perf_counter()
            with pytest.raises(InferenceServerException) as refused:
                send(client, data)
            elapsed = time.perf_counter() - start
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and reason in refused.value.message()
            assert elapsed < 1.0, f"refusal took {elapsed:.3f} s round trip"
        assert send(client, good).as_numpy(contract.PROBS).shape == (1, 4)       # still serving
        stubs = [p for p in psutil.Process(server.pid).children(recursive=True)
                 if any(decode in part for part in p.cmdline())]
        assert stubs, "no Python backend stub of the decode step found"
        for stub in stubs:
            assert _peak_rss_bytes(stub.pid) < 300 * 2**20, f"decode stub peaked at {_peak_rss_bytes(stub.pid)} bytes"


# ---- the served protect-on-upload model ------------------------------------------------------------------------

def test_protect_model_refuses_oversized_uploads_before_any_work(tmp_path, monkeypatch):
    from aigis.protection import triton_model
    from aigis.protection.captions import read_pairs, synth_captioned
    from aigis.protection.clip import build_clip
    from aigis.protection.mem import MEMSettings, save_surrogate
    from aigis.protection.served import publish_protect_model
    from aigis.protection.tokenizer import Tokenizer

    pairs = read_pairs(synth_captioned(tmp_path / "captions", n_train=4, n_test=0, size=32, seed=0), "train.jsonl")
    tokenizer = Tokenizer.train([p.caption for p in pairs], vocab_size=600)
    surrogate = tmp_path / "surrogate"
    save_surrogate(surrogate, build_clip("rn_tiny", vocab_size=tokenizer.vocab_size), tokenizer,
                   MEMSettings(trigger_length=2, candidates=2, pgd_steps=1, batch_size=4, seed=0))
    repo = tmp_path / "repo"
    version = publish_protect_model(repo, surrogate, steps=1)

    monkeypatch.setattr(triton_model, "pb_utils", _FakeBackendUtils)
    model = triton_model.TritonPythonModel()
    config = {"name": contract.PROTECT_MODEL, "parameters": {"max_pixels": {"string_value": "2000"}}}
    model.initialize({"model_repository": str(repo / contract.PROTECT_MODEL), "model_version": str(version),
                      "model_config": json.dumps(config)})
    assert (model.max_pixels, model.max_side) == (2000, preprocess.MAX_SIDE)

    def request(images: np.ndarray) -> dict:
        captions = np.array([[f"a red circle {i}".encode()] for i in range(images.shape[0])], dtype=np.object_)
        return {contract.PROTECT_IMAGES: images, contract.PROTECT_CAPTIONS: captions}

    good = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    strip = np.zeros((1, 1, 16_385, 3), np.uint8)
    big = np.zeros((1, 50, 50, 3), np.uint8)
    answers = model.execute([request(strip), request(good), request(big)])
    for answer, reason in ((answers[0], "16385x1 pixels has a side over the 16384-pixel limit"),
                           (answers[2], "50x50 pixels is over the 2000-pixel limit")):
        assert answer.error.code == "INVALID_ARG" and answer.error.message == f"{contract.PROTECT_IMAGES}: {reason}"
    assert answers[1].error is None and answers[1].outputs[contract.PROTECTED_IMAGES].shape == (2, 32, 32, 3)


# ---- data readers stay inside their root ----------------------------------------------------------------------

def _opened_paths(monkeypatch) -> list[Path]:
    """Record every path opened, listed or read through the usual calls from now on."""
    import builtins
    import pathlib

    import PIL.Image

    seen: list[Path] = []
    real_open, real_image_open = builtins.open, PIL.Image.open
    real_iterdir, real_read_bytes = pathlib.Path.iterdir, pathlib.Path.read_bytes

    def record(target):
        if isinstance(target, (str, Path)):
            seen.append(Path(target))

    def fake_open(file, *args, **kwargs):
        record(file)
        return real_open(file, *args, **kwargs)

    def fake_image_open(fp, *args, **kwargs):
        record(fp)
        return real_image_open(fp, *args, **kwargs)

    def fake_iterdir(self):
        record(self)
        return real_iterdir(self)

    def fake_read_bytes(self):
        record(self)
        return real_read_bytes(self)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(PIL.Image, "open", fake_image_open)
    monkeypatch.setattr(pathlib.Path, "iterdir", fake_iterdir)
    monkeypatch.setattr(pathlib.Path, "read_bytes", fake_read_bytes)
    return seen


@pytest.fixture
def leaky_tree(tmp_path):
    """A CDDB tree with a link to a (perfectly readable) image outside it and a linked-in outside folder."""
    from test_data import _image_bytes, _write, make_tree

    root = make_tree(tmp_path / "cddb")
    outside = tmp_path / "outside"
    secret = _write(outside / "secret.png", _image_bytes(99))
    for cls in ("0_real", "1_fake"):
        _write(outside / "sub" / cls / "0.png", _image_bytes(98))
    (root / "alpha" / "train" / "0_real" / "leak.png").symlink_to(secret)
    (root / "beta" / "train" / "evil").symlink_to(outside / "sub", target_is_directory=True)
    # a link that stays inside the root is data like any other file
    (root / "alpha" / "val" / "1_fake" / "alias.png").symlink_to(root / "alpha" / "val" / "1_fake" / "1.png")
    return root, outside


def test_data_check_refuses_links_out_of_the_root_without_opening_them(leaky_tree, monkeypatch, capsys):
    from aigis.cli import main as aigis_main

    root, outside = leaky_tree
    seen = _opened_paths(monkeypatch)
    assert aigis_main(["data", "check", "--data", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    monkeypatch.undo()
    assert not [p for p in seen if p.resolve().is_relative_to(outside.resolve())]
    leak, evil = root / "alpha" / "train" / "0_real" / "leak.png", root / "beta" / "train" / "evil"
    assert "2 unreadable image(s) left out" in out
    for path in (leak, evil):
        assert f"  {path}: lies outside the data root {root.resolve()}" in out
    rows = {tuple(line.split()[:4]) for line in out.splitlines() if line.strip().startswith(("alpha", "beta"))
            and line.split()[1] in ("train", "val")}
    assert rows == {("alpha", "train", "3", "3"), ("alpha", "val", "2", "3"),        # alias.png counted
                    ("beta", "train", "4", "4"), ("beta", "val", "2", "2")}

    assert aigis_main(["data", "check", "--data", str(root), "--on-bad", "stop", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(leak) in err and "lies outside the data root" in err


def test_label_folders_and_remembered_images_outside_the_root_are_layout_errors(leaky_tree, capsys):
    from aigis.cli import main as aigis_main
    from aigis.data.cddb import CDDB, CDDBLayoutError

    root, outside = leaky_tree
    data = CDDB(root, ["alpha", "beta"], on_bad="skip", progress=False)
    with pytest.raises(CDDBLayoutError, match="alpha/train/0_real/leak.png: remembered image lies outside"):
        data.sample_at("alpha/train/0_real/leak.png", 0)

    (root / "gamma").symlink_to(outside, target_is_directory=True)       # a whole task folder
    assert aigis_main(["data", "check", "--data", str(root), "--tasks", "gamma", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'gamma'}: lies outside the data root" in err

    fake = root / "alpha" / "val" / "1_fake"                              # a class folder: labels depend on it
    fake.rename(outside / "1_fake")
    fake.symlink_to(outside / "1_fake", target_is_directory=True)
    assert aigis_main(["data", "check", "--data", str(root), "--tasks", "alpha", "--quiet"]) == 2
    assert f"{fake}: lies outside the data root" in capsys.readouterr().err


def test_protection_manifest_refuses_paths_leading_out(tmp_path):
    from aigis.protection.captions import PairsManifestError, read_pairs

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(_rgb_png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "outside.png").write_bytes(_rgb_png(np.zeros((8, 8, 3), np.uint8)))
    (root / "images" / "link.png").symlink_to(tmp_path / "outside.png")

    def manifest(image: str) -> str:
        lines = [{"image": "images/ok.png", "caption": "fine"}, {"image": image, "caption": "leak"}]
        (root / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        return "m.jsonl"

    assert len(read_pairs(root, manifest("images/ok.png"))) == 2
    for image, reason in (("../outside.png", "leaves the data root"),
                          (str(tmp_path / "outside.png"), "must be relative to the data root"),
                          ("images/link.png", "leaves the data root")):
        with pytest.raises(PairsManifestError) as refused:
            read_pairs(root, manifest(image))
        assert f"m.jsonl:2: path {image!r} {reason}" in str(refused.value)
