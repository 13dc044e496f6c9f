"""The CDDB folder layout: which files are which task's real and fake images, and which of them are usable.

Layout: ``<root>/<task>/{train,val}/[<subcategory>/]{0_real,1_fake}/<images>``; ``val`` is the test split,
as in every CDDB loader. Task t (its position in the chosen task order) labels its images with
``aigis.contract.real_label(t)`` and ``fake_label(t)``.

Unusable images (empty, truncated, not an image, over the pixel limit) are found by a cheap header scan
before training starts, so a run either stops at once naming the file (``on_bad="stop"``) or leaves the
file out and lists it in the final report (``on_bad="skip"``).

Nothing outside the root is read: a file or folder whose real location (links followed) lies outside it
is refused before it is opened -- an image or subcategory folder like an unreadable file (under the on_bad
policy), a task, split or class folder as a layout error, since leaving it out would change the labels or
the classes.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from PIL import Image, UnidentifiedImageError

from aigis.contract import fake_label, real_label, task_of_label
from aigis.errors import DataError
from aigis.preprocess import MAX_FILE_BYTES, MAX_PIXELS, MAX_SIDE, BadImageError, load_image, size_problem

log = logging.getLogger("aigis.data")

SPLITS = ("train", "val")                 # val is CDDB's test split
CLASS_FOLDERS = ("0_real", "1_fake")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
OnBad = Literal["stop", "skip"]
ON_BAD_CHOICES = ("stop", "skip")


class CDDBLayoutError(DataError):
    """The folder tree does not have the CDDB layout; the message names the folder and what is missing."""


@dataclass(frozen=True)
class Sample:
    """One image file with its labels. `relpath` (POSIX, relative to the data root) is what checkpoints store."""

    path: Path
    relpath: str
    task: int
    label: int
    subcategory: str = ""     # "" when the task has no subcategory folders

    @property
    def is_real(self) -> bool:
        return self.label % 2 == 0


# ---- listing the tree ------------------------------------------------------------------------------------

Refuse = Callable[[Path, str], None]     # told about each entry left out, with the reason


def outside_root(path: str | Path, root: str | Path) -> str | None:
    """Why `path` may not be read as data of `root` (None: it may): its real location lies outside the root.

    Only the path is resolved (links followed), nothing is opened, so a link to /etc/passwd costs a readlink.
    """
    real_root = Path(root).resolve()
    real = Path(path).resolve()
    if real.is_relative_to(real_root):
        return None
    return f"lies outside the data root {real_root} (it resolves to {real}); not read"


def _refuse_nothing(path: Path, reason: str) -> None:
    pass


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`: hidden files skipped, suffixes matched case-insensitively."""
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def list_tasks(root: str | Path) -> list[str]:
    """Task folders present under a CDDB root (hidden folders ignored; one lying outside it is still
    listed, so that reading it fails naming it instead of the task order silently shifting)."""
    root = Path(root)
    if not root.is_dir():
        raise CDDBLayoutError(f"data root {root} does not exist or is not a folder")
    return [p.name for p in _visible_dirs(root)]


def class_folders(split_dir: Path, root: str | Path | None = None,
                  refuse: Refuse = _refuse_nothing) -> list[tuple[str, Path]]:
    """(subcategory, folder holding 0_real and 1_fake) pairs of one task split, in a fixed order.

    Given the data root, a subcategory folder lying outside it is left out (told to `refuse`) before
    anything in it is looked at, and a class folder lying outside it is a layout error.
    """
    children = _visible_dirs(split_dir)
    names = {p.name for p in children}
    if names & set(CLASS_FOLDERS):
        missing = [c for c in CLASS_FOLDERS if c not in names]
        if missing:
            raise CDDBLayoutError(f"{split_dir} has {' and '.join(sorted(names & set(CLASS_FOLDERS)))} "
                                  f"but no {' or '.join(missing)}")
        extra = sorted(names - set(CLASS_FOLDERS))
        if extra:
            raise CDDBLayoutError(f"{split_dir} mixes class folders with other folders ({', '.join(extra)}); "
                                  f"use either {'/'.join(CLASS_FOLDERS)} or subcategory folders")
        _require_inside([split_dir / c for c in CLASS_FOLDERS], root)
        return [("", split_dir)]
    if not children:
        raise CDDBLayoutError(f"{split_dir} has neither class folders ({', '.join(CLASS_FOLDERS)}) "
                              f"nor subcategory folders holding them")
    pairs = []
    for sub in children:
        reason = None if root is None else outside_root(sub, root)
        if reason:
            refuse(sub, reason)
            continue
        missing = [c for c in CLASS_FOLDERS if not (sub / c).is_dir()]
        if missing:
            raise CDDBLayoutError(f"subcategory folder {sub} has no {' or '.join(missing)} folder")
        _require_inside([sub / c for c in CLASS_FOLDERS], root)
        pairs.append((sub.name, sub))
    if not pairs:
        raise CDDBLayoutError(f"{split_dir}: every subcategory folder lies outside the data root {root}")
    return pairs


