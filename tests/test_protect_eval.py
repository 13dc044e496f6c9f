"""Protection evaluation: hacker CLIPs trained on clean / random / protected files, clean-test retrieval.

The protected set here is a stand-in for MEM built in the test with numpy: every image gets a strong
random block code and its caption four made-up trigger words that spell the code, an obvious
shortcut that a contrastive learner takes instead of the scene semantics. The evaluation code under
test knows nothing about it: it reads the set from files like any protected folder.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aigis.cli import main
from aigis.preprocess import load_image
from aigis.protection.captions import Pair, read_pairs, synth_captioned
from aigis.protection.evaluate import (
    EvaluationError,
    TrainingSet,
    compare_to_clean,
    epsilon_levels,
    evaluate_protection,
    example_sheet,
    psnr,
    read_protected_set,
    write_random_set,
    write_transformed_set,
)

N_TRAIN, N_TEST, SIZE = 160, 80, 32
# Fast settings at which a clean-trained rn_tiny retrieves well above chance on the procedural data.
FAST = dict(clip_preset="rn_tiny", image_size=SIZE, epochs=10, batch_size=32, lr=1e-3, seed=0, device="cpu")
PATTERN_LEVELS = 48


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioned")
    synth_captioned(root, N_TRAIN, N_TEST, size=SIZE, seed=3)
    return root


# Trigger vocabulary: row r of the 4x4 code is spelled by one of 16 made-up words for that row.
ROW_WORDS = [[f"q{'aeio'[r]}{a}{b}" for a in "bdfg" for b in "klmn"] for r in range(4)]


def make_shortcut_set(root, out):
    """Per pair: a random 4x4 block code of +-48 levels over the image, spelled in the caption by four
    made-up trigger words (one per code row) -- a shared, compositional shortcut like MEM's.
    Written in the protected-set layout (manifest.jsonl, images/, protection.json)."""
    pairs = read_pairs(root, "train.jsonl")
    rng = np.random.default_rng(11)
    (out / "images").mkdir(parents=True)
    lines = []
    for pair in pairs:
        image = load_image(pair.path).astype(np.int16)
        bits = rng.integers(0, 2, size=(4, 4))
        cell = image.shape[0] // 4
        signs = np.kron(bits * 2 - 1, np.ones((cell, cell), dtype=np.int16))[..., None]
        protected = np.clip(image + signs * PATTERN_LEVELS, 0, 255).astype(np.uint8)
        Image.fromarray(protected).save(out / "images" / f"{pair.path.stem}.png")
        trigger = " ".join(ROW_WORDS[r][int("".join(map(str, bits[r])), 2)] for r in range(4))
        lines.append({"image": f"images/{pair.path.stem}.png", "caption": f"{trigger} {pair.caption}"})
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "protection.json").write_text(json.dumps({"mode": "shortcut", "epsilon": PATTERN_LEVELS / 255}))
    return out


def broken_copy(source, out, *, swap: bool = False, drop_last: bool = False):
    """A copy of a protected set whose manifest has pairs 4 and 5 swapped, or its last pair missing."""
    shutil.copytree(source, out)
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    if swap:
        lines[3], lines[4] = lines[4], lines[3]
    if drop_last:
        lines = lines[:-1]
    (out / "manifest.jsonl").write_text("".join(lines))
    return out


@pytest.fixture(scope="module")
def shortcut(data, tmp_path_factory):
    return make_shortcut_set(data, tmp_path_factory.mktemp("shortcut") / "set")


@pytest.fixture(scope="module")
def efficacy(data, shortcut, tmp_path_factory):
    """One evaluation shared by the efficacy tests: clean vs the shortcut set, same seed and steps. The stand-in's
    code is laid on a fixed 4x4 grid of the image, which random crops and flips misalign: these tests check that
    the evaluation measures a collapse, not how a protection stands augmentation, so the hackers train without it."""
    import torch

    out = tmp_path_factory.mktemp("eval")
    # The same two threads on every machine: with 80 test pairs R@1 moves in steps of 1/80, and a hacker trained
    # with another summation order (1 thread) lands on other steps (measured: 0.50 of clean with 1 thread, 0.41
    # with 2), so the thread count is fixed rather than left to the machine's cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = evaluate_protection(
            data, "train.jsonl", "test.jsonl", {"shortcut": shortcut}, out_dir=out,
            conditions=["clean", "shortcut"], robustness=(), progress=False, augment=False, **FAST,
        )
    finally:
        torch.set_num_threads(threads)
    return report, out


def _row(report, name):
    return next(r for r in report["conditions"] if r["name"] == name)


def test_clean_training_beats_chance_widely(efficacy):
    report, _ = efficacy
    clean = _row(report, "clean")
    assert clean["retrieval"]["chance_r1"] == pytest.approx(1 / N_TEST)
    assert clean["i2t_r1_x_chance"] >= 5 and clean["t2i_r1_x_chance"] >= 5, clean["retrieval"]
    assert clean["retrieval"]["i2t_r10"] > 3 * clean["retrieval"]["chance_r10"]


def test_shortcut_protection_collapses_retrieval(efficacy):
    report, out = efficacy
    clean, protected = _row(report, "clean"), _row(report, "shortcut")
    assert protected["retrieval"]["mean_r1"] < 0.5 * clean["retrieval"]["mean_r1"], (clean, protected)
    assert protected["linf_255"] == PATTERN_LEVELS
    assert 10 < protected["psnr_db"] < 30
    assert report["summary"]["shortcut"]["r1_relative_to_clean"] < 0.5
    saved = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in saved["conditions"]] == ["clean", "shortcut"]
    table = (out / "report.md").read_text()
    assert "| clean |" in table and "| shortcut |" in table and "x chance" in table


def test_psnr_known_cases(tmp_path):
    a = np.full((4, 4, 3), 100, np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))
    b = a.copy()
    b[0, 0, 0] = 148  # one value off by 48 among 48: MSE 48
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 48))
    # From files, against the clean originals, with the largest change in levels.
    (tmp_path / "c").mkdir()
    (tmp_path / "p").mkdir()
    Image.fromarray(a).save(tmp_path / "c" / "x.png")
    Image.fromarray(b).save(tmp_path / "p" / "x.png")
    for d, image in (("c", "x.png"), ("p", "x.png")):
        (tmp_path / d / "m.jsonl").write_text(json.dumps({"image": image, "caption": "a thing"}) + "\n")
    stats = compare_to_clean(read_pairs(tmp_path / "c", "m.jsonl"), read_pairs(tmp_path / "p", "m.jsonl"))
    assert stats["psnr_db"] == pytest.approx(10 * math.log10(255**2 / 48))
    assert stats["linf_255"] == 48


def test_twice_chance_in_float32_is_on_the_target_line_not_under_it():
    # 2 correct of 200 both ways against chance 1/200: a float32 recall (0.00999999978) gives 1.99999996x, which
    # must not pass as under 2x.
    import torch

    from aigis.protection.eval_report import summary as _summary

    def row(name: str, kind: str, hits: int) -> dict:
        recall = float(torch.tensor([hits / 200, hits / 200], dtype=torch.float32).mean())
        return {"name": name, "set": name, "kind": kind, "training": "scratch", "r1_x_chance": recall / (1 / 200),
                "retrieval": {"mean_r1": recall}}

    summary = _summary([row("clean", "clean", 40), row("on_line", "protected", 2), row("under", "protected", 1)])
    assert summary["on_line"]["r1_x_chance"] == pytest.approx(2.0) and summary["on_line"]["r1_x_chance"] < 2.0
    assert not summary["on_line"]["below_2x_chance"] and summary["under"]["below_2x_chance"]
    assert summary["under"]["r1_relative_to_clean"] == pytest.approx(1 / 40)


def test_random_noise_set_is_within_epsilon_and_read_back(data, tmp_path):
    clean = read_pairs(data, "train.jsonl")[:20]
    assert epsilon_levels(8 / 255) == epsilon_levels(8) == 8
    random_set = write_random_set(clean, tmp_path / "random", 8, seed=0)
    assert [p.path.stem for p in random_set.pairs] == [p.path.stem for p in clean]
    assert all(p.path.suffix == ".png" and p.path.is_file() for p in random_set.pairs)
    stats = compare_to_clean(clean, random_set.pairs)
    assert stats["linf_255"] == 8
    # uniform integers in [-8, 8]: variance 8 * 9 / 3 = 24 -> about 34.3 dB (a little more where clipped)
    assert 33.5 < stats["psnr_db"] < 36.5


def test_jpeg_and_gray_are_really_applied(data, shortcut, tmp_path):
    source = read_protected_set(shortcut, read_pairs(data, "train.jsonl"), "shortcut")
    gray = write_transformed_set(source, "gray", tmp_path / "gray")
    jpeg = write_transformed_set(source, "jpeg75", tmp_path / "jpeg")
    assert gray.name == "shortcut+gray" and jpeg.name == "shortcut+jpeg75"
    assert [p.caption for p in gray.pairs] == [p.caption for p in source.pairs]  # triggers kept
    for i in (0, 7, 123):
        original = load_image(source.pairs[i].path)
        g = load_image(gray.pairs[i].path)
        assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
        assert not (original[..., 0] == original[..., 1]).all()
        expected_gray = np.asarray(Image.fromarray(original).convert("L"))
        assert np.array_equal(g[..., 0], expected_gray)

        path = jpeg.pairs[i].path
        assert path.suffix == ".jpg" and path.read_bytes()[:3] == b"\xff\xd8\xff"
        j = load_image(path)
        assert not np.array_equal(j, original)  # lossy
        assert 25 < psnr(original, j) < 60
        with Image.open(path) as im:
            assert im.format == "JPEG"


def test_mismatched_protected_set_is_refused(data, shortcut, tmp_path):
    clean = read_pairs(data, "train.jsonl")
    swapped = broken_copy(shortcut, tmp_path / "swapped", swap=True)
    with pytest.raises(EvaluationError, match="pair 4 is image '00004'.*order"):
        read_protected_set(swapped, clean, "swapped")
    short = broken_copy(shortcut, tmp_path / "short", drop_last=True)
    with pytest.raises(EvaluationError, match=f"{N_TRAIN - 1} pairs but the clean training manifest has {N_TRAIN}"):
        read_protected_set(short, clean, "short")
    with pytest.raises(EvaluationError, match="not a directory"):
        read_protected_set(tmp_path / "nowhere", clean, "nowhere")


def test_cli_refuses_bad_inputs_with_exit_2(data, shortcut, tmp_path, capsys):
    swapped = broken_copy(shortcut, tmp_path / "swapped", swap=True)
    base = ["protect-eval", "--data", str(data), "--train-manifest", "train.jsonl", "--test-manifest", "test.jsonl",
            "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*base, "--protected", f"mem={swapped}"]) == 2
    assert "order must match" in capsys.readouterr().err
    assert main([*base, "--protected", f"mem={tmp_path / 'missing'}"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main([*base, "--protected", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "nodata"), *base[3:]]) == 2
    assert "--data" in capsys.readouterr().err
    assert main([*base, "--protocol", "5x1k"]) == 2
    assert f"at least 5000 pairs (5 folds of 1000), but test.jsonl has {N_TEST}" in capsys.readouterr().err
    assert main([*base, "--clip", "rn_tiny,rn_huge"]) == 2
    assert "unknown CLIP preset 'rn_huge'" in capsys.readouterr().err
    assert main([*base, "--clip", "rn_tiny,rn_tiny"]) == 2
    assert "rn_tiny given more than once" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()  # nothing trained on bad input


def _count_augmented_hackers(monkeypatch) -> list[int]:
    """The seeds of the hackers that train with augmentation, in order (augment_while_training still runs)."""
    from aigis.protection import evaluate

    seeds: list[int] = []
    real = evaluate.augment_while_training

    def counting(model, seed):
        seeds.append(seed)
        return real(model, seed)

    monkeypatch.setattr(evaluate, "augment_while_training", counting)
    return seeds


def _check_retention(report: dict) -> None:
    """Every hacker's retention is its t2i R@1 over its own clean run's (same family and seed), None where that is
    0; each family's and the overall median and range are those of the per-hacker values; the table shows them."""
    rows = report["conditions"]
    clean = {(r["family"], run["seed"]): run["t2i_r1"] for r in rows if r["set"] == "clean" for run in r["runs"]}
    expected: dict[str, list[tuple[str, int, float | None]]] = {}
    for r in rows:
        if r["set"] != "clean":
            for run in r["runs"]:
                base = clean[(r["family"], run["seed"])]
                expected.setdefault(r["set"], []).append(
                    (r["family"], run["seed"], run["t2i_r1"] / base if base > 0 else None))
    retention = report["retention"]["conditions"]
    assert sorted(retention) == sorted(expected)

    def check(stats: dict, values: list[float | None]) -> None:
        defined = [v for v in values if v is not None]
        assert stats["hackers"] == len(values) and stats["undefined"] == len(values) - len(defined)
        if defined:
            assert stats["median"] == pytest.approx(statistics.median(defined))
            assert (stats["min"], stats["max"]) == pytest.approx((min(defined), max(defined)))
        else:
            assert stats["median"] is stats["min"] is stats["max"] is None

    for name, hackers in expected.items():
        entry = retention[name]
        assert [(h["family"], h["seed"]) for h in entry["per_hacker"]] == [(f, seed) for f, seed, _ in hackers]
        for got, (_, _, value) in zip(entry["per_hacker"], hackers):
            assert got["retention"] == (None if value is None else pytest.approx(value))
        check(entry["overall"], [v for _, _, v in hackers])
        for family in {f for f, _, _ in hackers}:
            check(entry["by_family"][family], [v for f, _, v in hackers if f == family])
    table = Path(report["report_md"]).read_text()
    assert "| retention |" in table and "Retention over all hackers" in table
    for name, entry in retention.items():
        assert f"| {name} | {entry['overall']['hackers']}" in table


