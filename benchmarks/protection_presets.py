"""The protection presets judged on two caption styles against three hacker families that augment.

    python benchmarks/protection_presets.py                          # fashion and boutique, 5 captions, every preset
    python benchmarks/protection_presets.py --styles boutique:1 --presets word-code --hackers 3

For each style (STYLE:CAPTIONS, e.g. boutique:1 for one caption per training image):
1. writes --train training scenes and --test test pairs at --source px (protection.captions.synth_captioned);
2. protects the training split with each preset (`aigis protect --preset P`, the `paper` preset at --paper-outer
   outer iterations so that it finishes on a CPU); the job fits its noise at --size px and writes PNGs at the
   sources' size, as a data owner would publish them;
3. trains hacker CLIPs of every --clip family from scratch on the clean files and on each protected set (the
   files read back and resized by the hacker's loader to --hacker-size px, random resized crops and flips on),
   and reports each hacker's retention -- its text->image R@1 on a protected set over its own on the clean set --
   with the median and range per family and over all, beside R@1 x chance, PSNR and the job's time.
Writes benchmarks/results/<--name>.{json,md,png}. The `fashion` style is the one the presets were tuned on;
`boutique` (other items' colours, grid, backdrops, vocabulary and sentence shapes) is not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from protection_results import RESULTS, machine_and_command, write_results  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", default="fashion:5,boutique:5",
                        help="comma-separated STYLE:CAPTIONS_PER_IMAGE (styles: fashion, boutique, flat, photo)")
    parser.add_argument("--presets", default="word-code,word-code-gray,paper",
                        help="comma-separated presets, each optionally with settings on top: "
                             "PRESET:FIELD=VALUE:FIELD=VALUE (e.g. word-code:word_textures=48)")
    parser.add_argument("--paper-outer", type=int, default=8,
                        help="outer iterations of the paper preset (its own default: 20 of 200 surrogate steps)")
    parser.add_argument("--train", type=int, default=400, help="training images per style")
    parser.add_argument("--test", type=int, default=500, help="test pairs per style (one gallery)")
    parser.add_argument("--source", type=int, default=64, help="the sources' side in px")
    parser.add_argument("--size", type=int, default=32, help="the job's side in px")
    parser.add_argument("--clip", default="rn_tiny,vit_tiny,cnn_words", help="hacker families")
    parser.add_argument("--hackers", type=int, default=1, help="hackers per family and condition (seeds 0, 1, ...)")
    parser.add_argument("--hacker-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--robustness", default="", help="re-encodings also trained on: jpeg75, gray (default none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "presets"))
    parser.add_argument("--name", default="protection_presets")
    parser.add_argument("--add", action="store_true",
                        help="keep the styles of the last results file and add (or replace) those judged now")
    return parser.parse_args(argv)


def parse_styles(spec: str) -> list[tuple[str, int]]:
    styles = []
    for item in spec.split(","):
        style, _, captions = item.strip().partition(":")
        styles.append((style, int(captions or 1)))
    return styles


def protect(data: Path, out: Path, preset: str, args: argparse.Namespace) -> dict:
    """One job, resumed where a finished one is on disk; its summary and wall time."""
    from aigis.protection.job import protect_dataset
    from aigis.protection.settings import preset_settings

    name, overrides = preset_spec(preset)
    if name == "paper":
        overrides.setdefault("outer_iterations", args.paper_outer)
    started = time.monotonic()
    job = protect_dataset(data, "train.jsonl", out, preset_settings(name, **overrides), clip_preset="rn_tiny",
                          image_size=args.size)
    summary = {k: v for k, v in job.items() if not isinstance(v, (dict, list))}
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    summary["overrides"] = overrides
    return summary


def set_name(spec: str) -> str:
    """A preset spec as a protected set's name (its folder, its row): 'word-code.word_textures-48'."""
    return spec.replace(":", ".").replace("=", "-")


def preset_spec(spec: str) -> tuple[str, dict]:
    """'word-code:word_textures=48:texture_tile=4' -> ('word-code', {'word_textures': 48, 'texture_tile': 4})."""
    name, *fields = spec.split(":")
    overrides = {}
    for item in fields:
        key, _, text = item.partition("=")
        overrides[key] = json.loads(text)
    return name, overrides


def judge_style(style: str, captions: int, args: argparse.Namespace) -> dict:
    from aigis.protection.captions import synth_captioned
    from aigis.protection.evaluate import evaluate_protection

    work = Path(args.work) / f"{style}_c{captions}_{args.source}px"
    data = work / "data"
    if not (data / "test.jsonl").is_file():
        synth_captioned(data, n_train=args.train, n_test=args.test, size=args.source, style=style,
                        captions_per_image=captions)
    presets = [p for p in args.presets.split(",") if p]
    jobs = {}
    for preset in presets:
        print(f"== {style}, {captions} caption(s): {preset} job", flush=True)
        jobs[set_name(preset)] = protect(data, work / f"protected_{set_name(preset)}", preset, args)
    print(f"== {style}, {captions} caption(s): hackers {args.clip} x {args.hackers}", flush=True)
    report = evaluate_protection(
        data, "train.jsonl", "test.jsonl", {name: work / f"protected_{name}" for name in jobs},
        out_dir=work / "evaluation", conditions=["clean", *jobs],
        robustness=[r for r in args.robustness.split(",") if r], clip_preset=args.clip.split(","),
        image_size=args.hacker_size, epochs=args.epochs, hackers=args.hackers, augment=True)
    return {"style": style, "captions_per_image": captions, "work": str(work), "jobs": jobs,
            "retention": report["retention"], "conditions": report["conditions"],
            "report_md": report["report_md"]}


