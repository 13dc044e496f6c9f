"""An evaluation's report: the summary against the clean rows, each hacker's retention, the markdown table and the
example sheet (PNG)."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

import numpy as np

from aigis.preprocess import load_image

from .captions import Pair, load_images
from .training_sets import ROBUSTNESS_TRANSFORMS, TrainingSet


# The family of the hackers fine-tuned from a checkpoint (their architecture is the checkpoint's).
FINETUNE_FAMILY = "fine-tune"
RETENTION_MEASURE = ("t2i R@1 of a hacker trained on the condition / t2i R@1 of the same hacker (family and seed) "
                     "trained on the clean pairs")


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def summary(rows: list[dict], retained: dict | None = None) -> dict:
    """Per condition other than clean and its controls: R@1 relative to the clean row of the same training
    mode (for a re-encoded set, to the clean data re-encoded the same way when that row exists), and
    whether it is under twice chance (the benchmark target for protected data). Rows are compared within one
    hacker family. With `retained` (what retention() returns), each entry also holds its row's retention spread."""
    def key(row: dict, set_name: str) -> tuple:
        return row["training"], row.get("family"), set_name

    reference = {key(r, r["set"]): r for r in rows if r["set"] == "clean" or r["set"].startswith("clean+")}
    out = {}
    for r in rows:
        if key(r, r["set"]) in reference:
            continue
        transform = r["kind"] if r["kind"] in ROBUSTNESS_TRANSFORMS else None
        ref = reference.get(key(r, f"clean+{transform}")) if transform else None
        ref = ref or reference.get(key(r, "clean"))
        out[r["name"]] = {
            "r1_x_chance": r["r1_x_chance"],
            # Recall is a count over the test set, so R@1 x chance is a multiple of 1 / (2 * n) computed in float32:
            # exactly 2x arrives as 1.99999995. Rounded first, 2x stays what it is: on the line, not under it.
            "below_2x_chance": round(r["r1_x_chance"], 4) < 2.0,
            "relative_to": ref["name"] if ref else None,
            "r1_relative_to_clean": (r["retrieval"]["mean_r1"] / ref["retrieval"]["mean_r1"])
            if ref and ref["retrieval"]["mean_r1"] > 0 else None,
        }
        if retained is not None:
            by_family = retained["conditions"].get(r["set"], {}).get("by_family", {})
            out[r["name"]]["t2i_r1_retention"] = by_family.get(r.get("family"))
    return out


def spread(values: list[float | None]) -> dict:
    """Median, min and max of the defined values (None where none is), how many values there are and how many
    are undefined (None)."""
    defined = [v for v in values if v is not None]
    return {
        "median": statistics.median(defined) if defined else None,
        "min": min(defined) if defined else None,
        "max": max(defined) if defined else None,
        "hackers": len(values),
        "undefined": len(values) - len(defined),
    }


def retention(rows: list[dict]) -> dict:
    """Per condition other than clean: every hacker's retention (RETENTION_MEASURE; None where its clean R@1 is 0
    or it has no clean row), then the median and range over hackers, per family and over all.

    A hacker draws the same initial weights, batches and crops on every condition, so the ratio to its own
    clean run shows what the data did to it; a ratio to another hacker's clean run would mix in seed luck."""
    clean = {(r["family"], run["seed"]): run["t2i_r1"] for r in rows if r["set"] == "clean" for run in r["runs"]}
    per_condition: dict[str, list[dict]] = {}
    for r in rows:
        if r["set"] == "clean":
            continue
        for run in r["runs"]:
            base = clean.get((r["family"], run["seed"]))
            per_condition.setdefault(r["set"], []).append({
                "family": r["family"], "seed": run["seed"], "t2i_r1": run["t2i_r1"], "clean_t2i_r1": base,
                "retention": run["t2i_r1"] / base if base else None,
            })
    conditions = {}
    for name, hackers in per_condition.items():
        families = list(dict.fromkeys(h["family"] for h in hackers))
        conditions[name] = {
            "by_family": {f: spread([h["retention"] for h in hackers if h["family"] == f]) for f in families},
            "overall": spread([h["retention"] for h in hackers]),
            "per_hacker": hackers,
        }
    return {"measure": RETENTION_MEASURE, "conditions": conditions}