def test_cli_end_to_end_writes_json_table_and_png(data, shortcut, tmp_path, capsys, monkeypatch):
    augmented = _count_augmented_hackers(monkeypatch)
    out = tmp_path / "out"
    code = main([
        "protect-eval", "--data", str(data), "--train-manifest", "train.jsonl", "--test-manifest", "test.jsonl",
        "--protected", f"shortcut={shortcut}", "--epochs", "1", "--batch", "50", "--device", "cpu",
        "--clip", "rn_tiny", "--hackers", "3", "--out", str(out), "--quiet",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["conditions"]]
    assert names == ["clean", "clean+jpeg75", "clean+gray", "random", "shortcut", "shortcut+jpeg75", "shortcut+gray"]
    # a re-encoded set is judged against the clean set re-encoded the same way, not against clean
    assert report["summary"]["shortcut+gray"]["relative_to"] == "clean+gray"
    assert report["summary"]["shortcut"]["relative_to"] == "clean" and "clean+gray" not in report["summary"]
    assert report["settings"]["epsilon_levels"] == PATTERN_LEVELS  # the random control uses the set's budget
    by_name = {r["name"]: r for r in report["conditions"]}
    assert by_name["random"]["linf_255"] == PATTERN_LEVELS
    assert by_name["shortcut+gray"]["psnr_db"] < by_name["shortcut"]["psnr_db"]  # gray changes colours too
    for r in report["conditions"]:
        assert r["retrieval"]["n"] == N_TEST and r["train_seconds"] > 0
        runs = r["r1_x_chance_runs"]  # three hackers (seeds 0, 1, 2); the row is the median one
        assert len(runs) == 3 and r["r1_x_chance"] == sorted(runs)[1]
    assert len({tuple(r["r1_x_chance_runs"]) for r in report["conditions"]}) > 1
    assert any(len(set(r["r1_x_chance_runs"])) > 1 for r in report["conditions"]), "the seeds changed nothing"
    # augmentation is on by default, for every hacker, seeded by its seed; the report says so
    assert report["settings"]["augment"] is True and "crop" in report["settings"]["augmentation"]
    assert augmented == [0, 1, 2] * len(names)
    assert report["settings"]["protocol"] == "whole" and report["settings"]["gallery"] == N_TEST
    assert {r["family"] for r in report["conditions"]} == {"rn_tiny"}
    report["report_md"] = str(out / "report.md")
    _check_retention(report)
    assert set(report["retention"]["conditions"]) == set(names) - {"clean"}
    table = (out / "report.md").read_text()
    assert "3 hackers per condition" in table and "runs: R@1 x chance" in table
    assert "trained with random resized crop" in table
    for name in names:
        assert f"| {name} |" in table
    png = (out / "examples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "examples.png") as im:
        assert im.width > 300 and im.height > 200
    assert str(out / "report.md") in capsys.readouterr().out


def test_train_clip_reports_every_step_in_order(data):
    """on_step sees each optimiser step once, numbered from 1, with that step's finite loss."""
    from dataclasses import replace

    from aigis.protection.captions import load_images
    from aigis.protection.clip import PRESETS, build_clip
    from aigis.protection.retrieval import batches_per_epoch, train_clip
    from aigis.protection.tokenizer import Tokenizer

    assert [batches_per_epoch(n, 16) for n in (40, 33, 32, 5)] == [3, 2, 2, 1]  # a last batch of one is skipped
    pairs = read_pairs(data, "train.jsonl")[:40]
    captions = [p.caption for p in pairs]
    tokenizer = Tokenizer.train(captions, vocab_size=800)
    model = build_clip(replace(PRESETS["rn_tiny"], image_resolution=SIZE), vocab_size=tokenizer.vocab_size)
    seen: list[tuple[int, float]] = []
    train_clip(model, load_images(pairs, SIZE, progress=False), captions, tokenizer, epochs=2, batch_size=16,
               device="cpu", progress=False, on_step=lambda step, loss: seen.append((step, loss)))
    # 40 pairs in batches of 16: 16, 16, 8 -> 3 steps an epoch
    assert [step for step, _ in seen] == list(range(1, 2 * batches_per_epoch(40, 16) + 1)) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(loss) and loss > 0 for _, loss in seen)


def test_photo_scenes_put_the_same_kind_of_objects_on_textured_crops(tmp_path):
    from aigis.protection.captions import BACKGROUNDS, PHOTO_BACKGROUNDS, load_images

    flat = synth_captioned(tmp_path / "flat", 20, 0, size=SIZE, seed=1)
    photo = synth_captioned(tmp_path / "photo", 20, 0, size=SIZE, seed=1, style="photo")
    again = synth_captioned(tmp_path / "again", 20, 0, size=SIZE, seed=1, style="photo")
    for root, named, other in ((flat, BACKGROUNDS, PHOTO_BACKGROUNDS), (photo, PHOTO_BACKGROUNDS, BACKGROUNDS)):
        for pair in read_pairs(root, "train.jsonl"):
            words = set(pair.caption.replace(",", "").split())
            assert len(words & set(named)) == 1 and not words & set(other), pair.caption
    assert [p.path.read_bytes() for p in read_pairs(photo, "train.jsonl")] == \
        [p.path.read_bytes() for p in read_pairs(again, "train.jsonl")]  # deterministic in the seed

    def texture(root) -> float:  # mean absolute difference between horizontal neighbours
        x = load_images(read_pairs(root, "train.jsonl"), SIZE, progress=False).astype(float)
        return float(np.abs(np.diff(x, axis=2)).mean())

    assert texture(photo) > 2 * texture(flat)
    with pytest.raises(ValueError, match="scene style"):
        synth_captioned(tmp_path / "bad", 2, 0, size=SIZE, style="oil")


def test_a_hacker_never_starts_from_a_surrogates_initial_weights():
    """A job seeds its surrogate with torch.manual_seed(settings.seed); a hacker with the same small seed
    must not draw the same image tower (it would learn that surrogate's noise unusually well)."""
    import torch
    from dataclasses import replace

    from aigis.protection.clip import PRESETS, build_clip
    from aigis.protection.evaluate import hacker_init_seed

    config = replace(PRESETS["rn_tiny"], image_resolution=SIZE)

    def first_conv(torch_seed: int):
        torch.manual_seed(torch_seed)
        return build_clip(config, vocab_size=600).visual.conv1.weight.detach().clone()

    surrogates = [first_conv(s) for s in range(8)]
    assert torch.equal(surrogates[0], first_conv(0))  # the leak is real: same seed, same tower
    for seed in range(8):
        hacker = first_conv(hacker_init_seed(seed))
        assert hacker_init_seed(seed) == hacker_init_seed(seed) and hacker_init_seed(seed) != seed
        assert not any(torch.equal(hacker, s) for s in surrogates), seed


def test_the_hackers_context_fits_every_protected_caption_whole(data, tmp_path):
    """A long trigger must not push the caption's end out of a small preset's 40-token context (that would
    take content away from the hacker and flatter the protection): the hacker's context widens to fit."""
    from aigis.protection.evaluate import HACKER_TOKENIZER_VOCAB
    from aigis.protection.tokenizer import Tokenizer

    out = tmp_path / "long"
    shutil.copytree(data / "images", out / "images")
    pairs = read_pairs(data, "train.jsonl")
    filler = " ".join(f"zq{a}{b}" for a in "aeiou" for b in "bdfgk")  # 25 made-up words
    lines = [{"image": p.path.relative_to(data).as_posix(), "caption": f"{filler} {p.caption}"} for p in pairs]
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "protection.json").write_text(json.dumps({"mode": "copy", "epsilon": 0.0}))
    report = evaluate_protection(data, "train.jsonl", "test.jsonl", {"long": out}, out_dir=tmp_path / "eval",
                                 conditions=["clean", "long"], robustness=(), progress=False,
                                 **{**FAST, "epochs": 1})
    captions = [line["caption"] for line in lines]
    longest = max(len(Tokenizer.train(captions, HACKER_TOKENIZER_VOCAB).encode(c)) for c in captions) + 2
    assert longest > 40
    assert _row(report, "long")["context_length"] == longest
    assert _row(report, "clean")["context_length"] == 40  # never narrower than the preset


