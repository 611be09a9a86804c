"""YOLO txt labels, as Ultralytics reads them and Roboflow exports them.

    DIR/data.yaml         path: .              (optional; train/val/test are relative to it, else to the yaml's folder)
                          train: images/train  (a folder, a .txt list of images, or a list of those)
                          val: images/val
                          names: [cat, dog]    (or {0: cat, 1: dog}; nc: 2 is checked against it when present)
    DIR/images/train/a.jpg
    DIR/labels/train/a.txt    one object a row: "class cx cy w h", or "class x1 y1 x2 y2 ... xk yk" (a polygon)

The labels of .../images/.../a.jpg are in .../labels/.../a.txt (the last "images" folder of the path becomes
"labels"). Coordinates are fractions 0-1 of the upright image's width and height; class ids count from 0 and become
labels 1..K here (0 is background). An image without a txt, or with an empty one, is a negative. Roboflow writes
`train: ../train/images` beside a data.yaml in DIR: a relative path that does not exist is retried from the yaml's
folder without its leading "../", as Ultralytics does.

Polygon rows (3 points or more) become masks, their box the polygon's bounds; where a dataset has any polygon, its box
rows get their rectangle as mask, so that Mask R-CNN sees a mask for every object. Rows that cannot be read (a wrong
column count, non-numbers, values outside 0-1, a class id without a name) are dropped with one warning giving their
file:line, or refused under strict. PyYAML (optional, requirements-extras.txt) reads data.yaml.
"""

import copy
import math
import warnings
from collections import Counter
from pathlib import Path

import pycocotools.mask as mask_util
import torch

from datasets.common import BoxChecker, Subset, choose_val_size, random_split
from datasets.images import image_size
from extras.formats import BoxRecords
from utils import SetupError

# what Ultralytics lists as image formats, compared in lower case
IMAGE_SUFFIXES = (".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic")
# exporters write 1.0000001 and -1e-7 for objects at the border: within this, a value is clamped to 0-1, not refused
TOLERANCE = 1e-3
SHOWN = 5  # rows named in a warning or error


def load_yaml(path):
    """A data.yaml as a dict; without PyYAML, a SetupError giving the pip command."""
    try:
        import yaml  # optional: only --dataset yolo needs it
    except ImportError:
        raise SetupError("--dataset yolo reads data.yaml with PyYAML: pip install pyyaml") from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise SetupError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path}: expected keys train, val and names, e.g. 'train: images/train'")
    return data


def find_yaml(root):
    """--data-path is the yaml itself, or the folder holding data.yaml (or its only .yaml file)."""
    root = Path(root)
    if root.is_file():
        return root
    candidates = [root / "data.yaml", root / "data.yml"]
    found = [p for p in candidates if p.is_file()] or sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    if len(found) != 1 and not (found and found[0] in candidates):
        names = ", ".join(p.name for p in found) or "none"
        raise SetupError(f"no data.yaml in {root} (yaml files there: {names}); pass --data-path DIR/data.yaml")
    return found[0]


def read_names(data, yaml_path):
    """Class names from `names:` (a list, or a dict {0: name, ...}), checked against `nc:` when present."""
    names = data.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise SetupError(f"{yaml_path}: names must be numbered 0..{len(names) - 1}, got keys {sorted(names)}")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names:
        raise SetupError(f"{yaml_path}: add the class names, e.g. 'names: [cat, dog]' (class id 0 is the first)")
    names = [str(name) for name in names]
    if "nc" in data and data["nc"] != len(names):
        raise SetupError(f"{yaml_path}: nc is {data['nc']} but names lists {len(names)} classes; fix one of them")
    return names


