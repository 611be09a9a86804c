"""mmdetection's "middle format": one list of per-image dicts, what mmdetection's CustomDataset reads.

    [{"filename": "a.jpg", "width": 640, "height": 480,
      "ann": {"bboxes": [[x1, y1, x2, y2], ...],   # (n, 4) XYXY pixels
              "labels": [0, ...],                  # (n,) 0-based class indices, as mmdetection numbers them
              "bboxes_ignore": [[...], ...],       # optional (k, 4): regions neither rewarded nor penalised
              "labels_ignore": [...]}}, ...]       # optional (k,); without it a region ignores every class
read from .json, or from a .pkl (mmcv.dump's output, holding numpy arrays). Labels become 1..K (mmdetection's
label + 1, since 0 is background here) and ignored boxes become iscrowd=1 instances.

A pickle can run any code while it loads, so .pkl files go through an unpickler that builds numpy arrays and plain
containers only, and refuses everything else.
"""

import pickle
from pathlib import Path

import numpy as np
import torch

from datasets.common import BoxChecker, Subset, choose_val_size, load_json, random_split, read_classes
from extras.formats import BoxRecords
from utils import SetupError

# The only globals a .pkl of arrays, lists and dicts needs. numpy rebuilds arrays with _reconstruct (pickle
# protocols 0-4) or _frombuffer (protocol 5) and scalars such as np.int64 widths with scalar; numpy 2 moved
# numpy.core to numpy._core, and files written under either must load. Protocol 2 (mmcv's default) stores bytes
# through _codecs.encode (bytes() when empty) and names the builtins module __builtin__.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
} | {(module, name) for module in ("builtins", "__builtin__") for name in ("bytes", "bytearray", "set", "frozenset")}


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


class ArraysOnlyUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only SAFE_GLOBALS: a .pkl asking for anything else (os.system, a class of
    yours) is refused before that thing is imported, let alone called."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise SetupError(
                f"{self.path} asks to load {module}.{name}: a .pkl can run any code when loaded, so only numpy "
                f"arrays and plain lists and dicts are read from it.\n"
                f"  Save the annotations as .json instead (json.dump, after .tolist() on the arrays)."
            )
        return super().find_class(module, name)


def load_middle_format(path):
    """The list of per-image dicts in a .json or .pkl file."""
    path = Path(path)
    if path.suffix == ".json":
        data = load_json(path)
    elif path.suffix in (".pkl", ".pickle"):
        try:
            with open(path, "rb") as f:
                data = ArraysOnlyUnpickler(f, path).load()
        except FileNotFoundError:
            raise SetupError(f"annotation file {path} not found; check the path you passed") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise SetupError(f"{path} is not a readable pickle ({e}); re-export it, preferably as .json") from None
    else:
        raise SetupError(f"{path}: expected a .json or .pkl file in mmdetection's middle format")
    if not isinstance(data, list):
        raise SetupError(f"{path}: expected a list of per-image dicts (mmdetection's middle format)")
    return data


class CustomDataset(BoxRecords):
    """Items are (image, target) following the contract in datasets/__init__.py; image_id is the index in the list.

    `classes` are the K class names, classes[k] naming mmdetection's label k (our label k + 1).
    """

    def __init__(self, ann_file, img_prefix, classes, transforms=None, strict=False):
        self.ann_file = Path(ann_file)
        self.img_prefix = Path(img_prefix)
        self.classes = list(classes)
        self.transforms = transforms
        checker = BoxChecker(self.ann_file, strict)
        self.items = []  # per image: path, size, and its kept boxes, labels and iscrowd
        for index, entry in enumerate(load_middle_format(self.ann_file)):
            where = f"{self.ann_file}, entry {index}"
            try:
                filename, width, height = entry["filename"], int(entry["width"]), int(entry["height"])
            except (KeyError, TypeError) as e:
                raise SetupError(f"{where}: every entry needs filename, width and height ({e!r})") from None
            # Paths come from the annotation file: keep them inside img_prefix, whoever wrote that file
            if Path(filename).is_absolute() or ".." in Path(filename).parts:
                raise SetupError(f"{where}: filename {filename!r} must be a relative path inside {self.img_prefix}")
            ann = entry.get("ann", {})  # test-set files have no "ann"
            boxes, labels = boxes_and_labels(ann, "bboxes", "labels", where)
            if "labels_ignore" in ann:
                ignore_boxes, ignore_labels = boxes_and_labels(ann, "bboxes_ignore", "labels_ignore", where)
            else:  # optional, as in mmdetection: an ignored region then ignores detections of every class
                regions = ann.get("bboxes_ignore", [])
                ignored = {"bboxes_ignore": regions, "labels_ignore": [0] * len(regions)}
                ignore_boxes, _ = boxes_and_labels(ignored, "bboxes_ignore", "labels_ignore", where)
                ignore_labels = np.tile(np.arange(len(self.classes)), len(ignore_boxes))
                ignore_boxes = np.repeat(ignore_boxes, len(self.classes), axis=0)
            iscrowd = torch.tensor([0] * len(boxes) + [1] * len(ignore_boxes), dtype=torch.int64)
            boxes = torch.from_numpy(np.concatenate([boxes, ignore_boxes]))
            labels = np.concatenate([labels, ignore_labels])
            if ((labels < 0) | (labels >= len(self.classes))).any():
                raise SetupError(
                    f"{where}: labels must be 0..{len(self.classes) - 1} (0-based, one per class name), "
                    f"found {sorted(set(labels.tolist()))}; pass every class name in classes"
                )
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, keep = checker(boxes, valid, height, width, filename)
            self.items.append(
                {
                    "path": self.img_prefix / filename,
                    "height": height,
                    "width": width,
                    "boxes": boxes[keep],
                    "labels": torch.from_numpy(labels + 1)[keep],
                    "iscrowd": iscrowd[keep],
                }
            )
        missing = [str(item["path"]) for item in self.items if not item["path"].is_file()]
        if missing:
            raise SetupError(
                f"{len(missing)} images listed in {self.ann_file} are missing, first: {missing[0]}.\n"
                f"  img_prefix must be the folder the filenames are relative to."
            )
        checker.warn()

    def size_fix(self, item):
        return f"{self.ann_file} says {item['width']}x{item['height']}; fix that entry's width and height"

    def __repr__(self):
        return f"CustomDataset(ann_file={str(self.ann_file)!r}, {len(self)} images, {len(self.classes)} classes)"


def get_custom(root, train_transforms, val_transforms, train_ann=None, val_ann=None, classes=None, val_size=None,
               split_seed=0, strict=False):  # fmt: skip
    """mmdetection's list-of-dicts (.json / .pkl) with images under ROOT; one file is split seeded."""
    if not train_ann or not classes:
        raise SetupError("--dataset custom needs --ann-file FILE (.json or .pkl) and --classes a,b,c (or classes.txt)")
    classes = read_classes(classes)
    train = CustomDataset(train_ann, root, classes, train_transforms, strict)
    if val_ann:
        return train, CustomDataset(val_ann, root, classes, val_transforms, strict), classes
    train_idx, val_idx = random_split(len(train), choose_val_size(len(train), val_size), split_seed)
    val = CustomDataset(train_ann, root, classes, val_transforms, strict)
    return Subset(train, train_idx), Subset(val, val_idx), classes
