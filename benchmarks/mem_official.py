"""MEM speed and memory, phase by phase: the official code itself against this project's MEM, side by side.

    python benchmarks/mem_official.py --official PATH [--images 8] [--runs 3] [--name mem_official]

PATH is a checkout of the official code (Liu et al., "Multimodal Unlearnable Examples", ACM MM 2024, built on
CleanCLIP):

    git clone https://github.com/thinwayliu/Multimodal-Unlearnable-Examples PATH
    git -C PATH checkout 1a17ae7d52f29d905a95a695bcf168f67c0cabdc     # the commit measured ("release1")

Its MEM is `python -m src.poison` (README.md and operation.txt, "Min-Min-Min"): src/poison.py builds the model
(pkgs/openai) and the data loader, and src/poison_train.py:poison() runs the outer loop -- 200 surrogate AdamW
steps, then one pass over every caption line: while `text_t < 5` the trigger search (gradient w.r.t. the token
embeddings through a backward hook, HotFlip over the 49,408-row table on the CPU, greedy left-to-right scoring of
16 candidates per slot with a full forward each, src/utils.py:get_best_candidates), then 8 PGD steps on the noise
(PerturbationTool.min_min_attack). This script never imports or copies that code into the project: it copies the
checkout into a temporary folder, applies the text patches below there, and runs the official entry point as the
README does, with its own command-line options for the rest (`--device cpu --num_workers 0 --batch_size B
--token_num 3 --lr 1e-4`). Every patch must match exactly once, or the script stops and says which one no longer
applies. The patches (also written into the results):

  no-download     pkgs/openai/clip.py load(): no download of OpenAI's RN50.pt and no torch.jit.load; build() gets
                  a state dict of RN50's shapes (meta tensors, OpenAI's key names: the shapes of this project's
                  RN50 preset, which are OpenAI's) instead. With pretrained=False (the paper's from-scratch setting)
                  build() reads only shapes from it, so the model is the one the original code builds.
  schedule        src/poison_train.py: the outer loop's 20 iterations, the 200 surrogate steps and the first 5
                  iterations that search triggers become this run's numbers (--outer, --surrogate-steps,
                  --trigger-iterations).
  noise-store     src/poison_train.py: the float32 noise tensor is sized to the data's caption lines. The code
                  allocates torch.zeros([30000, 3, 224, 224]) (18.1 GB, written at once) for any data of at most
                  30,000 lines, 145,000 and 566,435 lines above that: more than this machine's memory. Only the
                  memory figure changes; the per-caption layout and every read and write of it stay as they are.
  phase-timers    src/poison_train.py: calls to a timer module written beside the copy (_aigis_bench.py) at the
                  phase boundaries of poison(): surrogate_load / surrogate per surrogate step, pass_load / trigger
                  / pgd per batch of the pass, save per outer iteration. Each boundary records the wall time and
                  the process's CPU time (time.process_time: every thread of the process), after a
                  torch.cuda.synchronize on CUDA.
  unused-imports  src/data.py: the imports of the in-modal augmentation and backdoor helpers (utils.augment_text,
                  utils.augment_image, backdoor.utils) are commented out. They need nltk, pandas and torchvision
                  at import time and only the --inmodal and --add_backdoor experiments call them.

Stand-in modules, put first on the official process's import path only for those that its Python cannot import
(recorded in the results): wandb (imported everywhere, called only with --wandb), sklearn.cluster (imported by
src/attacks.py, used by other experiments), ftfy (the tokenizer's fix_text: identity, the generated captions are
plain ASCII), pandas (read_csv of the benchmark's CSV, with Python's csv module) and torchvision.transforms
(Compose, Resize, CenterCrop, ToTensor, Normalize for PIL images, as the official Processor uses them; this
project installs no torchvision).

The data: the project's captioned scenes (protection/captions.py synth_captioned, the demo's Fashion-MNIST style
when its files are present, else flat colours) at 224 px, --images images with --captions-per-image captions
each, written as PNGs with a JSON-lines manifest (what `aigis protect` reads) and the same pairs as a CSV
(`images`, `caption`: what the official loader reads). The official loader decodes every batch from disk; this
project decodes each image once (captions.load_images) before the job starts ("decode_once").

This project's side runs the same phases from the product's modules in a process of its own:
surrogate.train_surrogate (one step per call), and a pass as the product's perturb_pass runs it, written out here
so that each phase is timed on its own -- state._batches, CaptionsPerImage.pick, search.search_triggers and
pgd.pgd_noise under attack.attack_mode -- with settings.MEMSettings' per-image fields: batch B, 16 candidates, trigger
length 3, 8 PGD steps, float32 (amp off), RN50 at 224 px built by clip.build_clip with CLIP's 49,408-row token
table and the tokenizer read from the official checkout's own BPE file (pkgs/openai/bpe_simple_vocab_16e6.txt.gz).

The two sides alternate, each run a fresh process (official, ours, official, ours, ...), so that load on the
machine hits both alike and each side's peak RSS is its own. Reported: per phase, the median over every record
of all runs of CPU-seconds and wall seconds per unit (a surrogate step; a batch of the pass), the spread of the
per-run medians, the ratio official / ours and the spread of the per-run-pair ratios; peak RSS per side; the
noise store of each side at Flickr8K / Flickr30K / COCO scale, computed from the two formats; and which gains are
design choices (one noise and one trigger per image, one caption per image per pass; the int8 memory-mapped
store; decoding once) rather than faster execution of the same work.

Defaults (about 11 minutes on 2 shared cores): 8 images with one caption each, batch 4, 3 surrogate steps and one
pass with trigger search per run, 3 runs per side, one torch thread per side (CPU-seconds then count work, not
OpenMP threads spinning for a core that other work holds). With one caption per image both sides pass over the
same pairs, so the per-batch ratios are execution gains; with --captions-per-image 5 the official pass has five
times the batches (every caption line is a sample). The report also combines the per-unit medians into the paper's
whole job (20 outer iterations of 200 surrogate steps of 128 pairs and a pass, triggers in the first 5) for
Flickr8K, Flickr30K and COCO, assuming cost linear in a batch's pairs: the official pass over every caption line
against ours over every image, and the same pairs on both sides, which splits the gain into design and execution.

Writes benchmarks/results/<--name>.json and .md (--report JSON writes the .md again). On CUDA (--device cuda, not
yet run on a GPU), each side's peak GPU memory is recorded too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
OFFICIAL_URL = "https://github.com/thinwayliu/Multimodal-Unlearnable-Examples"
OFFICIAL_COMMIT = "1a17ae7d52f29d905a95a695bcf168f67c0cabdc"
SIZE = 224  # the official code hard-codes 224 px (its mean/std tensors and its noise store)
BPE_FILE = "pkgs/openai/bpe_simple_vocab_16e6.txt.gz"
# Git blob ids at OFFICIAL_COMMIT of the files the measured code runs: a checkout is compared file by file, with or
# without its .git folder.
OFFICIAL_BLOBS = {
    "src/poison.py": "0d8dc888c7a818ccde860f042e8ff66f4d150e16",
    "src/poison_train.py": "b5a42ee6963c7d0fae5dd418c53f8b3f7425052e",
    "src/utils.py": "0c028fe24974b886cbe2c2f8393230b03f177171",
    "src/attacks.py": "acf9a7b491103125101d39759e22ff70317f75a9",
    "src/data.py": "5bc50669f1e9ce17cd430b668ef8d106be845798",
    "src/parser.py": "e0d588651bd52cf862bfed50c6f8d9e7934b7a0a",
    "src/logger.py": "a6e54c1a174cbb3081b2d6f57781c6dceed954cd",
    "pkgs/openai/clip.py": "7578cca8674ef63ec9dac3c54b84112f1f8f4b0d",
    "pkgs/openai/model.py": "19ea458747471b7bf9abd3c74f7dcf20960e9a33",
    "pkgs/openai/tokenizer.py": "22ea20360b8d491981d49a5fa037943c1a0d00c0",
}

# Training splits as the official code sizes its noise store (caption lines; 5 captions per image) and the paper's
# schedule (reference: 20 outer iterations, 200 surrogate steps of batch 128, triggers in the first 5).
DATASETS = {"Flickr8K": (6_000, 30_000), "Flickr30K": (29_000, 145_000), "COCO": (113_287, 566_435)}
PAPER_OUTER, PAPER_SURROGATE_STEPS, PAPER_TRIGGER_ITERATIONS, PAPER_BATCH = 20, 200, 5, 128


# ----------------------------------------------------------------------------------------------
# The patches


@dataclass(frozen=True)
class Patch:
    name: str
    why: str
    hunks: tuple[tuple[str, str, str], ...]  # (file, exact old text, new text); each old text must occur once


PATCHES = (
    Patch("no-download", "no download of OpenAI's RN50.pt: build() reads RN50's shapes (no weights; from scratch)", (
        ("pkgs/openai/clip.py",
         "        model_path = download(models[name])\n",
         "        model_path = None  # aigis-bench: no download\n"),
        ("pkgs/openai/clip.py",
         '    model = torch.jit.load(model_path, map_location= "cpu").eval()\n',
         "    import _aigis_bench  # aigis-bench: the checkpoint's shapes, no weights\n"
         "    model = _aigis_bench.architecture_only(name, pretrained)\n"),
    )),
    Patch("schedule", "20 outer iterations, 200 surrogate steps, triggers while < 5: this run's numbers", (
        ("src/poison_train.py",
         "    for text_t in range(0,20):\n",
         "    for text_t in range(0, _aigis_bench.OUTER):  # aigis-bench: was 20\n"),
        ("src/poison_train.py",
         "        for j in range(0, 200):\n",
         "        for j in range(0, _aigis_bench.SURROGATE_STEPS):  # aigis-bench: was 200\n"),
        ("src/poison_train.py",
         "            if text_t<5:\n",
         "            if text_t < _aigis_bench.TRIGGER_ITERATIONS:  # aigis-bench: was 5\n"),
    )),
    Patch("noise-store", "the float32 noise tensor sized to the data's caption lines, not 30,000 / 145,000 / 566,435", (
        ("src/poison_train.py",
         "    print(data_samples_num)\n",
         "    print(data_samples_num)\n"
         "    data_samples_num = len(dataloader.dataset)  # aigis-bench: the lines there are, not a fixed size\n"),
    )),
    Patch("phase-timers", "wall and CPU time at the phase boundaries of poison()", (
        ("src/poison_train.py",
         "from . import utils\n",
         "from . import utils\nimport _aigis_bench  # aigis-bench: phase timers\n"),
        ("src/poison_train.py",
         "    noise = torch.zeros([data_samples_num, 3, 224, 224])\n",
         '    _aigis_bench.phase("noise_store")\n'
         "    noise = torch.zeros([data_samples_num, 3, 224, 224])\n"
         '    _aigis_bench.phase("setup")\n'),
        ("src/poison_train.py",
         "        optimizer.zero_grad()\n        model.train()\n",
         '        _aigis_bench.phase("outer")\n        optimizer.zero_grad()\n        model.train()\n'),
        ("src/poison_train.py",
         "            try:\n                batch, index = next(data_iter)\n",
         '            _aigis_bench.phase("surrogate_load")\n'
         "            try:\n                batch, index = next(data_iter)\n"),
        ("src/poison_train.py",
         '            input_ids, attention_mask, pixel_values = batch["input_ids"], batch["attention_mask"], '
         'batch["pixel_values"]\n',
         '            _aigis_bench.phase("surrogate")\n'
         '            input_ids, attention_mask, pixel_values = batch["input_ids"], batch["attention_mask"], '
         'batch["pixel_values"]\n'),
        ("src/poison_train.py",
         "        idx = 0\n",
         '        _aigis_bench.phase("pass_load")\n        idx = 0\n'),
        ("src/poison_train.py",
         "                add_hooks(model)\n",
         '                _aigis_bench.phase("trigger")\n                add_hooks(model)\n'),
        ("src/poison_train.py",
         "            # Perturbation over entire dataset\n",
         '            _aigis_bench.phase("pgd")\n            # Perturbation over entire dataset\n'),
        ("src/poison_train.py",
         "                noise[index[i]] = delta.clone().detach().cpu()\n",
         "                noise[index[i]] = delta.clone().detach().cpu()\n"
         '            _aigis_bench.phase("pass_load")\n'),
        ("src/poison_train.py",
         '        torch.save(noise, os.path.join(options.log_dir_path, "noise.pt"))\n',
         '        _aigis_bench.phase("save")\n'
         '        torch.save(noise, os.path.join(options.log_dir_path, "noise.pt"))\n'),
        ("src/poison_train.py",
         "    return noise,trigger_token_ids\n",
         "    _aigis_bench.phase(None)\n    return noise,trigger_token_ids\n"),
    )),
    Patch("unused-imports", "in-modal augmentation and backdoor helpers not imported (nltk, pandas, torchvision)", (
        ("src/data.py",
         "from utils.augment_text import _augment_text\n"
         "from utils.augment_image import _augment_image\n"
         "from backdoor.utils import apply_trigger\n",
         "# aigis-bench: only --inmodal and --add_backdoor use these\n"
         "# from utils.augment_text import _augment_text\n"
         "# from utils.augment_image import _augment_image\n"
         "# from backdoor.utils import apply_trigger\n"),
    )),
)


class PatchError(RuntimeError):
    pass


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def checkout_files(root: Path) -> dict[str, str | None]:
    """The git blob id of each file the measured code runs (None: missing), before any patch."""
    return {name: git_blob_id((root / name).read_bytes()) if (root / name).is_file() else None
            for name in OFFICIAL_BLOBS}


def apply_patches(root: Path, patches=PATCHES) -> None:
    """Apply every hunk to the copy at root (line endings as each file has them)."""
    for patch in patches:
        for relative, old, new in patch.hunks:
            path = root / relative
            if not path.is_file():
                raise PatchError(f"patch {patch.name!r}: {relative} is missing from the checkout")
            text = path.read_bytes().decode("utf-8")
            eol = "\r\n" if "\r\n" in text else "\n"
            old_text, new_text = old.replace("\n", eol), new.replace("\n", eol)
            count = text.count(old_text)
            if count != 1:
                first = old.strip().splitlines()[0]
                raise PatchError(f"patch {patch.name!r} no longer applies: {relative} has {count} copies of "
                                 f"{first!r} (need exactly 1); is this commit {OFFICIAL_COMMIT[:7]}?")
            path.write_bytes(text.replace(old_text, new_text).encode("utf-8"))


# The timer module the patched code imports (written into the copy; this script's own code).
BENCH_MODULE = r'''
"""Phase timers and the architecture-only model for benchmarks/mem_official.py (aigis)."""
import atexit, json, os, resource, time

OUTER = int(os.environ["AIGIS_BENCH_OUTER"])
SURROGATE_STEPS = int(os.environ["AIGIS_BENCH_SURROGATE_STEPS"])
TRIGGER_ITERATIONS = int(os.environ["AIGIS_BENCH_TRIGGER_ITERATIONS"])
_records, _current = [], None
_started = (time.perf_counter(), time.process_time())


def _sync():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def phase(name):
    """End the phase running (recording its wall and CPU seconds) and start `name` (None: none)."""
    global _current
    _sync()
    now = (time.perf_counter(), time.process_time())
    if _current is not None:
        _records.append([_current[0], now[0] - _current[1], now[1] - _current[2]])
    _current = None if name is None else (name, now[0], now[1])


class _Shapes:
    def __init__(self, state):
        self._state = state

    def state_dict(self):
        return dict(self._state)


def architecture_only(name, pretrained):
    if pretrained:
        raise RuntimeError("aigis-bench: no pretrained weights offline; run from scratch (no --pretrained)")
    import torch
    shapes = json.loads(open(os.environ["AIGIS_BENCH_SHAPES"]).read())
    if name not in shapes:
        raise RuntimeError(f"aigis-bench: no shapes for {name}")
    return _Shapes({k: torch.empty(v, device="meta") for k, v in shapes[name].items()})


def _write():
    out = {"records": _records, "wall_s": time.perf_counter() - _started[0],
           "cpu_s": time.process_time() - _started[1],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    except Exception:
        pass
    with open(os.environ["AIGIS_BENCH_OUT"], "w") as handle:
        json.dump(out, handle)


atexit.register(_write)
'''

# Stand-ins for modules the official code imports that this Python lacks (used only where import fails).
SHIMS = {
    "wandb": ("imported by most modules, called only with --wandb", {"wandb/__init__.py": '''
"""aigis-bench stand-in: wandb is never called without --wandb."""
def _off(*args, **kwargs):
    raise RuntimeError("aigis-bench: wandb is not available offline")
init = log = save = finish = _off
'''}),
    "sklearn": ("src/attacks.py imports sklearn.cluster for other experiments", {
        "sklearn/__init__.py": "",
        "sklearn/cluster.py": '''
"""aigis-bench stand-in: imported by src/attacks.py, used only by other experiments."""
class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("aigis-bench: scikit-learn is not installed")
MeanShift = KMeans = _Unavailable
def estimate_bandwidth(*args, **kwargs):
    raise RuntimeError("aigis-bench: scikit-learn is not installed")
'''}),
    "ftfy": ("the tokenizer's fix_text: identity (the generated captions are plain ASCII)", {"ftfy/__init__.py": '''
"""aigis-bench stand-in: fix_text is the identity on the generated (plain ASCII) captions."""
def fix_text(text, *args, **kwargs):
    return text
'''}),
    "pandas": ("read_csv of the benchmark's CSV with Python's csv module", {"pandas/__init__.py": '''
"""aigis-bench stand-in: read_csv of a small CSV into columns (what the official dataset reads of it)."""
import csv


class _Column(list):
    def tolist(self):
        return list(self)


class _Frame:
    def __init__(self, columns):
        self._columns = columns

    def __getitem__(self, key):
        return self._columns[key]

    def __contains__(self, key):
        return key in self._columns


def read_csv(path, sep=",", **kwargs):
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter=sep))
    names = list(rows[0]) if rows else []
    return _Frame({name: _Column(row[name] for row in rows) for name in names})
'''}),
    "torchvision": ("transforms for PIL images as the official Processor uses them (no torchvision here)", {
        "torchvision/__init__.py": "from . import transforms  # noqa: F401\n",
        "torchvision/transforms.py": '''
"""aigis-bench stand-in: the transforms the official Processor composes, for PIL images, as torchvision does them."""
import numpy as np
import torch
from PIL import Image


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """An int size: the shorter side to size, the longer in proportion (truncated), as torchvision."""
    def __init__(self, size, interpolation=Image.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        w, h = image.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            if short == self.size:
                return image
            new_short, new_long = self.size, int(self.size * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            size = (self.size[1], self.size[0])
        return image.resize(size, self.interpolation)


class CenterCrop:
    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, image):
        w, h = image.size
        th, tw = self.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return image.crop((left, top, left + tw, top + th))


class ToTensor:
    def __call__(self, image):
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor):
        return (tensor - self.mean) / self.std


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("aigis-bench: torchvision is not installed")


RandomResizedCrop = RandomCrop = _Unavailable
'''}),
}


def importable(module: str) -> bool:
    """Whether this Python can import `module` (checked in a child, so nothing is imported here)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def prepare_official(checkout: Path, work: Path) -> dict:
    """Copy the checkout to work/official, patch it, write the timer module and the stand-ins it needs."""
    if not (checkout / "src" / "poison_train.py").is_file():
        raise SystemExit(f"--official {checkout}: not a checkout of {OFFICIAL_URL} (no src/poison_train.py)")
    commit = None
    if (checkout / ".git").exists():
        done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = done.stdout.strip() or None
    files = checkout_files(checkout)
    differ = sorted(name for name, blob in files.items() if blob != OFFICIAL_BLOBS[name])
    if differ:
        print(f"note: {', '.join(differ)} differ from commit {OFFICIAL_COMMIT[:7]}, the one BENCHMARKS.md reports")
    copy = work / "official"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "data", "*.npy", "*.prof", "*.png",
                                                                   "__pycache__", ".ipynb_checkpoints"))
    apply_patches(copy)
    (copy / "_aigis_bench.py").write_text(BENCH_MODULE)
    shims = work / "shims"
    used = []
    for module, (why, files) in SHIMS.items():
        if importable(module):
            continue
        for relative, text in files.items():
            path = shims / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        used.append({"module": module, "why": why})
    return {"copy": copy, "shims": shims, "commit": commit, "files_differing_from_measured_commit": differ,
            "git_blob_ids": files, "stand_ins": used}


