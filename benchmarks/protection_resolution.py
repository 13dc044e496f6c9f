"""Protection published at the sources' resolution: does it still hold when the sources are larger than the job?

    python benchmarks/protection_resolution.py                  # Fashion-MNIST scenes (make fashion-mnist), else flat
    python benchmarks/protection_resolution.py --source 96 --hacker-sizes 32,64,96

1. writes the demo's captioned set (200 training images x 5 captions, 500 test pairs) at --source px;
2. protects it with the word-code preset at the job's --size (32 px, the demo's): the noise is fitted on each
   image resized to the job's size and laid over the source's pixels, the protected PNGs have the sources' size;
3. for each hacker resolution, trains from-scratch hacker CLIPs (rn_tiny, 3 seeds) on the clean files and on the
   protected files, each resized by the hacker's own loader, and reports R@1 x chance and retention (protected
   R@1 / clean R@1 of the same hacker family).
Writes benchmarks/results/protection_resolution.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> int:
    from aigis.demo import DEMO_PROTECT, demo_scene_style
    from aigis.protection.captions import synth_captioned
    from aigis.protection.evaluate import evaluate_protection
    from aigis.protection.job import protect_dataset
    from aigis.protection.settings import preset_settings
    from protection_results import machine_and_command

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=int, default=96, help="the sources' size in px")
    parser.add_argument("--size", type=int, default=DEMO_PROTECT["size"], help="the job's size in px")
    parser.add_argument("--hacker-sizes", default="32,64", help="the hackers' resolutions, comma-separated")
    parser.add_argument("--hackers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=DEMO_PROTECT["hacker_epochs"])
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "protection_resolution"))
    args = parser.parse_args(argv)

    work, style = Path(args.work), demo_scene_style()
    data = work / f"captions_{style}_{args.source}px"
    if not (data / "train.jsonl").is_file():
        synth_captioned(data, n_train=DEMO_PROTECT["train"], n_test=DEMO_PROTECT["test"], size=args.source,
                        style=style, captions_per_image=DEMO_PROTECT["captions_per_image"])
    started = time.monotonic()
    protected = work / f"protected_{style}_{args.source}px_job{args.size}"
    job = protect_dataset(data, "train.jsonl", protected, preset_settings(DEMO_PROTECT["preset"]),
                          clip_preset=DEMO_PROTECT["clip"], image_size=args.size)
    job_seconds = time.monotonic() - started
    rows = []
    for hacker_size in [int(x) for x in args.hacker_sizes.split(",")]:
        report = evaluate_protection(data, "train.jsonl", "test.jsonl", {"protected": protected},
                                     out_dir=work / f"evaluation_{style}_{args.source}px_hacker{hacker_size}",
                                     conditions=["clean", "protected"], robustness=(),
                                     clip_preset=DEMO_PROTECT["clip"], image_size=hacker_size, epochs=args.epochs,
                                     hackers=args.hackers, gallery=DEMO_PROTECT["gallery"], progress=True)
        by_name = {row["name"]: row for row in report["conditions"]}
        clean, prot = by_name["clean"], by_name["protected"]
        rows.append({"hacker_size": hacker_size, "clean_r1_x_chance": clean["r1_x_chance"],
                     "clean_runs": clean["r1_x_chance_runs"], "protected_r1_x_chance": prot["r1_x_chance"],
                     "protected_runs": prot["r1_x_chance_runs"],
                     "retention": prot["retrieval"]["mean_r1"] / max(clean["retrieval"]["mean_r1"], 1e-12),
                     "psnr_db": prot["psnr_db"], "linf_255": prot["linf_255"]})
        print(f"hackers at {hacker_size} px: clean {clean['r1_x_chance']:.1f}x, protected {prot['r1_x_chance']:.1f}x "
              f"chance (retention {rows[-1]['retention']:.2f})", flush=True)
    import subprocess

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    header = machine_and_command("protection_resolution.py", argv)
    results = {"header": header, "commit": commit, "style": style, "source_px": args.source, "job_px": args.size,
               "preset": DEMO_PROTECT["preset"], "job": {k: v for k, v in job.items() if not isinstance(v, dict)},
               "job_seconds": job_seconds, "hackers": args.hackers, "epochs": args.epochs, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "protection_resolution.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Protection published at the sources' size ({style} scenes at {args.source} px, job at {args.size} px, "
             f"{DEMO_PROTECT['preset']} preset)", "",
             f"{header} Commit {commit}; {args.hackers} rn_tiny hackers per "
             f"condition, {args.epochs} epochs, galleries of {DEMO_PROTECT['gallery']}.", "",
             "| hacker resolution | clean R@1 x chance (runs) | protected R@1 x chance (runs) | retention | PSNR dB |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['hacker_size']} px | {r['clean_r1_x_chance']:.1f} ({', '.join(f'{x:.1f}' for x in r['clean_runs'])}) | "
                     f"{r['protected_r1_x_chance']:.1f} ({', '.join(f'{x:.1f}' for x in r['protected_runs'])}) | "
                     f"{r['retention']:.2f} | {r['psnr_db']:.1f} |")
    (RESULTS / "protection_resolution.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
