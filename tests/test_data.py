"""The data stage on real files: the CDDB loader on a hand-made tree (good and broken), the synthetic
benchmark generator (determinism, distinct generator fingerprints), scenario resolution, and the
`aigis data` command line end to end.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigis.cli import main as aigis_main
from aigis.data.cddb import (CDDB, BadImageLog, CDDBLayoutError, find_samples, header_problem, list_tasks,
                             screen_samples)
from aigis.data.dataset import build_dataset
from aigis.data.scenarios import SCENARIOS, resolve_tasks
from aigis.data.synth import DEFAULT_TASKS, TASKS, SynthConfig, generate
from aigis.preprocess import MAX_PIXELS, BadImageError


# ---- a hand-made CDDB tree ----------------------------------------------------------------------------

def _image_bytes(seed: int, fmt: str = "PNG", size: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tree(root: Path) -> Path:
    """alpha: flat class folders (PNG + JPEG); beta: two subcategory folders; plus files a loader must ignore."""
    seed = 0
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("0_real", "1_fake"):
            for i in range(count):
                seed += 1
                fmt, suffix = ("JPEG", "jpg") if i == 0 else ("PNG", "png")
                _write(root / "alpha" / split / cls / f"{i}.{suffix}", _image_bytes(seed, fmt))
            for sub in ("cat", "dog"):
                for i in range(count - 1):
                    seed += 1
                    _write(root / "beta" / split / sub / cls / f"{i}.PNG", _image_bytes(seed))
    _write(root / "alpha" / "train" / "0_real" / "notes.txt", b"not an image, not listed")
    _write(root / "alpha" / "train" / "0_real" / ".hidden.png", b"hidden, not listed")
    (root / ".cache").mkdir()
    return root


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming width x height, and IEND: no pixel data to decode at all."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "cddb")


def test_loader_lists_labels_and_subcategories(tree):
    data = CDDB(tree, ["alpha", "beta"], progress=False)
    assert list_tasks(tree) == ["alpha", "beta"]                       # .cache is hidden
    alpha = data.samples("alpha", "train")
    assert sorted(s.relpath for s in alpha) == [
        "alpha/train/0_real/0.jpg", "alpha/train/0_real/1.png", "alpha/train/0_real/2.png",
        "alpha/train/1_fake/0.jpg", "alpha/train/1_fake/1.png", "alpha/train/1_fake/2.png"]
    assert {(s.relpath.split("/")[2], s.label) for s in alpha} == {("0_real", 0), ("1_fake", 1)}
    beta = data.samples(1, "train")
    assert len(beta) == 8 and {s.subcategory for s in beta} == {"cat", "dog"}
    assert {(s.subcategory, s.is_real, s.label) for s in beta} == {
        ("cat", True, 2), ("cat", False, 3), ("dog", True, 2), ("dog", False, 3)}
    assert len(data.samples("beta", "val")) == 4 and len(data.bad) == 0

    # The order decides the labels: beta first takes labels 0 and 1.
    swapped = CDDB(tree, ["beta", "alpha"], progress=False)
    assert {s.label for s in swapped.samples("beta", "val")} == {0, 1}
    assert {s.label for s in swapped.samples("alpha", "val")} == {2, 3}
    # Remembered exemplars come back by relative path and label, and a wrong label is refused.
    assert swapped.sample_at("alpha/train/1_fake/1.png", 3).path == tree / "alpha/train/1_fake/1.png"
    with pytest.raises(CDDBLayoutError, match="disagrees with its class folder"):
        swapped.sample_at("alpha/train/1_fake/1.png", 2)

    # The training view reads the files: uint8 crops, labels as listed, same crop for the same epoch.
    dataset = build_dataset(data, [0, 1], "val", crop=16, train=True, seed=3, progress=False)
    image, label, task = dataset[5]
    assert image.shape == (16, 16, 3) and str(image.dtype) == "torch.uint8"
    assert (label, task) == (dataset.samples[5].label, dataset.samples[5].task)
    assert np.array_equal(dataset.view(5), dataset.view(5))


def test_missing_task_and_empty_class_are_named(tree):
    with pytest.raises(CDDBLayoutError, match=r"ghost.*alpha, beta"):
        CDDB(tree, ["alpha", "ghost"], progress=False)
    for f in (tree / "beta" / "val" / "dog" / "1_fake").iterdir():
        f.unlink()
    data = CDDB(tree, ["alpha", "beta"], progress=False)
    with pytest.raises(CDDBLayoutError, match=r"beta/val/dog/1_fake holds no images"):
        data.samples("beta", "val")
    (tree / "alpha" / "val" / "1_fake").rename(tree / "alpha" / "val" / "fake")
    with pytest.raises(CDDBLayoutError, match=r"alpha/val.*mixes class folders|alpha/val.*no 1_fake"):
        data.samples("alpha", "val")
    with pytest.raises(ValueError, match="repeats"):
        CDDB(tree, ["alpha", "alpha"], progress=False)


def test_unreadable_images_are_skipped_and_listed_or_stop_the_run(tree):
    real = tree / "alpha" / "train" / "0_real"
    truncated = _write(real / "truncated.png", _image_bytes(99)[:150])
    not_image = _write(real / "letter.png", b"Dear reader, this is text with a .png name.\n" * 4)
    jpeg = _image_bytes(98, "JPEG", size=40)
    cut_jpeg = _write(real / "cut.jpg", jpeg[: len(jpeg) // 2])          # no end marker: decoded in full
    data = CDDB(tree, ["alpha", "beta"], on_bad="skip", progress=False)
    kept = data.samples("alpha", "train")
    assert len(kept) == 6 and {s.path for s in kept}.isdisjoint({truncated, not_image, cut_jpeg})
    assert set(data.bad.skipped) == {str(truncated), str(not_image), str(cut_jpeg)}
    assert all("not a readable image" in reason or "truncat" in reason.lower()
               for reason in data.bad.skipped.values())
    assert str(truncated) in data.report() and "skipped 3 unreadable image(s)" in data.report()

    stop = CDDB(tree, ["alpha", "beta"], on_bad="stop", progress=False)
    with pytest.raises(BadImageError, match=r"(letter\.png|truncated\.png|cut\.jpg)"):
        stop.prepare()

    # Once every real image of a class is unreadable, the task cannot be learned: named, even under skip.
    for f in (tree / "beta" / "train" / "cat" / "0_real").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(CDDBLayoutError, match=r"beta/train/cat/0_real: every image is unreadable"):
        CDDB(tree, ["alpha", "beta"], on_bad="skip", progress=False).samples("beta", "train")


def test_oversized_header_is_refused_without_decoding(tree):
    side = int(MAX_PIXELS ** 0.5) + 1000
    huge = _write(tree / "alpha" / "val" / "1_fake" / "huge.png", _png_header_only(side, side))
    assert huge.stat().st_size < 100                       # nothing to decode: only the header speaks
    reason = header_problem(huge)
    assert reason == f"{side}x{side} pixels is over the {MAX_PIXELS}-pixel limit"
    # A lower limit refuses an ordinary image the same way; the default accepts it.
    small = tree / "alpha" / "val" / "1_fake" / "1.png"
    assert header_problem(small) is None
    assert "over the 100-pixel limit" in header_problem(small, max_pixels=100)
    log = BadImageLog("skip")
    good = screen_samples(find_samples(tree, "alpha", 0, "val"), log, progress=False)
    assert len(good) == 4 and list(log.skipped) == [str(huge)]


# ---- the synthetic benchmark ------------------------------------------------------------------------

def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _high_frequency_stats(image: np.ndarray) -> tuple[float, float]:
    """(share of spectral energy above 1/4 cycle per pixel, share on the Nyquist row and column)."""
    grey = image.astype(np.float64).mean(axis=2)
    power = np.abs(np.fft.fft2(grey - grey.mean())) ** 2
    n = grey.shape[0]
    freq = np.fft.fftfreq(n)
    radius = np.hypot(freq[:, None], freq[None, :])
    nyquist = power[n // 2, :].sum() + power[:, n // 2].sum()
    return float(power[radius > 0.25].sum() / power.sum()), float(nyquist / power.sum())


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory):
    """Every generator family, written twice with one seed and once with another."""
    base = tmp_path_factory.mktemp("synth")
    config = SynthConfig(tasks=len(TASKS), train_per_class=2, val_per_class=4, size=32, seed=3)
    for name, cfg in (("a", config), ("b", config), ("c", SynthConfig(**{**config.__dict__, "seed": 4}))):
        assert generate(base / name, cfg, progress=False) is True
    return base


def test_synth_is_byte_identical_for_a_seed_and_changes_with_it(synth_pair):
    a, b, c = (_digests(synth_pair / n) for n in "abc")
    assert a == b
    assert len(a) == 1 + len(TASKS) * 2 * (2 + 4)           # synth.json + every image
    assert set(a) == set(c)
    changed = [k for k in a if k != "synth.json" and a[k] != c[k]]
    assert len(changed) == len(a) - 1                             # another seed: every image differs
    manifest = json.loads((synth_pair / "a" / "synth.json").read_text())
    assert manifest["tasks"] == [t.name for t in TASKS] and manifest["seed"] == 3


def test_synth_layout_loads_and_is_left_alone_when_current(synth_pair):
    root = synth_pair / "a"
    data = CDDB(root, [t.name for t in TASKS], progress=False)
    data.prepare()
    assert len(data.bad) == 0
    assert {s.subcategory for s in data.samples("tconv", "val")} == {"cat", "coffee"}
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    config = SynthConfig(tasks=len(TASKS), train_per_class=2, val_per_class=4, size=32, seed=3)
    assert generate(root, config, progress=False) is False
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    with pytest.raises(FileExistsError, match="--force"):
        generate(root, SynthConfig(tasks=1, train_per_class=2, val_per_class=2, size=32), progress=False)
    with pytest.raises(ValueError, match="--size"):
        generate(synth_pair / "x", SynthConfig(size=30), progress=False)
    # tconv splits each class over two subcategories: one image per class would leave a folder empty.
    with pytest.raises(ValueError, match=r"at least 2: task tconv has 2 subcategories \(cat, coffee\)"):
        generate(synth_pair / "x", SynthConfig(tasks=1, train_per_class=5, val_per_class=1), progress=False)
    assert not (synth_pair / "x").exists()


def test_generator_families_leave_different_fingerprints(synth_pair):
    root = synth_pair / "a"

    def stats(task: str, cls: str) -> np.ndarray:
        files = sorted((root / task / "val").rglob(f"{cls}/*"))
        return np.mean([_high_frequency_stats(np.asarray(Image.open(f).convert("RGB"))) for f in files], axis=0)

    fakes = {t.name: stats(t.name, "1_fake") for t in TASKS}
    reals = {t.name: stats(t.name, "0_real") for t in TASKS}
    # Transposed convolutions leave a checkerboard: energy at the Nyquist frequency, which photos lack.
    for name in ("tconv", "tconv4x"):
        assert fakes[name][1] > 10 * reals[name][1], (name, fakes[name], reals[name])
    # Every family's fakes sit somewhere else in (high-frequency share, Nyquist share), on a log scale.
    points = {name: np.log(value) for name, value in fakes.items()}
    names = list(points)
    closest = min(np.linalg.norm(points[x] - points[y]) for i, x in enumerate(names) for y in names[i + 1:])
    assert closest > 0.1, {k: v.round(4).tolist() for k, v in fakes.items()}


# ---- scenarios ----------------------------------------------------------------------------------------

def test_scenarios_resolve_and_fail_clearly(tree, tmp_path):
    assert SCENARIOS["easy"][:2] == ("gaugan", "biggan") and len(SCENARIOS["long"]) == 12
    assert list(SCENARIOS["synth"]) == list(DEFAULT_TASKS)
    assert resolve_tasks(None, None, root=tree) == ["alpha", "beta"]
    assert resolve_tasks(" beta , alpha", None, root=tree) == ["beta", "alpha"]
    order_file = _write(tmp_path / "order.txt", b"# my order\nbeta   # first\n\nalpha\n")
    assert resolve_tasks(None, str(order_file), root=tree) == ["beta", "alpha"]

    for name in ("easy", "HARD", "Long"):                     # built-in names, any case; tasks checked
        with pytest.raises(ValueError, match=r"gaugan.*not found under.*alpha, beta"):
            resolve_tasks(None, name, root=tree)
    with pytest.raises(ValueError, match=r"unknown scenario 'medium'.*easy, hard, long"):
        resolve_tasks(None, "medium", root=tree)
    with pytest.raises(ValueError, match=r"gamma not found.*holds: alpha, beta"):
        resolve_tasks("alpha,gamma", None, root=tree)
    with pytest.raises(ValueError, match=r"alpha more than once"):
        resolve_tasks("alpha,beta,alpha", None, root=tree)
    with pytest.raises(ValueError, match=r"names no task"):
        resolve_tasks(" , ", None, root=tree)
    with pytest.raises(ValueError, match=r"names no task"):
        resolve_tasks(None, str(_write(tmp_path / "empty.txt", b"# nothing\n")), root=tree)
    with pytest.raises(ValueError, match="not both"):
        resolve_tasks("alpha", "easy", root=tree)
    with pytest.raises(ValueError, match=r"does not exist"):
        resolve_tasks(None, None, root=tmp_path / "nowhere")


def test_synth_order_comes_from_its_manifest(synth_pair):
    assert resolve_tasks(None, None, root=synth_pair / "a") == [t.name for t in TASKS]
    assert resolve_tasks(None, "synth5", root=synth_pair / "a") == list(DEFAULT_TASKS[:5])


# ---- the command line ---------------------------------------------------------------------------------

def test_data_cli_synth_and_check(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["data", "synth", "--out", str(out), "--tasks", "2", "--train-per-class", "2",
            "--val-per-class", "2", "--size", "32", "--seed", "7", "--quiet"]
    assert aigis_main(args) == 0
    assert "written" in capsys.readouterr().out
    first = _digests(out)
    assert aigis_main(args) == 0
    assert "already up to date, left alone" in capsys.readouterr().out
    assert _digests(out) == first
    assert aigis_main(args[:-3] + ["--seed", "8", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert _digests(out) == first
    assert aigis_main(args[:-3] + ["--seed", "8", "--force", "--quiet"]) == 0
    assert _digests(out) != first

    assert aigis_main(["data", "check", "--data", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "2 task(s)" in text and "every image is readable" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("tconv", "nearest"))]
    assert [row for row in rows if row[1] in ("train", "val")] == [
        ["tconv", "train", "2", "2", "cat,", "coffee"], ["tconv", "val", "2", "2", "cat,", "coffee"],
        ["nearest", "train", "2", "2"], ["nearest", "val", "2", "2"]]
    assert [row for row in rows if row[1] not in ("train", "val")] == [["tconv", "32x32", "32-32"],
                                                                        ["nearest", "32x32", "32-32"]]


def test_data_cli_check_reports_bad_files_and_layout_errors(tree, capsys):
    bad = _write(tree / "beta" / "val" / "cat" / "1_fake" / "zz.png", b"<html>not a png</html>")
    assert aigis_main(["data", "check", "--data", str(tree), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "1 unreadable image(s) left out" in out and str(bad) in out
    assert [line.split()[:4] for line in out.splitlines() if line.strip().startswith("beta")] == [
        ["beta", "train", "4", "4"], ["beta", "val", "2", "2"], ["beta", "20x20", "20-20"]]   # the unreadable one left out

    assert aigis_main(["data", "check", "--data", str(tree), "--on-bad", "stop", "--quiet"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert aigis_main(["data", "check", "--data", str(tree), "--scenario", "hard", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aigis data check: error:") and "gaugan" in err
    (tree / "alpha" / "train" / "0_real").rename(tree / "alpha" / "train" / "real")
    assert aigis_main(["data", "check", "--data", str(tree), "--tasks", "alpha", "--quiet"]) == 2
    assert "alpha/train" in capsys.readouterr().err


def test_data_check_reports_image_sizes_and_warns_of_a_crop_that_wastes_them(tree, tmp_path, capsys):
    assert aigis_main(["data", "check", "--data", str(tree), "--tasks", "alpha,beta", "--crop", "16", "--quiet"]) in (0, 1)
    out = capsys.readouterr().out
    assert "median size" in out and "20x20" in out and "warning" not in out        # 16 of 20: most of it
    aigis_main(["data", "check", "--data", str(tree), "--tasks", "alpha,beta", "--crop", "8", "--quiet"])
    out = capsys.readouterr().out
    assert "warning: crop 8 keeps 16% of a median alpha image (20x20)" in out
    config = tmp_path / "c.toml"
    config.write_text("crop = 8\n")
    aigis_main(["data", "check", "--data", str(tree), "--tasks", "alpha,beta", "--config", str(config), "--quiet"])
    assert "warning: crop 8" in capsys.readouterr().out