# ----------------------------------------------------------------------------------------------
# Outputs


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def galleries_text(n_test: int, gallery: int | None) -> str:
    """'' for one gallery (the whole split), else how the split was cut."""
    if gallery is None or gallery == n_test:
        return ""
    return f" ranked within {n_test // gallery} galleries of {gallery}"


def _spread_text(stats: dict | None) -> str:
    """'0.12 (0.05-0.20)': the median (min-max) of a retention spread; only the value for a single hacker."""
    if stats is None:
        return ""
    if stats["median"] is None:
        return "undefined"
    text = f"{stats['median']:.2f}"
    if stats["hackers"] - stats["undefined"] > 1:
        text += f" ({stats['min']:.2f}-{stats['max']:.2f})"
    return text + (f", {stats['undefined']} undefined" if stats["undefined"] else "")


def _families_text(families: list[str]) -> str:
    return families[0] if len(families) == 1 else ", ".join(families[:-1]) + f" and {families[-1]}"


def markdown_table(report: dict) -> str:
    """Rows = training data condition; Recall@K in %, R@1 as a multiple of chance, PSNR in dB."""
    s = report["settings"]
    hackers = s.get("hackers", 1)
    seeds = f"seed {s['seed']}" if hackers == 1 else (
        f"{hackers} hackers per condition (seeds {s['seed']}..{s['seed'] + hackers - 1}): the median run's recall, "
        f"every run's R@1 x chance in the last column")
    runs_head, runs_rule = (" | runs: R@1 x chance", "|---:") if hackers > 1 else ("", "")
    if s.get("scratch", True):
        families = s.get("clip_presets") or [s["clip_preset"]]
        hacker = (f"Hacker CLIP{'s' if len(families) > 1 else ''} {_families_text(families)} at {s['image_size']} px, "
                  f"{s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']:g}")
    else:  # fine-tuned hackers only: their architecture and resolution are the checkpoint's
        hacker = (f"Hacker CLIPs fine-tuned from {Path(s['finetune_checkpoint']).name}, {s['finetune_epochs']} epochs, "
                  f"batch {s['batch_size']}, lr {s['finetune_lr']:g}")
    augmentation = f"trained with {s['augmentation']}" if s.get("augment") else "trained without augmentation"
    protocol = ""
    if s.get("protocol") == "5x1k":
        protocol = (f" (5x1K protocol: the first {s['n_test']} of {s['n_test_available']} test pairs, averaged "
                    f"over folds)")
    retained = report.get("retention", {}).get("conditions", {})
    lines = [
        f"{hacker}, {seeds}; {augmentation}; {s['n_train']} training pairs, {s['n_test']} clean test pairs"
        f"{galleries_text(s['n_test'], s.get('gallery'))}{protocol}. Recall in %; retention is each hacker's t2i R@1 "
        f"over its own t2i R@1 trained on clean, median (min-max) over the row's hackers.",
        "",
        f"| training data | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | R@1 x chance | retention "
        f"| PSNR dB{runs_head} |",
        f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:{runs_rule}|",
    ]
    c = report["chance"]
    if c:
        lines.append(f"| *chance* | {_pct(c['r1'])} | {_pct(c['r5'])} | {_pct(c['r10'])} | {_pct(c['r1'])} | "
                     f"{_pct(c['r5'])} | {_pct(c['r10'])} | 1.0 | | |" + (" |" if hackers > 1 else ""))
    for row in report["conditions"]:
        r = row["retrieval"]
        p = row["psnr_db"]
        psnr_text = "" if p is None else ("inf" if not math.isfinite(p) else f"{p:.1f}")
        kept = retained.get(row["set"], {}).get("by_family", {}).get(row.get("family"))
        lines.append(
            f"| {row['name']} | {_pct(r['i2t_r1'])} | {_pct(r['i2t_r5'])} | {_pct(r['i2t_r10'])} | "
            f"{_pct(r['t2i_r1'])} | {_pct(r['t2i_r5'])} | {_pct(r['t2i_r10'])} | {row['r1_x_chance']:.1f} | "
            f"{_spread_text(kept)} | {psnr_text} |"
            + (f" {', '.join(f'{x:.1f}' for x in row['r1_x_chance_runs'])} |" if hackers > 1 else "")
        )
    lines.append("")
    if retained:
        lines += [
            "Retention over all hackers (every family and seed):",
            "",
            "| training data | hackers | retention median | min | max |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, entry in retained.items():
            overall = entry["overall"]
            median, low, high = ("undefined" if overall[k] is None else f"{overall[k]:.2f}"
                                 for k in ("median", "min", "max"))
            undefined = f" ({overall['undefined']} undefined)" if overall["undefined"] else ""
            lines.append(f"| {name} | {overall['hackers']}{undefined} | {median} | {low} | {high} |")
        lines.append("")
    before = report.get("finetune_checkpoint_retrieval")
    if before:
        lines.append(f"Fine-tuned rows start from {Path(s['finetune_checkpoint']).name} (lr {s['finetune_lr']:g}, "
                     f"{s.get('finetune_epochs') or s['epochs']} epochs), which as given retrieves i2t / t2i R@1 "
                     f"{_pct(before['i2t_r1'])} / {_pct(before['t2i_r1'])} %, R@5 {_pct(before['i2t_r5'])} / "
                     f"{_pct(before['t2i_r5'])} % ({before['r1_x_chance']:.1f}x chance).")
    protected = [(n, v) for n, v in report.get("summary", {}).items() if not n.startswith("random")]
    if protected:
        lines.append("Target for protected data: R@1 under 2x chance. " + "; ".join(
            f"{n}: {v['r1_x_chance']:.1f}x ({'met' if v['below_2x_chance'] else 'not met'}"
            + (f"; {v['r1_relative_to_clean']:.2f} of {v['relative_to']}" if v.get("r1_relative_to_clean") is not None
               else "") + ")"
            for n, v in protected
        ) + ".")
    times = ", ".join(f"{row['name']} {row['train_seconds']:.0f}s" for row in report["conditions"])
    lines.append(f"Training time per condition: {times}.")
    return "\n".join(lines) + "\n"


def example_sheet(clean_pairs: list[Pair], sets: list[TrainingSet], path: str | Path, examples: int = 3) -> Path:
    """A PNG: for a few pairs of each set, the original, the change amplified x10 around grey, and the
    published image, with the captions under them (the protected caption shows its trigger)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clean_pairs)
    picks = sorted({int(i) for i in np.linspace(0, n - 1, num=min(examples, n))})
    rows = [(s, i) for s in sets for i in picks]
    wrap = 34
    # A row is as tall as its longest wrapped caption needs: long triggers must not run into the next row.
    caption_lines = [max(len(textwrap.wrap(c, wrap)) for c in (clean_pairs[i].caption, s.pairs[i].caption))
                     for s, i in rows]
    heights = [3.2 + 0.13 * lines for lines in caption_lines]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for (train_set, i), ax_row in zip(rows, axes):
        changed = load_image(train_set.pairs[i].path)
        original = load_image(clean_pairs[i].path)
        if original.shape != changed.shape:
            original = load_images([clean_pairs[i]], changed.shape[0], progress=False)[0]
        diff = changed.astype(np.int16) - original.astype(np.int16)
        amplified = np.clip(128 + 10 * diff, 0, 255).astype(np.uint8)
        panels = [
            (original, "original", clean_pairs[i].caption),
            (amplified, "change x10 (grey = none)", f"max |change| {int(np.abs(diff).max())}/255"),
            (changed, f"{train_set.name}", train_set.pairs[i].caption),
        ]
        for ax, (image, title, caption) in zip(ax_row, panels):
            ax.imshow(image, interpolation="nearest")
            ax.set_anchor("N")  # the image at the top of its cell, the row's spare height below for the caption
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(textwrap.fill(caption, wrap), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