def test_example_sheet_rows_grow_with_their_captions(tmp_path):
    """A long trigger wraps onto more lines: its row gets the height, so captions never run into the next row."""
    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    clean = [Pair(image, "a red square in the upper left")]
    heights = {}
    for words in (0, 40):
        trigger = " ".join(["porina"] * words)
        protected = TrainingSet("mem", "protected", tmp_path, [Pair(image, f"{trigger} {clean[0].caption}".strip())])
        with Image.open(example_sheet(clean, [protected], tmp_path / f"sheet{words}.png", examples=1)) as im:
            heights[words] = im.height
    assert heights[40] > heights[0] * 1.2, heights


def test_a_finetuned_hacker_starts_from_the_given_checkpoint(data, tmp_path):
    # The fine-tune threat model: every condition is also fine-tuned from the user's OpenAI-format CLIP. One
    # epoch from scratch barely leaves chance; one epoch from a checkpoint that already knows the scenes keeps
    # what the checkpoint knew -- so the fine-tuned row can only come from the checkpoint's weights.
    import torch
    from safetensors.torch import save_file

    from aigis.protection.captions import load_images
    from aigis.protection.clip import build_clip
    from aigis.protection.retrieval import evaluate_retrieval, train_clip
    from aigis.protection.tokenizer import Tokenizer

    pairs = read_pairs(data, "train.jsonl")
    tokenizer = Tokenizer.train([p.caption for p in pairs], 1000)
    tokenizer.save(tmp_path / "tok.json")
    torch.manual_seed(5)
    pretrained = build_clip("rn_tiny", tokenizer.vocab_size)
    train_clip(pretrained, load_images(pairs, SIZE, progress=False), [p.caption for p in pairs], tokenizer,
               epochs=10, batch_size=32, lr=1e-3, device="cpu", seed=0, progress=False)
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    test = read_pairs(data, "test.jsonl")
    own = evaluate_retrieval(pretrained, load_images(test, SIZE, progress=False), [p.caption for p in test], tokenizer,
                             device="cpu")

    report = evaluate_protection(
        data, "train.jsonl", "test.jsonl", out_dir=tmp_path / "eval", conditions=["clean"], robustness=(),
        progress=False, finetune_checkpoint=tmp_path / "clip.safetensors", tokenizer=tmp_path / "tok.json",
        finetune_lr=1e-5, finetune_epochs=1, **{**FAST, "epochs": 1},
    )
    scratch, finetuned = _row(report, "clean"), _row(report, "clean (fine-tune)")
    assert finetuned["training"] == "fine-tune" and scratch["training"] == "scratch"
    assert own["mean_r1"] >= 5 * own["chance_r1"], own
    assert finetuned["retrieval"]["mean_r1"] >= 0.7 * own["mean_r1"], (finetuned["retrieval"], own)
    assert finetuned["retrieval"]["mean_r1"] > 2 * scratch["retrieval"]["mean_r1"], (finetuned, scratch)
    assert report["settings"]["finetune_checkpoint"].endswith("clip.safetensors")
    # the checkpoint as given is reported beside the fine-tuned rows: what the hacker starts from
    assert report["finetune_checkpoint_retrieval"]["mean_r1"] == pytest.approx(own["mean_r1"])
    assert "clip.safetensors (lr 1e-05, 1 epochs), which as given retrieves" in (tmp_path / "eval" / "report.md").read_text()
    from aigis.protection.evaluate import markdown_table

    only_finetuned = {**report, "settings": {**report["settings"], "scratch": False}}  # the header names who trained
    assert markdown_table(only_finetuned).startswith("Hacker CLIPs fine-tuned from clip.safetensors, 1 epochs, batch 32, "
                                                     "lr 1e-05")
    with pytest.raises(EvaluationError, match="tokenizer"):
        evaluate_protection(data, "train.jsonl", "test.jsonl", out_dir=tmp_path / "e2", conditions=["clean"],
                            robustness=(), progress=False, finetune_checkpoint=tmp_path / "clip.safetensors", **FAST)
    with pytest.raises(EvaluationError, match="no hacker to train"):
        evaluate_protection(data, "train.jsonl", "test.jsonl", out_dir=tmp_path / "e3", conditions=["clean"],
                            robustness=(), progress=False, scratch=False, **FAST)


