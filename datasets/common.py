"""What the dataset classes share: json and class-list reading, box checks, splits.

The dataset classes (coco.py, pennfudan.py; extras/formats/ among the extras) and the reference tools import these;
images.py reads the image files.
"""

import json
import warnings
from pathlib import Path

import torch
from torchvision.ops import clip_boxes_to_image

from utils import SetupError


def load_json(path):
    """Parse a json file; a missing or broken file raises SetupError naming it (and where the parser stopped)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SetupError(f"annotation file {path} not found; check the path you passed") from None
    except json.JSONDecodeError as e:
        raise SetupError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (character {e.pos}).\n"
            f"  A truncated download or an interrupted export looks like this: re-download or re-export the file."
        ) from None
    except UnicodeDecodeError:
        raise SetupError(f"{path} is not a UTF-8 text file; pass the .json annotation file") from None


def read_classes(spec):
    """Class names from "a,b,c" or from a text file with one name per line; classes[k - 1] names label k."""
    path = Path(spec)
    if path.suffix == ".txt" or path.is_file():
        if not path.is_file():
            raise SetupError(f"classes file {path} not found; pass its path, or the names as --classes a,b,c")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        names = [name.strip() for name in spec.split(",")]
    names = [name for name in names if name]
    if not names or len(set(names)) != len(names):
        raise SetupError(f"--classes {spec}: give each class name once, e.g. --classes cat,dog or a classes.txt")
    return names


class BoxChecker:
    """Clips boxes to their image and drops those with no extent, counting both for one warning per dataset.

    A box with zero width or height (a click without a drag in the labelling tool), or one wholly outside its image,
    covers no pixel: torchvision's box regression takes the log of its width, so one such box is a NaN loss.
    """

    def __init__(self, source, strict=False):
        self.source = source  # the annotation file or folder, named in the warning
        self.strict = strict  # raise instead of warning
        self.dropped = self.clipped = 0
        self.files = []  # files with a dropped or clipped box

    def __call__(self, boxes, valid, height, width, file):
        """boxes float32 [N, 4] XYXY pixels, valid bool [N] (the format's own test) -> (clipped boxes, keep [N])."""
        clipped = clip_boxes_to_image(boxes, (height, width))
        keep = valid & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        num_clipped = int(((clipped != boxes).any(dim=1) & keep).sum())
        num_dropped = int((~keep).sum())
        if num_dropped or num_clipped:
            self.dropped += num_dropped
            self.clipped += num_clipped
            self.files.append(str(file))
        return clipped, keep

    def warn(self):
        if not self.files:
            return
        first = ", ".join(self.files[:3])
        if self.strict:
            raise SetupError(
                f"{self.source}: {self.dropped} boxes with zero width or height or outside their image and "
                f"{self.clipped} crossing its border, in {len(self.files)} files (first: {first}).\n"
                f"  Fix those annotations, or drop --strict to have them dropped and clipped."
            )
        warnings.warn(
            f"{self.source}: dropped {self.dropped} boxes with zero width or height or outside their image, and "
            f"clipped {self.clipped} boxes to their image, in {len(self.files)} files (first: {first}). "
            f"Fix those annotations to train and evaluate on what you drew.",
            stacklevel=3,
        )


class Subset(torch.utils.data.Subset):
    """torch's Subset, plus `get_height_and_width` passed through to the full dataset."""

    def get_height_and_width(self, idx):
        return self.dataset.get_height_and_width(self.indices[idx])


def random_split(num_items, val_size, seed=0):
    """Seeded (train_indices, val_indices) for datasets without an official split: the same (num_items, val_size,
    seed) always gives the same split, on any machine and in every process."""
    if not 0 < val_size < num_items:
        raise ValueError(f"val_size must be between 1 and {num_items - 1} for {num_items} images, got {val_size}")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:-val_size]), sorted(order[-val_size:])


def choose_val_size(num_items, val_size=None):
    """--val-size, checked; by default 50 images (the tutorial's Penn-Fudan split) when there are more than 100,
    else 20% of them (at least one), and the choice printed."""
    if val_size is None:
        val_size = 50 if num_items > 100 else max(1, round(0.2 * num_items))
        print(f"Validation: holding out {val_size} of the {num_items} images (--val-size N to choose)")
    if not 0 < val_size < num_items:
        raise SetupError(
            f"--val-size {val_size}: the dataset has {num_items} images to split, so hold out between 1 and "
            f"{num_items - 1} (or give a validation set of its own)"
        )
    return val_size