def write_shapes(path: Path) -> None:
    """RN50's state-dict shapes (OpenAI's key names) from this project's preset, built on the meta device."""
    import torch

    from aigis.protection.clip import CLIP, PRESETS

    with torch.device("meta"):
        model = CLIP(PRESETS["RN50"])
    path.write_text(json.dumps({"RN50": {k: list(v.shape) for k, v in model.state_dict().items()}}))


# ----------------------------------------------------------------------------------------------
# The data


def make_data(work: Path, images: int, captions_per_image: int, style: str) -> dict:
    """The project's captioned scenes at 224 px: JSON lines for this project, the same pairs as a CSV."""
    from aigis.protection.captions import read_pairs, synth_captioned
    from aigis.protection.fashion import FashionDataError

    root = work / "data"
    used = style
    try:
        synth_captioned(root, images, 0, size=SIZE, seed=0, style=style, captions_per_image=captions_per_image)
    except FashionDataError:
        if style != "fashion":
            raise
        used = "flat"  # the demo's fallback: no Fashion-MNIST files here
        synth_captioned(root, images, 0, size=SIZE, seed=0, style=used, captions_per_image=captions_per_image)
    pairs = read_pairs(root, "train.jsonl")
    with (root / "train.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["images", "caption"])
        for pair in pairs:
            writer.writerow([pair.path.relative_to(root.resolve()).as_posix(), pair.caption])
    return {"root": root, "style": used, "caption_lines": len(pairs)}


# ----------------------------------------------------------------------------------------------
# The two sides, each in a process of its own


def official_env(prep: dict, args, out: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(prep["shims"])] + [p for p in [env.get("PYTHONPATH")] if p]),
        "AIGIS_BENCH_OUTER": str(args.outer), "AIGIS_BENCH_SURROGATE_STEPS": str(args.surrogate_steps),
        "AIGIS_BENCH_TRIGGER_ITERATIONS": str(args.trigger_iterations), "AIGIS_BENCH_OUT": str(out),
        "AIGIS_BENCH_SHAPES": str(prep["shapes"]), "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
    })
    return env