def condition_row(result: dict, name: str) -> dict:
    """R@1 x chance (median over hackers, per family) and PSNR of one condition of one style."""
    rows = [r for r in result["conditions"] if r["set"] == name]
    return {"x_chance": {r["family"]: r["r1_x_chance"] for r in rows},
            "psnr_db": next((r.get("psnr_db") for r in rows if r.get("psnr_db") is not None), None)}


def fmt_spread(s: dict | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:.2f}"
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def markdown(results: list[dict], families: list[str]) -> str:
    lines = ["| style | preset | " + " | ".join(f"retention {f}" for f in families)
             + " | retention, all hackers | R@1 x chance (clean -> protected, per family) | PSNR dB | job s |",
             "|---|---|" + "---:|" * len(families) + "---:|---|---:|---:|"]
    for result in results:
        clean = condition_row(result, "clean")["x_chance"]
        for name, held in result["retention"]["conditions"].items():
            row = condition_row(result, name)
            chance = ", ".join(f"{f} {clean.get(f, 0):.1f} -> {row['x_chance'].get(f, 0):.1f}" for f in families)
            job = result["jobs"].get(name.split(" ")[0], {})
            psnr = f"{row['psnr_db']:.1f}" if row["psnr_db"] is not None else "-"
            lines.append(f"| {result['style']}, {result['captions_per_image']} caption(s) | {name} | "
                         + " | ".join(fmt_spread(held["by_family"].get(f)) for f in families)
                         + f" | {fmt_spread(held['overall'])} | {chance} | {psnr} | "
                         + f"{job.get('wall_seconds', '-')}{' (resumed)' if job.get('resumed') else ''} |")
    return "\n".join(lines)


def plot(results: list[dict], families: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(max(6.5, 5 * len(results)), 3.8), squeeze=False, sharey=True)
    for ax, result in zip(axes[0], results):
        names = list(result["retention"]["conditions"])
        width = 0.8 / max(len(families), 1)
        for i, family in enumerate(families):
            values = [result["retention"]["conditions"][n]["by_family"].get(family, {}).get("median") or 0.0
                      for n in names]
            ax.bar(np.arange(len(names)) + i * width, values, width, label=family)
        ax.axhline(0.10, color="k", linestyle="--", linewidth=0.8)
        ax.set_xticks(np.arange(len(names)) + width * (len(families) - 1) / 2, names, fontsize=8)
        ax.set_title(f"{result['style']}, {result['captions_per_image']} caption(s)")
        ax.set_ylabel("retention (t2i R@1 / clean)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("What hackers keep of clean retrieval (dashed: the 0.10 target)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    # the evaluation's per-hacker lines (what it trains, then its R@1 and pairs/s): progress for a long run
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    families = args.clip.split(",")
    started = time.monotonic()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    machine = machine_and_command("protection_presets.py", argv)
    results = []
    for style, captions in parse_styles(args.styles):
        results.append({**judge_style(style, captions, args), "machine_and_command": machine, "commit": commit})
    earlier = RESULTS / f"{args.name}.json"
    if args.add and earlier.is_file():
        now = {(r["style"], r["captions_per_image"]) for r in results}
        before = json.loads(earlier.read_text())
        for r in before["results"]:
            r.setdefault("commit", before.get("commit", "?"))
            r.setdefault("machine_and_command", before.get("machine_and_command", "?"))
        results = [r for r in before["results"] if (r["style"], r["captions_per_image"]) not in now] + results
    runs = "; ".join(dict.fromkeys(f"{r['machine_and_command']}. Commit {r['commit']}" for r in results))
    header = (f"# Protection presets against hacker families that augment\n\n"
              f"{runs}. "
              f"{args.train} training images per style at {args.source} px (jobs at {args.size} px, PNGs at the "
              f"sources' size), {args.test} test pairs in one gallery (chance R@1 {100 / args.test:.2f} %); "
              f"hackers {args.clip}, {args.hackers} per family and condition, {args.epochs} epochs at "
              f"{args.hacker_size} px with random resized crops and flips. The paper preset ran "
              f"{args.paper_outer} outer iterations. Retention: text->image R@1 on the protected set / the same "
              f"hacker's on the clean set; median (min-max). {time.monotonic() - started:.0f} s for the styles judged last.\n")
    table = markdown(results, families)
    write_results(args.name, {"args": vars(args), "commit": commit, "machine_and_command": machine,
                              "results": results}, header, table)
    plot(results, families, RESULTS / f"{args.name}.png")
    print(f"plot: {RESULTS / f'{args.name}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
