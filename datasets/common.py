"""What the dataset classes share: json and class-list reading, box checks, the box-records base class, splits.

The dataset classes (coco.py, pennfudan.py; voc_dataset.py and custom_dataset.py among the extras) and the reference
tools import these; images.py reads the image files.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import clip_boxes_to_image

from utils import SetupError

from .images import read_image


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


def boxes_and_labels(ann, box_key, label_key, where, dtype=np.float32):
    """[n, 4] boxes and int64 [n] labels from ann[box_key] and ann[label_key] (empty when both are absent).

    Boxes are float32, what training uses; dtype=np.float64 keeps them as written (references/convert_dataset.py).
    """
    try:
        boxes = np.asarray(ann.get(box_key, []), dtype=dtype).reshape(-1, 4)
        labels = np.asarray(ann.get(label_key, []), dtype=np.int64).reshape(-1)
    except ValueError:
        raise SetupError(f"{where}: {box_key} must be (n, 4) numbers and {label_key} (n,) integers") from None
    if len(boxes) != len(labels):
        raise SetupError(f"{where}: {len(boxes)} {box_key} but {len(labels)} {label_key}; give one label per box")
    return boxes, labels


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


class BoxRecords(torch.utils.data.Dataset):
    """Shared by VOCDetection and CustomDataset, which parse their files into `self.items`: one dict per image with
    path, height, width, boxes (float32 [N, 4] XYXY), labels and iscrowd. Subclasses say how to fix a wrong size."""

    def size_fix(self, item):
        raise NotImplementedError

    def __len__(self):
        return len(self.items)

    def get_height_and_width(self, idx):
        item = self.items[idx]
        return item["height"], item["width"]

    def __getitem__(self, idx):
        item = self.items[idx]
        height, width = item["height"], item["width"]
        image = read_image(item["path"], "RGB")  # uint8 [3, H, W]
        if image.shape[-2:] != (height, width):  # boxes drawn on another size would train in the wrong place
            raise SetupError(f"{item['path']} is {image.shape[2]}x{image.shape[1]} pixels but {self.size_fix(item)}")
        boxes = item["boxes"].clone()  # a copy: a transform must never edit the stored boxes
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": item["labels"].clone(),
            "image_id": idx,
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": item["iscrowd"].clone(),
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class Subset(torch.utils.data.Subset):
    """torch's Subset, plus `get_height_and_width` passed through to the full dataset."""

    def get_height_and_width(self, idx):
        return self.dataset.get_height_and_width(self.indices[idx])


def random_split(num_items, val_size, seed=0):
    """Seeded, deterministic (train_indices, val_indices) for datasets that come without an official split.

    The same (num_items, val_size, seed) always gives the same split, on any machine and in every process.
    """
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