def _require_inside(folders: Iterable[Path], root: str | Path | None) -> None:
    """Folders that decide labels (task, split, class) lie inside the root, or the layout is refused."""
    if root is None:
        return
    for folder in folders:
        reason = outside_root(folder, root)
        if reason:
            raise CDDBLayoutError(f"{folder}: {reason}")


def find_samples(root: str | Path, task: str, task_index: int, split: str,
                 refuse: Refuse | None = None) -> list[Sample]:
    """Every image of one task split, labelled for position `task_index` in the task order.

    Images and subcategory folders lying outside the root are left out and told to `refuse` (by default
    they stop the listing with BadImageError naming them), before anything in them is opened.
    """
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (val is the test split), got {split!r}")
    task_dir = root / task
    if not task_dir.is_dir():
        raise CDDBLayoutError(f"task {task!r} not found under {root}; tasks there: "
                              f"{', '.join(list_tasks(root)) or '(none)'}")
    _require_inside([task_dir], root)
    split_dir = task_dir / split
    if not split_dir.is_dir():
        raise CDDBLayoutError(f"task {task!r} has no {split!r} folder ({split_dir}); "
                              f"CDDB tasks hold train/ and val/ (val is the test split)")
    _require_inside([split_dir], root)
    refuse = refuse or BadImageLog("stop").handle
    samples = []
    for subcategory, folder in class_folders(split_dir, root, refuse):
        for class_name, label in zip(CLASS_FOLDERS, (real_label(task_index), fake_label(task_index))):
            files = []
            for path in _image_files(folder / class_name):
                # the folder lies inside the root, so only a link can lead a file out of it
                reason = outside_root(path, root) if path.is_symlink() else None
                if reason:
                    refuse(path, reason)
                else:
                    files.append(path)
            if not files:
                raise CDDBLayoutError(f"{folder / class_name} holds no images inside the data root "
                                      f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            samples += [Sample(path=f, relpath=f.relative_to(root).as_posix(), task=task_index,
                               label=label, subcategory=subcategory) for f in files]
    return samples


# ---- finding unusable images -----------------------------------------------------------------------------

def header_problem(path: Path, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> str | None:
    """Why `path` is unusable, or None. Cheap: reads headers (PNG: chunk checksums; JPEG: end marker).

    A file the cheap checks cannot clear (other formats, a JPEG without its end marker at the end) is
    decoded in full, so the scan never rejects an image that decoding would accept.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot read ({exc.strerror or exc})"
    if size == 0:
        return "empty file"
    if size > MAX_FILE_BYTES:
        return f"{size} bytes is over the {MAX_FILE_BYTES}-byte limit"
    try:
        with Image.open(path) as im:
            problem = size_problem(*im.size, max_pixels=max_pixels, max_side=max_side)
            if problem:
                return problem
            if im.format == "PNG":
                im.verify()       # walks every chunk and checks its CRC: finds truncation without inflating
                return None
            if im.format == "JPEG" and _ends_with_jpeg_eoi(path):
                return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"not a readable image ({exc})"
    try:
        load_image(path, max_pixels=max_pixels, max_side=max_side)
    except BadImageError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def _ends_with_jpeg_eoi(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 64))
        tail = handle.read().rstrip(b"\x00\r\n ")
    return tail.endswith(b"\xff\xd9")


class BadImageLog:
    """Applies the on_bad policy: "stop" raises naming the file; "skip" records the file and goes on."""

    def __init__(self, on_bad: OnBad = "stop") -> None:
        if on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"on_bad must be one of {', '.join(ON_BAD_CHOICES)}, got {on_bad!r}")
        self.on_bad = on_bad
        self.skipped: dict[str, str] = {}      # path -> reason, in the order met

    def handle(self, path: str | Path, reason: str) -> None:
        """Called once per unusable file: raises BadImageError under "stop", records it under "skip"."""
        if self.on_bad == "stop":
            raise BadImageError(f"{path}: {reason} (on_bad='skip' leaves unreadable images out)")
        if str(path) not in self.skipped:
            self.skipped[str(path)] = reason
            log.warning("skipping unreadable image %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.skipped)

    def report(self) -> str:
        """A human-readable list of the skipped files, for the end of a run."""
        if not self.skipped:
            return "no unreadable images"
        lines = [f"skipped {len(self.skipped)} unreadable image(s):"]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped.items()]
        return "\n".join(lines)


def screen_samples(samples: Sequence[Sample], bad: BadImageLog, max_pixels: int = MAX_PIXELS,
                   workers: int | None = None, progress: bool = True, description: str = "scan") -> list[Sample]:
    """The samples whose files pass `header_problem`; the others go to `bad` (which may raise)."""
    from tqdm import tqdm

    workers = workers or min(8, (os.cpu_count() or 2) * 2)     # file reads wait on the disk, not the CPU
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(tqdm(pool.map(lambda s: header_problem(s.path, max_pixels), samples),
                             total=len(samples), desc=description, unit="img", disable=not progress,
                             leave=False, dynamic_ncols=True))
    good = []
    for sample, problem in zip(samples, problems):
        if problem is None:
            good.append(sample)
        else:
            bad.handle(sample.path, problem)
    return good


# ---- one root read in one task order ---------------------------------------------------------------------

class CDDB:
    """A CDDB-layout root read in a fixed task order; each split is listed and screened once, on first use."""

    def __init__(self, root: str | Path, tasks: Sequence[str], on_bad: OnBad = "stop", screen: bool = True,
                 max_pixels: int = MAX_PIXELS, progress: bool = True) -> None:
        self.root = Path(root)
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("the task order is empty")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"the task order repeats a task: {', '.join(self.tasks)}")
        present = list_tasks(self.root)
        missing = [t for t in self.tasks if t not in present]
        if missing:
            raise CDDBLayoutError(f"task(s) {', '.join(missing)} not found under {self.root}; tasks there: "
                                  f"{', '.join(present) or '(none)'}")
        self.bad = BadImageLog(on_bad)
        self.screen = screen
        self.max_pixels = max_pixels
        self.progress = progress
        self._splits: dict[tuple[int, str], list[Sample]] = {}

    def task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.tasks:
                raise KeyError(f"task {task!r} is not in the task order ({', '.join(self.tasks)})")
            return self.tasks.index(task)
        if not 0 <= task < len(self.tasks):
            raise IndexError(f"task index {task} is outside 0..{len(self.tasks) - 1}")
        return task

    def samples(self, task: int | str, split: str) -> list[Sample]:
        """The usable images of one task split (listed, then screened under the on_bad policy)."""
        index = self.task_index(task)
        key = (index, split)
        if key not in self._splits:
            found = find_samples(self.root, self.tasks[index], index, split, refuse=self.bad.handle)
            if self.screen:
                found = screen_samples(found, self.bad, self.max_pixels, progress=self.progress,
                                       description=f"scan {self.tasks[index]}/{split}")
                _require_both_classes(found, self.root / self.tasks[index] / split, self.root)
            self._splits[key] = found
        return self._splits[key]

    def prepare(self, splits: Iterable[str] = SPLITS) -> None:
        """List and screen every task split now, so that no bad file surprises a run half-way."""
        for index in range(len(self.tasks)):
            for split in splits:
                self.samples(index, split)

    def exemplar_samples(self, items: Iterable[Any]) -> list[Sample]:
        """Samples for remembered images: objects with .path (relative to the root) and .label, or pairs."""
        samples = []
        for item in items:
            relpath, label = (item.path, item.label) if hasattr(item, "label") else item
            samples.append(self.sample_at(str(relpath), int(label)))
        return samples

    def sample_at(self, relpath: str, label: int) -> Sample:
        """The Sample for a file given by its root-relative path and label, checked against the layout."""
        parts = Path(relpath).parts
        if len(parts) not in (4, 5) or parts[1] not in SPLITS or parts[-2] not in CLASS_FOLDERS:
            raise CDDBLayoutError(f"{relpath}: not a CDDB image path (<task>/<split>/[<sub>/]<class>/<file>)")
        task = task_of_label(label)
        if task >= len(self.tasks) or parts[0] != self.tasks[task]:
            raise CDDBLayoutError(f"{relpath}: label {label} belongs to task "
                                  f"{self.tasks[task] if task < len(self.tasks) else task}, not {parts[0]}")
        if (parts[-2] == "0_real") != (label % 2 == 0):
            raise CDDBLayoutError(f"{relpath}: label {label} disagrees with its class folder {parts[-2]}")
        path = self.root / relpath
        reason = outside_root(path, self.root)
        if reason:
            raise CDDBLayoutError(f"{path}: remembered image {reason}")
        if not path.is_file():
            raise CDDBLayoutError(f"{path}: remembered image is missing")
        return Sample(path=path, relpath=Path(relpath).as_posix(), task=task, label=label,
                      subcategory=parts[2] if len(parts) == 5 else "")

    def eval_images(self, crop: int, split: str = "val", per_task: int | None = None):
        """(uint8 [N, crop, crop, 3], int64 labels [N]): each task's `split` as the client sends it
        (the training evaluation view), the first `per_task` images of each task or all of them."""
        import numpy as np

        from aigis.preprocess import eval_view_from_file

        samples = [s for t in range(len(self.tasks)) for s in self.samples(t, split)[:per_task]]
        if not samples:
            raise CDDBLayoutError(f"{self.root}: no {split} images in tasks {', '.join(self.tasks)}")
        images = np.stack([eval_view_from_file(s.path, crop) for s in samples])
        return images, np.array([s.label for s in samples], dtype=np.int64)

    def report(self) -> str:
        return self.bad.report()


def _require_both_classes(samples: Sequence[Sample], split_dir: Path, root: Path) -> None:
    """After skipping, each class must still have images, or the task cannot be learned."""
    keys = {(s.subcategory, s.is_real) for s in samples}
    for subcategory, folder in class_folders(split_dir, root):      # refused subcategories already reported
        for class_name, is_real in zip(CLASS_FOLDERS, (True, False)):
            if (subcategory, is_real) not in keys:
                raise CDDBLayoutError(f"{folder / class_name}: every image is unreadable; nothing left to use")