def test_galleries_rank_each_block_on_its_own(data):
    """A split cut into galleries scores as each block evaluated alone, averaged; chance is one gallery's."""
    from aigis.protection.captions import load_images
    from aigis.protection.evaluate import new_hacker
    from aigis.protection.retrieval import evaluate_retrieval
    from aigis.protection.tokenizer import Tokenizer

    test = read_pairs(data, "test.jsonl")
    captions = [p.caption for p in test]
    tok = Tokenizer.train(captions, vocab_size=1000)
    model = new_hacker("rn_tiny", SIZE, tok.vocab_size, seed=0)
    images = load_images(test, SIZE, progress=False)
    whole = evaluate_retrieval(model, images, captions, tok, device="cpu")
    assert evaluate_retrieval(model, images, captions, tok, device="cpu", gallery=N_TEST) == whole
    half = N_TEST // 2
    cut = evaluate_retrieval(model, images, captions, tok, device="cpu", gallery=half)
    parts = [evaluate_retrieval(model, images[i:i + half], captions[i:i + half], tok, device="cpu")
             for i in (0, half)]
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "chance_r1", "chance_r10"):
        assert cut[key] == pytest.approx((parts[0][key] + parts[1][key]) / 2), key
    assert cut["gallery"] == half and cut["chance_r1"] > whole["chance_r1"]  # fewer candidates each
    assert cut["i2t_r10"] >= whole["i2t_r10"] and cut["i2t_r10"] != whole["i2t_r10"]
    with pytest.raises(ValueError, match="galleries of 30"):
        evaluate_retrieval(model, images, captions, tok, device="cpu", gallery=30)
    with pytest.raises(EvaluationError, match="galleries of 30"):
        evaluate_protection(data, "train.jsonl", "test.jsonl", out_dir=data.parent / "never", gallery=30, **FAST)
    assert not (data.parent / "never").exists()  # refused before anything was written or trained