def official_parameters(prep: dict, args, work: Path) -> int:
    """Parameters of the model the patched official load() builds (the same architecture as ours: checked)."""
    code = ("from pkgs.openai.clip import load; model, _ = load(name='RN50', pretrained=False); "
            "print(sum(p.numel() for p in model.parameters()))")
    done = subprocess.run([sys.executable, "-c", code], cwd=prep["copy"], capture_output=True, text=True,
                          env=official_env(prep, args, work / "unused.json"))
    (work / "unused.json").unlink(missing_ok=True)  # the timer module's record of this import-only process
    if done.returncode != 0:
        raise SystemExit(f"the patched official load() failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def run_official(prep: dict, data: dict, args, out: Path, log: Path) -> dict:
    env = official_env(prep, args, out)
    command = [sys.executable, "-m", "src.poison", "--name", "bench", "--logs", str(out.parent / "logs"),
               "--train_data", str(data["root"] / "train.csv"), "--image_key", "images", "--caption_key", "caption",
               "--device", "cpu" if args.device == "cpu" else "gpu", "--device_id", "0", "--token_num", "3",
               "--lr", "1e-4", "--batch_size", str(args.batch), "--num_workers", "0"]
    return _child(command, prep["copy"], env, out, log)


def run_ours(data: dict, args, out: Path, log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, str(Path(__file__).resolve()), "--side", "ours", "--data", str(data["root"]),
               "--bpe", str(Path(args.official).resolve() / BPE_FILE), "--out", str(out),
               "--images", str(args.images), "--captions-per-image", str(args.captions_per_image),
               "--batch", str(args.batch), "--outer", str(args.outer), "--surrogate-steps", str(args.surrogate_steps),
               "--trigger-iterations", str(args.trigger_iterations), "--threads", str(args.threads),
               "--device", args.device, "--official", args.official]
    return _child(command, out.parent, env, out, log)


def _child(command: list[str], cwd: Path, env: dict, out: Path, log: Path) -> dict:
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0 or not out.is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-30:])
        raise SystemExit(f"{' '.join(command[:4])} ... failed (exit {process.returncode}); last lines of {log}:\n"
                         f"{tail}")
    result = json.loads(out.read_text())
    result["process_wall_s"] = time.perf_counter() - started
    result["process_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["process_peak_rss_bytes"] = usage.ru_maxrss * 1024  # as the parent saw it (os.wait4)
    return result


class Phases:
    """This project's side of the timers: the same records as the official copy's _aigis_bench."""

    def __init__(self, device):
        self.records, self.current, self.device = [], None, device

    def __call__(self, name):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = (time.perf_counter(), time.process_time())
        if self.current is not None:
            self.records.append([self.current[0], now[0] - self.current[1], now[1] - self.current[2]])
        self.current = None if name is None else (name, now[0], now[1])


def ours_main(args) -> int:
    """This project's phases, timed as the official copy's are (child process of --side ours)."""
    started = (time.perf_counter(), time.process_time())
    import numpy as np
    import torch

    from aigis.protection.attack import attack_mode
    from aigis.protection.captions import load_images, read_pairs
    from aigis.protection.clip import build_clip
    from aigis.protection.pgd import pgd_noise
    from aigis.protection.search import _candidate_table, search_triggers
    from aigis.protection.settings import MEMSettings
    from aigis.protection.state import CaptionsPerImage, MEMState, _batches
    from aigis.protection.surrogate import make_optimizer, train_surrogate
    from aigis.protection.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    phase = Phases(device)
    phase("setup")
    # The per-image MEM fields (the paper's values unless the benchmark's schedule says otherwise); float32 as the
    # official code runs; one surrogate step per train_surrogate call, so that each step is timed.
    settings = MEMSettings(batch_size=args.batch, surrogate_steps=1, trigger_length=3, candidates=16, pgd_steps=8,
                           outer_iterations=args.outer, trigger_iterations=args.trigger_iterations, lr=1e-4,
                           amp="off")
    settings.validate()
    root = Path(args.data)
    pairs = read_pairs(root, "train.jsonl")
    groups = CaptionsPerImage.by_key([p.path for p in pairs])
    tokenizer = Tokenizer.from_clip_vocab(args.bpe)
    torch.manual_seed(settings.seed)
    model = build_clip("RN50", tokenizer.vocab_size).to(device)
    tokens = tokenizer.tokenize([p.caption for p in pairs], model.context_length, settings.trigger_length)
    tokenizer.trigger_candidates()  # cached by the tokenizer for the job's whole life
    phase("decode_once")
    sources = [pairs[c] for c in groups.first(np.arange(groups.n_images))]
    images = load_images(sources, SIZE, progress=False)
    phase("state")
    noise = np.lib.format.open_memmap(root.parent / "ours_noise.npy", mode="w+", dtype=np.int8, shape=images.shape)
    state = MEMState(model, make_optimizer(model, settings), torch.Generator().manual_seed(settings.seed), noise,
                     np.full((len(sources), settings.trigger_length), tokenizer.placeholder_id, dtype=np.int64))
    n = images.shape[0]
    for iteration in range(args.outer):
        for _ in range(args.surrogate_steps):
            phase("surrogate")
            train_surrogate(state, images, tokens, settings, device, groups)
        update = iteration < args.trigger_iterations
        phase("trigger_setup")
        candidate_ids = _candidate_table(tokenizer, [model], device)
        with attack_mode([model], batch_statistics=settings.norm_stats == "batch"):
            for index in _batches(n, settings.batch_size, state.generator):
                phase("pass_load")
                x = torch.from_numpy(images[index]).to(device)
                delta = torch.from_numpy(np.asarray(state.noise[index])).to(device).to(torch.int16)
                t = tokens[groups.pick(index, state.generator)].to(device)
                trig = torch.from_numpy(state.triggers[index]).to(device)
                if update:
                    phase("trigger")
                    trig, _ = search_triggers([model], tokenizer, x, delta, t, trig, settings,
                                              candidate_ids=candidate_ids)
                    state.triggers[index] = trig.cpu().numpy()
                phase("pgd")
                delta, _ = pgd_noise([model], x, delta, t, trig, settings, settings.pgd_steps, state.generator)
                state.noise[index] = delta.to(torch.int8).cpu().numpy()
        phase("save")
        noise.flush()
    phase(None)
    out = {"records": phase.records, "wall_s": time.perf_counter() - started[0],
           "cpu_s": time.process_time() - started[1],
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "candidate_table_rows": int(candidate_ids.numel()), "token_table_rows": int(model.vocab_size),
           "parameters": int(sum(p.numel() for p in model.parameters())), "norm_stats": settings.norm_stats,
           "settings": settings.to_dict()}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    Path(args.out).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------------------------
# Figures


# Phases compared one to one (unit: one surrogate step, or one batch of the pass).
COMPARED = ("surrogate", "trigger", "pgd", "pass_load")
PHASE_NAMES = {
    "surrogate": "surrogate step (forward, backward, AdamW)",
    "surrogate_load": "surrogate step's batch from disk (official only)",
    "trigger": "trigger search, per batch",
    "pgd": "PGD noise update (8 steps), per batch",
    "pass_load": "a pass batch's images, noise and triggers",
}


def per_run(runs: list[dict], name: str, k: int) -> list[float]:
    """Median seconds (k = 1 wall, 2 CPU) of phase `name` in each run."""
    return [statistics.median(r[k] for r in run["records"] if r[0] == name) for run in runs
            if any(r[0] == name for r in run["records"])]


def pooled(runs: list[dict], name: str, k: int) -> float | None:
    values = [r[k] for run in runs for r in run["records"] if r[0] == name]
    return statistics.median(values) if values else None


def summarise(official: list[dict], ours: list[dict], args, data: dict) -> dict:
    phases = {}
    for name in ("surrogate_load", "surrogate", "trigger", "pgd", "pass_load", "save", "noise_store",
                 "decode_once", "trigger_setup"):
        row = {}
        for side, runs in (("official", official), ("ours", ours)):
            for unit, k in (("cpu", 2), ("wall", 1)):
                value = pooled(runs, name, k)
                if value is None:
                    continue
                medians = per_run(runs, name, k)
                row[f"{side}_{unit}_s"] = value
                row[f"{side}_{unit}_range"] = [min(medians), max(medians)]
                row[f"{side}_records"] = sum(1 for run in runs for r in run["records"] if r[0] == name)
        if name in COMPARED and "ours_cpu_s" in row and "official_cpu_s" in row:
            for unit, k in (("cpu", 2), ("wall", 1)):
                row[f"ratio_{unit}"] = row[f"official_{unit}_s"] / row[f"ours_{unit}_s"]
                pairs = [a / b for a, b in zip(per_run(official, name, k), per_run(ours, name, k))]
                row[f"ratio_{unit}_range"] = [min(pairs), max(pairs)]
        if row:
            phases[name] = row
    # The surrogate step as a whole: the official step decodes its batch from disk (surrogate_load), ours reads
    # its batch from the images decoded once (inside train_surrogate).
    whole = {}
    for unit, k in (("cpu", 2), ("wall", 1)):
        step = [a + b for a, b in zip(per_run(official, "surrogate", k), per_run(official, "surrogate_load", k))]
        mine = per_run(ours, "surrogate", k)
        whole[f"official_{unit}_s"] = (phases["surrogate"][f"official_{unit}_s"]
                                       + phases["surrogate_load"][f"official_{unit}_s"])
        whole[f"ratio_{unit}"] = whole[f"official_{unit}_s"] / phases["surrogate"][f"ours_{unit}_s"]
        whole[f"ratio_{unit}_range"] = [min(a / b for a, b in zip(step, mine)), max(a / b for a, b in zip(step, mine))]
    phases["surrogate_with_load"] = whole

    rss = {side: [r["process_peak_rss_bytes"] for r in runs] for side, runs in (("official", official), ("ours", ours))}
    memory_now = {side: {"median_bytes": statistics.median(v), "range_bytes": [min(v), max(v)]}
                  for side, v in rss.items()}
    cpi = args.captions_per_image
    memory_now["noise_store_bytes"] = {"official": data["caption_lines"] * 3 * SIZE * SIZE * 4,
                                       "ours": args.images * 3 * SIZE * SIZE}
    if any("peak_gpu_bytes" in r for r in official + ours):
        memory_now["peak_gpu_bytes"] = {side: [r.get("peak_gpu_bytes") for r in runs]
                                        for side, runs in (("official", official), ("ours", ours))}
    return {"phases": phases, "peak_rss": memory_now, "at_scale": at_scale(), "job": job_estimate(phases, args.batch),
            "captions_per_image": cpi}


def at_scale() -> dict:
    """Noise store (and ours' decoded images) at the three datasets' training splits, computed from the formats."""
    image = 3 * SIZE * SIZE
    out = {}
    for name, (images, lines) in DATASETS.items():
        out[name] = {
            "images": images, "caption_lines": lines,
            "official_noise_bytes": lines * image * 4,  # float32 per caption line, resident (torch.zeros)
            "ours_noise_bytes": images * image,  # int8 per image, np.memmap on disk
            "ours_decoded_images_bytes": images * image,  # uint8 per image, in RAM (decoded once)
        }
        out[name]["noise_ratio"] = out[name]["official_noise_bytes"] / out[name]["ours_noise_bytes"]
    return out


def job_estimate(phases: dict, batch: int) -> dict:
    """CPU-seconds of the paper's whole job (20 outer iterations, 200 surrogate steps of 128, triggers in the first
    5, a pass over every caption line (official) or every image (ours)), combined from the measured per-unit
    medians, per pair: assumes each phase's cost grows linearly with the pairs in a batch."""
    per_pair = {side: {name: phases[name][f"{side}_cpu_s"] / batch for name in ("surrogate", "trigger", "pgd",
                                                                                 "pass_load")}
                for side in ("official", "ours")}
    per_pair["official"]["surrogate"] += phases["surrogate_load"]["official_cpu_s"] / batch
    out = {}
    for name, (images, lines) in DATASETS.items():
        costs = {}
        for side, pass_pairs in (("official", lines), ("ours", images), ("official_one_per_image", images)):
            p = per_pair["official" if side.startswith("official") else "ours"]
            costs[side] = (PAPER_OUTER * PAPER_SURROGATE_STEPS * PAPER_BATCH * p["surrogate"]
                           + PAPER_TRIGGER_ITERATIONS * pass_pairs * p["trigger"]
                           + PAPER_OUTER * pass_pairs * (p["pgd"] + p["pass_load"]))
        out[name] = {
            "official_cpu_s": costs["official"], "ours_cpu_s": costs["ours"],
            "ratio": costs["official"] / costs["ours"],
            "execution_ratio": costs["official_one_per_image"] / costs["ours"],  # the same pairs on both sides
            # one noise per image, one caption of it per pass:
            "design_ratio": costs["official"] / costs["official_one_per_image"],
        }
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(result: dict) -> str:
    s, phases = result["summary"], result["summary"]["phases"]
    cfg = result["config"]

    def cell(row, side, unit="cpu"):
        lo, hi = row[f"{side}_{unit}_range"]
        return f"{row[f'{side}_{unit}_s']:.2f} ({lo:.2f}-{hi:.2f})"


    def ratio(row, unit="cpu"):
        lo, hi = row[f"ratio_{unit}_range"]
        return f"**{row[f'ratio_{unit}']:.2f}x** ({lo:.2f}-{hi:.2f})"

    official_code = (f"{cfg['official_commit'][:7]}" if cfg["official_commit"] else "(no .git: commit unknown)")
    differ = result["official_files_differing_from_measured_commit"]
    official_code += (f", its files as at {OFFICIAL_COMMIT[:7]}" if not differ
                      else f", {', '.join(differ)} differing from {OFFICIAL_COMMIT[:7]}")
    threads = f"{cfg['threads']} thread{'s' if cfg['threads'] > 1 else ''} per side"
    lines = [
        "# MEM, phase by phase: the official code against this project", "",
        result["machine"], "",
        f"Official code {official_code}, patched as listed below; this project at {cfg['project_commit']}. RN50 at "
        f"224 px from scratch, float32, {threads}, batch {cfg['batch']}, trigger length 3, 16 candidates, 8 PGD "
        f"steps; per outer iteration {cfg['surrogate_steps']} surrogate steps and one pass; {cfg['outer']} outer "
        f"iteration(s) per run; {cfg['runs']} runs per side, interleaved (official, ours, ...), each a fresh process. "
        f"Data: {cfg['images']} {cfg['style']} scenes x {cfg['captions_per_image']} caption(s) = "
        f"{cfg['caption_lines']} caption lines. Whole benchmark: {result['benchmark_wall_s'] / 60:.1f} min.", "",
        "CPU-seconds of the process per unit: the median over every record of all runs, the range of the per-run "
        "medians in brackets; official / ours: the ratio of those medians, the range over the run pairs in brackets.",
        "",
        "| phase (unit) | official | ours | official / ours, CPU | official / ours, wall |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("surrogate", "trigger", "pgd"):
        row = phases[name]
        lines.append(f"| {PHASE_NAMES[name]} | {cell(row, 'official')} | {cell(row, 'ours')} | {ratio(row)} | "
                     f"{ratio(row, 'wall')} |")
    whole, load, pass_load = phases["surrogate_with_load"], phases["surrogate_load"], phases["pass_load"]
    lines += [
        "", f"A pass batch from the data: official {pass_load['official_cpu_s'] * 1000:.0f} ms (its images decoded "
        f"from disk; it gathers noise and triggers per sample inside the trigger and PGD phases), ours "
        f"{pass_load['ours_cpu_s'] * 1000:.1f} ms (images, noise and triggers by array indexing). A surrogate step's "
        f"batch: official "
        f"{load['official_cpu_s'] * 1000:.0f} ms from disk, ours inside the step from the images decoded once before "
        f"the job ({phases['decode_once']['ours_cpu_s'] * 1000:.0f} ms for {cfg['images']} images); with it, the "
        f"surrogate step is {whole['ratio_cpu']:.2f}x ({whole['ratio_cpu_range'][0]:.2f}-"
        f"{whole['ratio_cpu_range'][1]:.2f}). The images are PNGs at the model's size, cheap to decode; photos cost "
        f"the official loader more.", ""]
    ours_run = result["runs"]["ours"][0]
    same = result.get("official_parameters") == ours_run["parameters"]
    lines += [f"Models: {ours_run['parameters']:,} parameters in ours, "
              f"{'the same in' if same else str(result.get('official_parameters')) + ' in'} the official one; "
              f"a {ours_run['token_table_rows']:,}-row token table. HotFlip ranks all of its rows in the official "
              f"code, the {ours_run['candidate_table_rows']:,} "
              f"whole-word candidates in ours; ours runs its default BatchNorm mode while attacking "
              f"(norm_stats {ours_run['norm_stats']}), the official code the stored averages (eval mode).", ""]
    rss = s["peak_rss"]
    lines += [
        f"Peak RSS (median, range over runs): official {gib(rss['official']['median_bytes'])} "
        f"({gib(rss['official']['range_bytes'][0])}-{gib(rss['official']['range_bytes'][1])}), ours "
        f"{gib(rss['ours']['median_bytes'])} ({gib(rss['ours']['range_bytes'][0])}-"
        f"{gib(rss['ours']['range_bytes'][1])}); their noise stores here: official "
        f"{gib(rss['noise_store_bytes']['official'])} float32 resident, ours {gib(rss['noise_store_bytes']['ours'])} "
        f"int8 memory-mapped.", "",
        "Noise store at the datasets' training splits, computed from the formats (official: float32 [lines, 3, 224, "
        "224] in RAM, sized 30,000 / 145,000 / 566,435 lines by the code; ours: int8 [images, 224, 224, 3] "
        "memory-mapped, plus the images decoded once as uint8 in RAM):", "",
        "| dataset | images / caption lines | official noise | ours: noise (memmap) + decoded images (RAM) "
        "| noise ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for name, row in s["at_scale"].items():
        lines.append(f"| {name} | {row['images']:,} / {row['caption_lines']:,} | {gib(row['official_noise_bytes'])} | "
                     f"{gib(row['ours_noise_bytes'])} + {gib(row['ours_decoded_images_bytes'])} | "
                     f"{row['noise_ratio']:.0f}x |")
    lines += [
        "", "The paper's whole job (20 outer iterations of 200 surrogate steps of 128 pairs and a pass, triggers "
        "searched in the first 5), combined from the CPU medians above per pair (assumes cost linear in the pairs of "
        "a batch): the execution gain is the same pairs on both sides; the design gain is the official code's "
        "pass over every caption line where ours passes over every image once (one noise and one trigger per image, "
        "one of its captions per pass).", "",
        "| dataset | official (CPU-h) | ours (CPU-h) | ratio | execution | design |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in s["job"].items():
        lines.append(f"| {name} | {row['official_cpu_s'] / 3600:,.0f} | {row['ours_cpu_s'] / 3600:,.0f} | "
                     f"{row['ratio']:.1f}x | {row['execution_ratio']:.1f}x | {row['design_ratio']:.1f}x |")
    lines += ["", "Patches applied to the official copy (benchmarks/mem_official.py's docstring has the details):", ""]
    lines += [f"- `{p['name']}`: {p['why']} ({', '.join(sorted(p['files']))})" for p in result["patches"]]
    if result["stand_ins"]:
        lines += ["", "Stand-in modules for what this Python lacks: " + "; ".join(
            f"`{m['module']}`: {m['why']}" for m in result["stand_ins"]) + "."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def machine_line() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"Machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()} kernels). Command: python benchmarks/mem_official.py "
            + " ".join(sys.argv[1:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=f"Get the official code: git clone {OFFICIAL_URL} PATH; the commit "
                                            f"measured is {OFFICIAL_COMMIT}.")
    parser.add_argument("--official", metavar="PATH",
                        help=f"a checkout of {OFFICIAL_URL} (git clone; commit {OFFICIAL_COMMIT[:7]} measured)")
    parser.add_argument("--images", type=int, default=8, help="images of the generated data")
    parser.add_argument("--captions-per-image", type=int, default=1,
                        help="caption lines per image (5: Flickr/COCO; the official pass then has 5x the batches)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--surrogate-steps", type=int, default=3, help="surrogate steps per outer iteration")
    parser.add_argument("--outer", type=int, default=1, help="outer iterations per run")
    parser.add_argument("--trigger-iterations", type=int, default=1,
                        help="leading outer iterations that search triggers")
    parser.add_argument("--runs", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per side (1: CPU-seconds count work, not OpenMP threads waiting for a "
                             "core that other work holds)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--style", default="fashion", help="scene style (fashion falls back to flat without its files)")
    parser.add_argument("--name", default="mem_official", help="result file stem under benchmarks/results/")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (logs, patched copy) instead of a temporary folder")
    parser.add_argument("--report", metavar="JSON", help="only write the .md again from a results JSON file")
    parser.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--bpe", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side == "ours":
        return ours_main(args)
    if args.report:
        path = Path(args.report)
        text = report(json.loads(path.read_text()))
        path.with_suffix(".md").write_text(text)
        print(text)
        return 0
    if not args.official:
        parser.error("--official PATH is required (a checkout of the official code)")
    if args.images * args.captions_per_image < args.batch or args.images < 2:
        parser.error("need at least one batch of caption lines and 2 images")
    if not 0 < args.trigger_iterations <= args.outer:
        parser.error("--trigger-iterations must be between 1 and --outer (the trigger search is measured)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA here")
    checkout = Path(args.official).resolve()
    started = time.perf_counter()
    project_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        if args.keep:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        prep = prepare_official(checkout, work)
        prep["shapes"] = work / "rn50_shapes.json"
        write_shapes(prep["shapes"])
        prep["parameters"] = official_parameters(prep, args, work)
        data = make_data(work, args.images, args.captions_per_image, args.style)
        if prep["commit"] and prep["commit"] != OFFICIAL_COMMIT:
            print(f"note: the checkout is at {prep['commit']}, the figures in BENCHMARKS.md are of {OFFICIAL_COMMIT}")
        official, ours = [], []
        for run in range(args.runs):
            for side, runs in (("official", official), ("ours", ours)):
                out, log = work / f"{side}_{run}.json", work / f"{side}_{run}.log"
                if side == "official":
                    shutil.rmtree(work / "logs", ignore_errors=True)
                    result = run_official(prep, data, args, out, log)
                else:
                    result = run_ours(data, args, out, log)
                runs.append(result)
                print(f"run {run + 1}/{args.runs} {side}: {result['process_wall_s']:.0f} s wall, "
                      f"{result['process_cpu_s']:.0f} CPU-s, peak RSS {gib(result['process_peak_rss_bytes'])}",
                      flush=True)
        summary_config = {"images": args.images, "captions_per_image": args.captions_per_image,
                          "caption_lines": data["caption_lines"], "style": data["style"], "batch": args.batch,
                          "surrogate_steps": args.surrogate_steps, "outer": args.outer,
                          "trigger_iterations": args.trigger_iterations, "runs": args.runs, "threads": args.threads,
                          "device": args.device, "official_commit": prep["commit"], "project_commit": project_commit}
        summary = summarise(official, ours, args, data)
        result = {
            "machine": machine_line(), "config": summary_config, "summary": summary,
            "patches": [{"name": p.name, "why": p.why, "files": sorted({h[0] for h in p.hunks}),
                         "hunks": [{"file": f, "old": o, "new": n} for f, o, n in p.hunks]} for p in PATCHES],
            "stand_ins": prep["stand_ins"], "official_parameters": prep["parameters"],
            "official_git_blob_ids": prep["git_blob_ids"],
            "official_files_differing_from_measured_commit": prep["files_differing_from_measured_commit"],
            "official_url": OFFICIAL_URL, "official_commit_measured": OFFICIAL_COMMIT,
            "runs": {"official": official, "ours": ours},
        }
        result["benchmark_wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = report(result)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
