"""Does protect-on-upload protect? Pairs protected one request at a time, as `mem_protect` does, against hackers.

    python benchmarks/protect_on_upload_efficacy.py --work runs/bench/fc5_t1000 \
        --job mem_bnbatch_foreign_pgd4_words96_tile2_sign_mem16 [--steps 4,16] [--hackers 6]

A served `mem_protect` version holds a finished job's frozen surrogate and protects each request's batch on
its own: trigger search, then PGD against that surrogate (served.publish_protect_model: the job's settings,
per image) -- or, published from a word-texture job whose artefact holds its code (word_code.safetensors),
with that code: each image its own draw of the code's words, no search (--steps code). This benchmark does
exactly that in-process (mem.protect_batch / mem.protect_with_word_code with the settings a published
version would hold) for every training image of the work folder's captioned set, one request of --request
images at a time, each image with its first caption, the trigger then written in front of all its captions (as
an uploader publishing the image with its captions would; with foreign triggers the search bars only that first
caption's words, as a request carries one). Each --steps value is one protected set; hackers
trained from scratch on each (PNGs read back), beside the job's own output, are scored on the clean test split.
With --unseen SEED the served surrogate comes instead from a job of the same settings on another draw of the
scenes (data seed SEED): uploads are then scenes it never saw, as real ones are (for "fashion", their items come
from the same Fashion-MNIST pool).
Results: benchmarks/results/<--name>.{md,json}; the protected sets under <work>/upload_<job>[_unseen<SEED>]_steps<S>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from protection_results import machine_and_command, write_results

REPO = Path(__file__).resolve().parents[1]


def protect_as_uploads(data: Path, job_dir: Path, out: Path, steps: int | None, request: int,
                       code: bool = False) -> dict:
    """Write out/ in the protected-set layout from requests of `request` images through what a published
    version serves (method.load_protection): the job's word code (code), or per-image MEM's search + PGD against
    the job's surrogate (for a word-code job too, with the settings both methods share)."""
    from aigis.protection import mem
    from aigis.protection.captions import load_images, read_pairs
    from aigis.protection.job import _output_names

    report = json.loads((job_dir / "protection.json").read_text())
    artefact = job_dir / report["surrogate"]["path"]
    _, _, meta = mem.load_surrogates(artefact)
    settings = mem.served_settings(meta)
    if code and not isinstance(settings, mem.WordCodeSettings):
        raise SystemExit(f"{job_dir}: its artefact holds no word code (word_code.safetensors: a word-code job "
                         f"saves one with its surrogate)")
    if not code:
        if isinstance(settings, mem.WordCodeSettings):  # the job's surrogate, searched against per upload
            shared = {f.name for f in dataclasses.fields(mem.SurrogateSettings)}
            settings = mem.MEMSettings(**{k: v for k, v in dataclasses.asdict(settings).items() if k in shared})
        settings = dataclasses.replace(settings, upload_steps=steps)
    protection = mem.load_protection(artefact, settings)
    models, tokenizer = protection.surrogates, protection.tokenizer
    pairs = read_pairs(data, "train.jsonl")
    groups = mem.CaptionsPerImage.by_key([p.path.resolve() for p in pairs])
    first = groups.first(np.arange(groups.n_images))
    sources = [pairs[c] for c in first]
    images = load_images(sources, models[0].image_resolution, progress=False)
    protected = np.empty_like(images)
    prefixes: list[str] = []
    started = time.monotonic()
    for i in range(0, len(sources), request):
        batch = slice(i, i + request)
        captions = [p.caption for p in sources[batch]]
        answer = protection.protect(images[batch], captions, device="cpu")
        out_images, texts = answer.images, answer.captions
        protected[batch] = out_images
        prefixes += [text[: len(text) - len(caption)] for text, caption in zip(texts, captions)]
        done = min(i + request, len(sources))
        print(f"upload requests: {done}/{len(sources)} images, {done / (time.monotonic() - started):.1f} images/s",
              file=sys.stderr, flush=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = _output_names(sources)  # the job's own file names
    for name, image in zip(names, protected):
        Image.fromarray(image).save(out / name)
    lines = [json.dumps({"image": names[i], "caption": prefixes[i] + pair.caption})
             for pair, i in zip(pairs, groups.image_of)]
    (out / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
    change = np.abs(protected.astype(int) - images.astype(int))
    served = dataclasses.replace(settings, pgd_steps=settings.pgd_steps if steps is None else steps)
    record = {"mode": "upload with the word code" if code else "upload", "epsilon": settings.epsilon,
              "pgd_steps": None if code else served.pgd_steps,
              "request_images": request, "job": str(job_dir), "settings": served.to_dict(),
              "autocast": None if code else (
                  "bfloat16" if mem.autocast_enabled(settings.amp, torch.device("cpu")) else "off"),
              "max_change_levels": int(change.max()), "seconds": time.monotonic() - started}
    (out / "protection.json").write_text(json.dumps(record, indent=1))
    return record


def unseen_job(work: Path, job: str, seed: int, style: str) -> Path:
    """The job's settings run on another draw of the scenes (same sizes), for a surrogate that never saw work's."""
    from aigis.protection.captions import read_pairs, synth_captioned
    from aigis.protection.job import protect_dataset
    from aigis.protection.settings import settings_from_dict

    reference = json.loads((work / job / "protection.json").read_text())
    other = work / f"unseen{seed}"
    data = other / "captions"
    if not (data / "train.jsonl").is_file():
        pairs = read_pairs(work / "captions", "train.jsonl")
        images = len({p.path for p in pairs})
        synth_captioned(data, n_train=images, n_test=10, size=reference["image_size"], seed=seed, style=style,
                        captions_per_image=len(pairs) // images)
    protect_dataset(data, "train.jsonl", other / job, settings_from_dict(reference["settings"]),
                    clip_preset=reference["clip_preset"], image_size=reference["image_size"],
                    trigger_words=0 if reference.get("trigger_words") == "caption words" else None)
    return other / job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="a protection_efficacy.py work folder (captions/ and the job)")
    parser.add_argument("--job", required=True, help="the job folder under --work whose surrogate is served")
    parser.add_argument("--steps", default="default",
                        help="PGD steps per request, comma-separated; 'default' = the job's own; 0 = triggers "
                             "alone, no noise; 'code' = no search nor PGD: the word-texture job's own code (what a "
                             "version published from such a job serves)")
    parser.add_argument("--request", type=int, default=16, help="images per request (mem_protect's max batch)")
    parser.add_argument("--unseen", type=int, default=None, metavar="SEED",
                        help="serve the surrogate of the same job run on another draw of the scenes (data seed SEED)")
    parser.add_argument("--style", default="fashion", help="the scenes' style, for --unseen")
    parser.add_argument("--hackers", type=int, default=6)
    parser.add_argument("--hacker-clip", default="rn_tiny")
    parser.add_argument("--hacker-epochs", type=int, default=10)
    parser.add_argument("--gallery", type=int, default=200)
    parser.add_argument("--name", default="protect_on_upload_efficacy")
    args = parser.parse_args(argv)

    from aigis.protection.evaluate import evaluate_protection, markdown_table

    work = Path(args.work)
    data, job_dir = work / "captions", work / args.job
    if not (job_dir / "protection.json").is_file():
        parser.error(f"{job_dir} holds no finished protection job")
    values = args.steps.split(",")
    if len(set(values)) != len(values):
        parser.error(f"--steps {args.steps}: a value given twice")
    protected, records = {"mem": job_dir}, {}
    served = job_dir if args.unseen is None else unseen_job(work, args.job, args.unseen, args.style)
    tag = args.job + ("" if args.unseen is None else f"_unseen{args.unseen}")
    for value in values:
        steps = None if value in ("default", "code") else int(value)
        record = protect_as_uploads(data, served, work / f"upload_{tag}_steps{value}", steps, args.request,
                                    code=value == "code")
        name = "upload_code" if value == "code" else f"upload{record['pgd_steps']}"
        protected[name], records[name] = work / f"upload_{tag}_steps{value}", record
    report = evaluate_protection(data, "train.jsonl", "test.jsonl", protected,
                                 out_dir=work / f"evaluation_upload_{tag}", conditions=list(protected),
                                 robustness=(), clip_preset=args.hacker_clip, image_size=32,
                                 epochs=args.hacker_epochs, hackers=args.hackers, gallery=args.gallery)
    header = (f"{machine_and_command('protect_on_upload_efficacy.py', argv)}\n"
              f"Sets: `mem` = the job `{args.job}` as published; `uploadS` = the same training images protected "
              f"one request of {args.request} at a time by "
              + ("its frozen surrogate" if args.unseen is None else
                 f"the frozen surrogate of the same job run on another draw of the scenes (seed {args.unseen}; "
                 f"it never saw these images)")
              + f" (per image: trigger search + S PGD steps, the job's epsilon; `upload_code`: the job's word code "
              f"for each image's own draw of words, no search), as mem_protect serves. "
              f"Hackers `{args.hacker_clip}`, "
              f"{args.hacker_epochs} epochs from scratch, {args.hackers} per set.\n")
    write_results(args.name, {"uploads": records, "report": report}, header, markdown_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
