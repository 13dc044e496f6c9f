"""Image sizes per task, read from file headers, and whether a training crop uses the images.

The centre/random crop does not resize: a 64-px crop of a 128-px image trains and evaluates on a quarter of it.
`aigis data check` prints the sizes; a training run logs the same warning before it starts.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# Below this share of the median image, a crop throws most of each image away.
MIN_CROP_SHARE = 0.5


@dataclass(frozen=True)
class TaskSizes:
    """Median width and height of one task's images, and the range of their short sides."""

    task: str
    width: int
    height: int
    short_min: int
    short_max: int

    def crop_warning(self, crop: int) -> str | None:
        """A warning when `crop` keeps under MIN_CROP_SHARE of a median image, else None."""
        if crop * crop >= MIN_CROP_SHARE * self.width * self.height:
            return None
        return (f"crop {crop} keeps {100 * crop * crop / (self.width * self.height):.0f}% of a median {self.task} "
                f"image ({self.width}x{self.height}): training and evaluation see a small part of each image; a crop "
                f"near {min(self.width, self.height)} uses it (--set crop=N)")


def task_sizes(data, order: list[str], limit: int | None = None) -> list[TaskSizes]:
    """Sizes of each task's train and val images (the first `limit` of each task when given); unreadable files
    are left out (`aigis data check` lists them)."""
    from PIL import Image

    found = []
    for index, task in enumerate(order):
        samples = data.samples(index, "train") + data.samples(index, "val")
        sizes = []
        for sample in samples[:limit]:
            try:
                with Image.open(sample.path) as image:
                    sizes.append(image.size)
            except OSError:
                continue
        if sizes:
            short = [min(size) for size in sizes]
            found.append(TaskSizes(task, int(statistics.median(w for w, _ in sizes)),
                                   int(statistics.median(h for _, h in sizes)), min(short), max(short)))
    return found
