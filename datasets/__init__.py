"""Datasets, and the contract every one of them follows so any model, transform and the evaluator work on it.

The contract. `dataset[i]` returns `(image, target)`:
    image   tv_tensors.Image, uint8 [3, H, W] (the transforms turn it into float in [0, 1])
    target  dict with
        boxes     tv_tensors.BoundingBoxes float32 [N, 4], XYXY in pixels of this image, x2 > x1, y2 > y1
        labels    int64 [N], 1..K for the K classes; 0 is reserved for background and never appears
        image_id  int, unique within the dataset and stable across runs (predictions are matched to it)
        area      float32 [N], object area in pixels (the mask area where there is one); COCO's size ranges use it
        iscrowd   int64 [N], 1 = a crowd or ignored region: scored as "don't care" in evaluation, not trained on
        masks     (instance segmentation) tv_tensors.Mask uint8 [N, H, W], 1 inside the object
        keypoints (keypoint detection) float32 [N, J, 3], (x, y, visibility)
`dataset.get_height_and_width(i)` returns (H, W) without decoding the image: batches are grouped by aspect ratio.

A builder in DATASETS returns (train_dataset, val_dataset, class_names), class_names[k - 1] naming label k.
To train on your own data, write a Dataset class that returns the contract above and add a builder here.
"""

from pathlib import Path

from utils import SetupError

from .coco import CocoDetection
from .common import Subset, choose_val_size, random_split
from .pennfudan import CLASSES as PENNFUDAN_CLASSES
from .pennfudan import PennFudanDataset


def get_pennfudan(root, train_transforms, val_transforms, val_size=None, split_seed=0, download=True):
    """Penn-Fudan with the tutorial's split: `val_size` random images (50) for validation, the rest for training."""
    root = root or Path("data", "PennFudanPed")
    train_full = PennFudanDataset(root, transforms=train_transforms, download=download)
    val_full = PennFudanDataset(root, transforms=val_transforms)
    train_idx, val_idx = random_split(len(train_full), choose_val_size(len(train_full), val_size), split_seed)
    return Subset(train_full, train_idx), Subset(val_full, val_idx), list(PENNFUDAN_CLASSES)


def get_coco(root, train_transforms, val_transforms, train_ann=None, val_ann=None, train_images=None,
             val_images=None, masks=False, keep_empty=True, strict=False):  # fmt: skip
    """COCO json: ROOT/{train,val}2017/ and ROOT/annotations/instances_{train,val}2017.json unless given. strict (all
    builders but Penn-Fudan's): refuse zero-size or outside boxes instead of dropping them with a warning."""
    root, options = Path(root or "."), dict(masks=masks, strict=strict)  # no root: the four paths say it all
    train_ann = train_ann or root / "annotations" / "instances_train2017.json"
    val_ann = val_ann or root / "annotations" / "instances_val2017.json"
    train_images, val_images = train_images or root / "train2017", val_images or root / "val2017"
    train = CocoDetection(train_images, train_ann, train_transforms, keep_empty=keep_empty, **options)
    val = CocoDetection(val_images, val_ann, val_transforms, **options)  # every image, also those without objects
    if train.categories != val.categories:
        raise SetupError(f"train and val annotation files list different categories: {train.classes} vs {val.classes}")
    from extras import tool_exports  # placeholder categories that tools write; classes without objects

    tool_exports.check_categories(train, val)
    return train, val, train.classes


def get_voc(root, train_transforms, val_transforms, **options):
    from extras.formats import voc  # Pascal VOC XML: an extra, imported when --dataset voc asks for it

    return voc.get_voc(root, train_transforms, val_transforms, **options)


def get_custom(root, train_transforms, val_transforms, **options):
    from extras.formats import custom  # mmdetection's list of dicts, an extra

    return custom.get_custom(root, train_transforms, val_transforms, **options)


def get_yolo(root, train_transforms, val_transforms, **options):
    from extras.formats import yolo  # YOLO txt labels + data.yaml (Ultralytics, Roboflow), an extra

    return yolo.get_yolo(root, train_transforms, val_transforms, **options)


def has_masks(dataset):
    """Whether targets carry masks: the dataset says so (COCO json), or its first sample shows it."""
    known = getattr(dataset, "has_masks", None)
    if known is not None:
        return known
    targets = (dataset[i][1] for i in range(min(len(dataset), 5)))
    return "masks" in next((t for t in targets if t is not None), {})  # None: unreadable, --skip-bad-images


def check_for_model(dataset, model, batch_size, processes=1):
    """Refuse a training set that `model` cannot train on, before the model is built."""
    if model.startswith("maskrcnn") and not has_masks(dataset):
        raise SetupError(
            f"{model} needs instance masks and this dataset has boxes only; pick a box model, e.g. --model "
            f"fasterrcnn_resnet50_fpn"
        )
    if model.startswith("keypointrcnn") and not getattr(dataset, "num_keypoints", 0):
        raise SetupError(f"{model} needs keypoints: pass a person_keypoints json (--train-ann/--val-ann)")
    if len(dataset) < batch_size * processes:
        raise SetupError(
            f"{len(dataset)} training images cannot fill one batch of {batch_size} x {processes} processes; "
            f"lower --batch-size or --val-size"
        )


# --dataset name -> builder(root, train_transforms, val_transforms, **options)
DATASETS = {
    "pennfudan": get_pennfudan,
    "coco": get_coco,
    "voc": get_voc,
    "custom": get_custom,
    "yolo": get_yolo,
}


def get_dataset(name, root, train_transforms, val_transforms, **options):
    """DATASETS[name]; `root` None: Penn-Fudan's default folder, or COCO files given one by one."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    coco_files = all(options.get(k) for k in ("train_ann", "val_ann", "train_images", "val_images"))
    if root is None and name != "pennfudan" and not (name == "coco" and coco_files):
        coco = "; or all of --train-ann, --val-ann, --train-images, --val-images" if name == "coco" else ""
        raise SetupError(f"--dataset {name} needs --data-path DIR (the dataset root / image folder){coco}")
    return DATASETS[name](root, train_transforms, val_transforms, **options)