def test_several_hacker_families_train_every_condition_and_each_hacker_has_a_retention(tmp_path, monkeypatch):
    """--clip names several families: each trains every condition with every seed, one row per (condition,
    family), and retention compares each hacker only with its own clean run. --no-augment trains no hacker
    with augmentation and the report says so."""
    augmented = _count_augmented_hackers(monkeypatch)
    root = synth_captioned(tmp_path / "small", 24, 12, size=SIZE, seed=4)  # a small split: the checks are exact
    shortcut = make_shortcut_set(root, tmp_path / "shortcut")
    out = tmp_path / "out"
    code = main([
        "protect-eval", "--data", str(root), "--train-manifest", "train.jsonl", "--test-manifest", "test.jsonl",
        "--protected", f"shortcut={shortcut}", "--no-robustness", "--no-random", "--epochs", "1", "--device", "cpu",
        "--clip", "rn_tiny, cnn_words", "--hackers", "2", "--no-augment", "--out", str(out), "--quiet",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    report["report_md"] = str(out / "report.md")
    families = ["rn_tiny", "cnn_words"]
    assert report["settings"]["clip_presets"] == families and report["settings"]["clip_preset"] == ",".join(families)
    assert [(r["name"], r["family"]) for r in report["conditions"]] == [
        (f"{condition} ({family})", family) for family in families for condition in ("clean", "shortcut")]
    for r in report["conditions"]:
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        assert [run["r1_x_chance"] for run in r["runs"]] == r["r1_x_chance_runs"]
    # each family's rows are compared with that family's clean row
    assert report["summary"]["shortcut (cnn_words)"]["relative_to"] == "clean (cnn_words)"
    assert report["summary"]["shortcut (cnn_words)"]["t2i_r1_retention"] == \
        report["retention"]["conditions"]["shortcut"]["by_family"]["cnn_words"]
    assert list(report["retention"]["conditions"]["shortcut"]["by_family"]) == families
    assert report["retention"]["conditions"]["shortcut"]["overall"]["hackers"] == 4
    _check_retention(report)
    assert augmented == [] and report["settings"]["augment"] is False and report["settings"]["augmentation"] is None
    table = (out / "report.md").read_text()
    assert table.startswith("Hacker CLIPs rn_tiny and cnn_words at 32 px") and "without augmentation" in table
    for family in families:
        assert f"| shortcut ({family}) |" in table


def test_retention_is_undefined_where_a_hackers_clean_recall_is_zero():
    from aigis.protection.eval_report import markdown_table, retention

    def row(set_name: str, family: str, t2i: list[float]) -> dict:
        return {"set": set_name, "family": family, "runs": [{"seed": s, "t2i_r1": v} for s, v in enumerate(t2i)]}

    rows = [row("clean", "a", [0.4, 0.0, 0.2]), row("mem", "a", [0.1, 0.05, 0.1]),
            row("clean", "b", [0.5, 0.25, 0.1]), row("mem", "b", [0.05, 0.05, 0.1])]
    mem = retention(rows)["conditions"]["mem"]
    assert [h["retention"] for h in mem["per_hacker"]] == pytest.approx([0.25, None, 0.5, 0.1, 0.2, 1.0])
    assert mem["per_hacker"][1]["retention"] is None  # clean R@1 of 0: undefined, not a division by zero
    assert mem["by_family"]["a"] == {"median": pytest.approx(0.375), "min": 0.25, "max": 0.5, "hackers": 3,
                                     "undefined": 1}
    assert mem["by_family"]["b"] == {"median": pytest.approx(0.2), "min": pytest.approx(0.1), "max": 1.0,
                                     "hackers": 3, "undefined": 0}
    assert mem["overall"] == {"median": pytest.approx(0.25), "min": pytest.approx(0.1), "max": 1.0, "hackers": 6,
                              "undefined": 1}
    nothing = retention([row("clean", "a", [0.0]), row("mem", "a", [0.1])])["conditions"]["mem"]
    assert nothing["overall"] == {"median": None, "min": None, "max": None, "hackers": 1, "undefined": 1}
    # in the table: median (min-max) beside x chance, the undefined counted
    report = {"settings": {"clip_preset": "a", "image_size": 32, "epochs": 1, "batch_size": 2, "lr": 1e-3, "seed": 0,
                           "hackers": 3, "n_train": 4, "n_test": 4, "augment": False},
              "chance": {}, "retention": retention(rows),
              "conditions": [{**r, "name": r["set"], "r1_x_chance": 1.0, "r1_x_chance_runs": [1.0] * 3, "psnr_db": None,
                              "train_seconds": 1.0, "retrieval": {k: 0.1 for k in ("i2t_r1", "i2t_r5", "i2t_r10",
                                                                                   "t2i_r1", "t2i_r5", "t2i_r10")}}
                             for r in rows[:2]]}
    table = markdown_table(report)
    assert "| 1.0 | 0.38 (0.25-0.50), 1 undefined |" in table
    assert "| mem | 6 (1 undefined) | 0.25 | 0.10 | 1.00 |" in table


def test_augmentation_is_drawn_from_the_hackers_seed_and_only_while_training():
    """The image tower sees a new crop and flip of each image at every training step, the same sequence for the same
    seed; in eval mode (retrieval), and once the hook is removed, it sees the images as given."""
    import torch

    from aigis.protection.clip import build_clip, normalize_images
    from aigis.protection.evaluate import augment_while_training, augmentation_seed, hacker_init_seed

    rng = np.random.default_rng(0)
    images = normalize_images(rng.integers(0, 256, size=(6, SIZE, SIZE, 3), dtype=np.uint8))

    class Model(torch.nn.Module):  # all augment_while_training needs: an image tower, here one showing what it sees
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Identity()

    def tower_inputs(seed: int, steps: int = 2, train: bool = True, remove: bool = False) -> list[torch.Tensor]:
        model = Model().train(train)
        handle = augment_while_training(model, seed)
        if remove:
            handle.remove()
        return [model.visual(images) for _ in range(steps)]

    first, again, other = tower_inputs(0), tower_inputs(0), tower_inputs(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic given the seed
    assert not torch.equal(first[0], other[0])  # another seed, other crops
    assert not torch.equal(first[0], first[1])  # a new draw every step
    assert first[0].shape == images.shape
    for i in range(len(images)):  # every image changed, each by its own draw
        assert not torch.allclose(first[0][i], images[i], atol=1e-3)
    assert all(torch.equal(x, images) for x in tower_inputs(0, train=False))  # test images never augmented
    assert all(torch.equal(x, images) for x in tower_inputs(0, remove=True))
    assert augmentation_seed(0) != hacker_init_seed(0) and augmentation_seed(0) != augmentation_seed(1)

    # A hacker CLIP's image tower gets the augmented batch through encode_image, as train_clip calls it.
    model = build_clip("cnn_words", vocab_size=600).train()
    augment_while_training(model, 0)
    seen: list[torch.Tensor] = []
    model.visual.register_forward_pre_hook(lambda tower, inputs: seen.append(inputs[0]))
    with torch.no_grad():
        model.encode_image(images)
    assert torch.equal(seen[0], first[0])


def test_a_full_crop_keeps_the_image_or_mirrors_it(monkeypatch):
    """The crop geometry: a crop of the whole area at aspect 1 gives back each image exactly, or its exact
    left-right mirror, about half of them mirrored."""
    import torch

    from aigis.protection import evaluate

    monkeypatch.setattr(evaluate, "AUGMENT_SCALE", (1.0, 1.0))
    monkeypatch.setattr(evaluate, "AUGMENT_RATIO", (1.0, 1.0))
    images = torch.rand(16, 3, 8, 8)
    out = evaluate.random_resized_crop_and_flip(images, torch.Generator().manual_seed(0))
    mirrored = []
    for image, result in zip(images, out):
        mirrored.append(not torch.allclose(result, image, atol=1e-5))
        torch.testing.assert_close(result, image.flip(-1) if mirrored[-1] else image, atol=1e-5, rtol=0)
    assert 0 < sum(mirrored) < len(images)


def test_protocol_5x1k_ranks_five_folds_of_1000_and_refuses_a_small_test_split(data):
    from aigis.protection import evaluate_cli
    from aigis.protection.evaluate import DEFAULT_CLIP, PROTOCOLS, _read_splits

    assert (evaluate_cli.DEFAULT_CLIP, evaluate_cli.PROTOCOLS) == (DEFAULT_CLIP, PROTOCOLS)
    # by default a ResNet, a ViT and a CNN + word transformer: a median and a spread over three hackers
    from aigis.cli import build_parser
    args = build_parser().parse_args(["protect-eval", "--data", "d", "--train-manifest", "a", "--test-manifest", "b",
                                      "--out", "o"])
    assert args.clip.split(",") == ["rn_tiny", "vit_tiny", "cnn_words"] and args.hackers == 1
    lines = (data / "test.jsonl").read_text().splitlines(keepends=True)
    (data / "big_test.jsonl").write_text("".join(lines * (5200 // len(lines) + 1)))
    try:
        n_big = len((data / "big_test.jsonl").read_text().splitlines())
        assert n_big >= 5200
        train, test, available, gallery = _read_splits(data, "train.jsonl", "big_test.jsonl", None, "5x1k")
        assert (len(train), len(test), available, gallery) == (N_TRAIN, 5000, n_big, 1000)
        assert _read_splits(data, "train.jsonl", "test.jsonl", None, "whole")[1:] == (read_pairs(data, "test.jsonl"),
                                                                                     N_TEST, None)
        with pytest.raises(EvaluationError, match=f"at least 5000 pairs .*test.jsonl has {N_TEST}"):
            _read_splits(data, "train.jsonl", "test.jsonl", None, "5x1k")
        with pytest.raises(EvaluationError, match="leave the gallery"):
            _read_splits(data, "train.jsonl", "big_test.jsonl", 500, "5x1k")
        with pytest.raises(EvaluationError, match="unknown retrieval protocol"):
            _read_splits(data, "train.jsonl", "test.jsonl", None, "10x500")
    finally:
        (data / "big_test.jsonl").unlink()  # the module's data folder is shared


def test_cnn_words_is_a_plain_cnn_beside_the_same_text_tower():
    import torch
    from dataclasses import replace

    from aigis.protection.clip import PRESETS, PlainCNN, build_clip

    model = build_clip("cnn_words", vocab_size=600).eval()
    assert isinstance(model.visual, PlainCNN) and len(model.visual.blocks) == 5
    layers = [type(m).__name__ for m in model.visual.blocks.modules() if not isinstance(m, torch.nn.Sequential)]
    assert layers == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 4 + ["Conv2d", "BatchNorm2d", "ReLU"]
    assert model.transformer.layers == 2 and model.transformer.width == PRESETS["rn_tiny"].transformer_width
    assert model.encode_image(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, PRESETS["cnn_words"].embed_dim)
    with pytest.raises(ValueError, match="resolution"):
        model.encode_image(torch.zeros(1, 3, 2 * SIZE, 2 * SIZE))
    with pytest.raises(ValueError, match="divisible by 16"):
        replace(PRESETS["cnn_words"], image_resolution=40).validate()