def split_sources(data, key, yaml_path):
    """The folders (or .txt lists) of split `key` ([] when data.yaml has none), each checked to exist."""
    values = data.get(key) or []
    folder = yaml_path.parent
    base = folder / data.get("path", "")  # an absolute `path:` stays as it is
    sources = []
    for value in values if isinstance(values, list) else [values]:
        tried = [base / str(value)]
        if str(value).startswith("../"):  # Roboflow's ../train/images, meant from the yaml's own folder
            tried.append(folder / str(value)[3:])
        found = next((p for p in tried if p.exists()), None)
        if found is None:
            raise SetupError(f"{yaml_path}: {key} {value!r} not found (tried {', '.join(map(str, tried))})")
        sources.append(found)
    return sources


def list_images(sources):
    """Sorted image files of folders (searched recursively) and .txt lists (one path a line, relative to the list)."""
    images = []
    for source in map(Path, sources):
        if source.is_dir():
            images += [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        else:
            lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
            images += [source.parent / line for line in lines if line]
    return sorted(set(images))


def label_path(image):
    """.../images/x/a.jpg -> .../labels/x/a.txt; an image outside an images/ folder has its txt beside it."""
    parts = list(Path(image).parts)
    if "images" in parts[:-1]:
        last = len(parts) - 2 - parts[-2::-1].index("images")
        parts[last] = "labels"
    return Path(*parts).with_suffix(".txt")


def parse_row(text, num_classes):
    """One row -> (class id, values 0-1) or (None, "kind of problem: details"). 4 values: cx cy w h; 6 or more, even:
    a polygon's x y pairs."""
    fields = text.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        return None, f"wrong column count: {len(fields)} (expected 5, class cx cy w h, or class and 3+ x y pairs)"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return None, "not numbers"
    cls, values = values[0], values[1:]
    if not all(math.isfinite(v) and -TOLERANCE <= v <= 1 + TOLERANCE for v in values):
        return None, "outside 0-1: YOLO coordinates are fractions of the image size"
    if not cls.is_integer() or not 0 <= cls < num_classes:
        return None, f"unknown class id: {fields[0]}, not one of 0..{num_classes - 1} (names in data.yaml)"
    return int(cls), [min(max(v, 0.0), 1.0) for v in values]


def row_box(values):
    """A row's values 0-1 -> its box [x1, y1, x2, y2] in fractions 0-1: cx cy w h, or a polygon's bounds."""
    if len(values) == 4:
        cx, cy, w, h = values
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    xs, ys = values[0::2], values[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


def pixel_box(values, width, height):
    """A row's box [x1, y1, x2, y2] in pixels, rounded to 1e-6 px: in floating point cx - w / 2 of a box on the border
    is -1e-11 rather than 0, and would count as crossing it. (float64: whole pixels written come back whole.)"""
    return [round(v * side, 6) for v, side in zip(row_box(values), (width, height) * 2)]


def read_labels(path, num_classes, bad_rows):
    """A label file -> [(class id, values 0-1, line number)], malformed rows appended to bad_rows as "file:line: why".
    A missing file is a negative."""
    if not path.is_file():
        return []
    rows = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            cls, values = parse_row(text, num_classes)
            if cls is None:
                bad_rows.append(f"{path}:{n}: {values}")
            else:
                rows.append((cls, values, n))
    return rows


def report_bad_rows(bad_rows, source, strict):
    """One warning (a SetupError under strict) counting the malformed rows by kind and naming the first."""
    if not bad_rows:
        return
    kinds = Counter(row.split(": ", 1)[1].split(":")[0] for row in bad_rows)  # "file:line: kind: details"
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    first = "; ".join(bad_rows[:SHOWN])
    if strict:
        raise SetupError(
            f"{source}: {len(bad_rows)} malformed label rows ({counts}), first: {first}. Fix them, or drop --strict"
        )
    warnings.warn(f"{source}: dropped {len(bad_rows)} malformed label rows ({counts}), first: {first}", stacklevel=3)


class YOLODataset(BoxRecords):
    """Items are (image, target) following the contract in datasets/__init__.py; image_id is the index in `images`.

    images: the sorted image paths (list_images); classes: the names, class id k being label k + 1. Image sizes come
    from the file headers (upright, as the fractions in the labels mean them).
    """

    def __init__(self, images, classes, transforms=None, strict=False, source="YOLO labels"):
        self.classes = list(classes)
        self.transforms = transforms
        self.source = source
        if not images:
            raise SetupError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        checker = BoxChecker(source, strict)
        bad_rows = []
        self.items = []  # per image: path, size, kept boxes (pixels), labels, iscrowd, polygons (pixels or None)
        for path in images:
            height, width = image_size(path)
            rows = read_labels(label_path(path), len(self.classes), bad_rows)
            boxes, polygons = [], []
            for _, values, _ in rows:
                boxes.append(pixel_box(values, width, height))
                polygons.append([v * (width, height)[i % 2] for i, v in enumerate(values)] if len(values) > 4 else None)
            raw = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            valid = (raw[:, 2] > raw[:, 0]) & (raw[:, 3] > raw[:, 1])
            kept, keep = checker(raw, valid, height, width, label_path(path).name)
            self.items.append(
                {
                    "path": path,
                    "height": height,
                    "width": width,
                    "boxes": kept[keep],
                    "labels": torch.tensor([cls + 1 for cls, _, _ in rows], dtype=torch.int64).reshape(-1)[keep],
                    "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
                    "polygons": [p for p, k in zip(polygons, keep.tolist()) if k],
                }
            )
        report_bad_rows(bad_rows, source, strict)
        checker.warn()
        # datasets.has_masks reads this: Mask R-CNN needs a mask for every object of every image
        self.has_masks = any(p is not None for item in self.items for p in item["polygons"])

    def masks(self, item):
        """uint8 [N, H, W]: each polygon filled (pycocotools, as COCO polygons), a box row its rectangle."""
        if not self.has_masks:
            return None
        height, width = item["height"], item["width"]
        if not item["polygons"]:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        polygons = [
            p if p is not None else [x1, y1, x2, y1, x2, y2, x1, y2]
            for p, (x1, y1, x2, y2) in zip(item["polygons"], item["boxes"].tolist())
        ]
        rles = mask_util.frPyObjects(polygons, height, width)
        return torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).contiguous()  # [H, W, N] -> [N, H, W]

    def size_fix(self, item):
        return f"its header said {item['width']}x{item['height']} when the dataset was read; was the file replaced?"

    def __repr__(self):
        return f"YOLODataset({self.source!r}, {len(self)} images, classes={self.classes})"


def read_data_yaml(root):
    """--data-path (a folder or the yaml) -> (yaml path, class names, {"train": sources, "val": ..., "test": ...})."""
    yaml_path = find_yaml(root)
    data = load_yaml(yaml_path)
    names = read_names(data, yaml_path)
    splits = {key: split_sources(data, key, yaml_path) for key in ("train", "val", "test")}
    if not splits["train"]:
        raise SetupError(f"{yaml_path}: no train split; add e.g. 'train: images/train'")
    return yaml_path, names, splits


def get_yolo(root, train_transforms, val_transforms, val_size=None, split_seed=0, strict=False):
    """data.yaml's train and val splits; without a val split, `val_size` train images held out, split seeded."""
    yaml_path, classes, splits = read_data_yaml(root)
    train_images = list_images(splits["train"])
    train = YOLODataset(train_images, classes, train_transforms, strict, source=f"{yaml_path} train")
    if splits["val"]:
        val = YOLODataset(list_images(splits["val"]), classes, val_transforms, strict, source=f"{yaml_path} val")
    else:
        print(f"{yaml_path} has no val split: holding out train images (add 'val: images/val' to choose them)")
        train_idx, val_idx = random_split(len(train), choose_val_size(len(train), val_size), split_seed)
        val = copy.copy(train)  # the same parsed labels, with the evaluation transforms
        val.transforms = val_transforms
        train, val = Subset(train, train_idx), Subset(val, val_idx)
    # one answer for both splits: polygons in either one, and every object of both gets a mask
    masks = any(getattr(ds, "dataset", ds).has_masks for ds in (train, val))
    for ds in (train, val):
        ds.has_masks = getattr(ds, "dataset", ds).has_masks = masks
    return train, val, classes
