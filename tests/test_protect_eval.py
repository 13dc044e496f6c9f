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
    """One evaluation shared by the efficacy tests: clean vs the shortcut set, same seed and steps."""
    out = tmp_path_factory.mktemp("eval")
    report = evaluate_protection(
        data, "train.jsonl", "test.jsonl", {"shortcut": shortcut}, out_dir=out,
        conditions=["clean", "shortcut"], robustness=(), progress=False, **FAST,
    )
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
    assert not (tmp_path / "out" / "report.json").exists()  # nothing trained on bad input


def test_cli_end_to_end_writes_json_table_and_png(data, shortcut, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "protect-eval", "--data", str(data), "--train-manifest", "train.jsonl", "--test-manifest", "test.jsonl",
        "--protected", f"shortcut={shortcut}", "--epochs", "1", "--batch", "50", "--device", "cpu",
        "--hackers", "3", "--out", str(out), "--quiet",
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
    table = (out / "report.md").read_text()
    assert "3 hackers per condition" in table and "runs: R@1 x chance" in table
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
