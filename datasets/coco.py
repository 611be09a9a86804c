"""COCO-format detection and instance segmentation: the json of MS-COCO, and what most labelling tools export.

Layout:
    img_folder/<file_name>   file_name as written in the json; sub-folders are fine
    ann_file                 {"images":      [{"id", "file_name", "width", "height"}, ...],
                              "annotations": [{"image_id", "category_id", "bbox": [x, y, w, h], "iscrowd", "area",
                                               "segmentation": polygons or RLE, "keypoints": [x, y, v, ...]}, ...],
                              "categories":  [{"id", "name"}, ...]}
Category ids may have gaps (COCO's 80 classes use ids 1..90) or include 0 (not background in many exports): the
sorted ids become the contiguous labels 1..K the models need, and `label_to_category_id` maps them back.
"""

from collections import Counter
from pathlib import Path

import pycocotools.mask as mask_util
import torch
from torchvision import tv_tensors

from utils import SetupError

from .common import BoxChecker, load_json
from .images import read_image

REQUIRED_FIELDS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def segmentation_to_rle(segmentation, box, height, width):
    """One annotation's segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE."""
    if isinstance(segmentation, dict):
        if isinstance(segmentation["counts"], list):  # uncompressed RLE: how COCO stores iscrowd regions
            return mask_util.frPyObjects(segmentation, height, width)
        return segmentation
    # A part needs 3 points to enclose pixels (and frPyObjects would read a 2-point part as a box). Without any
    # polygon (a box-only annotation in a dataset with masks) the box is the best mask there is.
    x1, y1, x2, y2 = box
    polygons = [p for p in segmentation or [] if len(p) >= 6] or [[x1, y1, x2, y1, x2, y2, x1, y2]]
    return mask_util.merge(mask_util.frPyObjects(polygons, height, width))


def read_coco(ann_file):
    """-> (categories sorted by id, images sorted by id, {image id: [its annotations]}), required fields checked."""
    data = load_json(ann_file)
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise SetupError(f"{ann_file} is not a COCO file: expected an object with images, annotations, categories")
    annotations = data.get("annotations", [])  # absent in COCO's image_info_test files
    for kind, fields in REQUIRED_FIELDS.items():
        for i, entry in enumerate(data.get(kind, [])):
            missing = [field for field in fields if field not in entry]
            if missing:
                raise SetupError(f"{ann_file}: {kind}[{i}] has no {', '.join(missing)}; add {', '.join(fields)}")
    if not all(isinstance(im["id"], int) for im in data["images"]):
        raise SetupError(f"{ann_file}: image ids must be integers (predictions are matched to them)")
    images = sorted(data["images"], key=lambda im: im["id"])
    anns_per_image = {im["id"]: [] for im in images}
    if len(anns_per_image) != len(images):
        raise SetupError(f"{ann_file}: two images share an id; image ids must be unique")
    category_ids = {c["id"] for c in data["categories"]}
    for ann in annotations:
        if ann["image_id"] not in anns_per_image or ann["category_id"] not in category_ids:
            raise SetupError(
                f"{ann_file}: annotation {ann.get('id')} refers to image id {ann['image_id']} and category id "
                f"{ann['category_id']}, one of which is not listed in images / categories"
            )
        anns_per_image[ann["image_id"]].append(ann)
    return sorted(data["categories"], key=lambda c: c["id"]), images, anns_per_image


class CocoDetection(torch.utils.data.Dataset):
    """Items are (image, target) following the contract in datasets/__init__.py; image_id is the COCO image id.
    masks=True adds `masks` decoded from the polygons / RLEs; person-keypoint files add `keypoints` [N, J, 3] (a plain
    tensor). iscrowd regions stay with iscrowd=1: training drops them, evaluation ignores them. keep_empty=False drops
    images without any (valid) box; by default they stay, as negatives."""

    def __init__(self, img_folder, ann_file, transforms=None, masks=False, keep_empty=True, strict=False):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.masks = masks
        categories, images, anns_per_image = read_coco(self.ann_file)
        self.categories = categories  # as in the file, sorted by id: labels 1..K follow that order
        self.classes = [c["name"] for c in categories]
        self.label_to_category_id = {k: c["id"] for k, c in enumerate(categories, start=1)}
        self.category_id_to_label = {cid: k for k, cid in self.label_to_category_id.items()}
        annotations = [ann for anns in anns_per_image.values() for ann in anns]
        # objects (not crowd regions) per category id: what extras/tool_exports.py and the no-objects warning read
        self.objects_per_category = Counter(a["category_id"] for a in annotations if not a.get("iscrowd", 0))
        self.has_masks = any(ann.get("segmentation") for ann in annotations)  # polygons or RLE anywhere in the file
        if masks and not self.has_masks:
            raise SetupError(f"{self.ann_file} has no segmentation: use a box-only model, or masks=False")
        # J keypoints per instance, 0 when the file has none (COCO's person_keypoints files have 17)
        self.num_keypoints = max((len(ann.get("keypoints") or []) // 3 for ann in annotations), default=0)

        checker = BoxChecker(self.ann_file, strict)
        self.images = []  # per image: where it is, its size, its kept annotations and their clipped XYXY boxes
        for im in images:
            anns = anns_per_image[im["id"]]
            xywh = torch.tensor([ann["bbox"] for ann in anns], dtype=torch.float32).reshape(-1, 4)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
            valid = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
            boxes, keep = checker(boxes, valid, im["height"], im["width"], im["file_name"])
            if keep.any() or keep_empty:
                record = {k: im[k] for k in ("id", "height", "width")}
                record["path"] = self.img_folder / im["file_name"]
                record["anns"] = [ann for ann, k in zip(anns, keep.tolist()) if k]
                record["boxes"] = boxes[keep]
                self.images.append(record)
        missing = [str(r["path"]) for r in self.images if not r["path"].is_file()]
        if missing:
            raise SetupError(
                f"{len(missing)} images listed in {self.ann_file} are missing, first: {missing[0]}.\n"
                f"  The image folder must be the one file_name is relative to."
            )
        checker.warn()

    def __len__(self):
        return len(self.images)

    def get_height_and_width(self, idx):
        record = self.images[idx]
        return record["height"], record["width"]

    def _masks(self, anns, boxes, height, width):
        """uint8 [N, H, W] masks, decoded from the annotations' polygons / RLEs."""
        if not anns:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        rles = [segmentation_to_rle(a.get("segmentation"), b, height, width) for a, b in zip(anns, boxes.tolist())]
        # decode() sizes its output from the first RLE and trusts the others to match: check them all first
        wrong = [a.get("id") for a, rle in zip(anns, rles) if list(rle["size"]) != [height, width]]
        if wrong:
            raise SetupError(
                f"{self.ann_file}: the RLE of annotations {wrong} is not {height}x{width} like their image "
                f"{anns[0]['image_id']}; fix their segmentation size"
            )
        return torch.from_numpy(mask_util.decode(rles)).permute(2, 0, 1).contiguous()  # decode gives [H, W, N]

    def __getitem__(self, idx):
        record = self.images[idx]
        height, width, anns = record["height"], record["width"], record["anns"]
        image = read_image(record["path"], "RGB")  # uint8 [3, H, W]
        if image.shape[-2:] != (height, width):
            raise SetupError(
                f"{record['path']} is {image.shape[2]}x{image.shape[1]} pixels but {self.ann_file} says "
                f"{width}x{height}; fix that image's width and height in the json"
            )
        boxes = record["boxes"].clone()  # a copy: a transform must never edit the stored boxes
        box_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        # COCO's "area" is the segment area, which its small/medium/large ranges use; some exports leave it 0
        json_area = torch.tensor([float(a.get("area") or 0) for a in anns], dtype=torch.float32)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.category_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": record["id"],
            "area": torch.where(json_area > 0, json_area, box_area),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(self._masks(anns, boxes, height, width))
        if self.num_keypoints:
            no_keypoints = [0.0] * 3 * self.num_keypoints
            keypoints = [a.get("keypoints") or no_keypoints for a in anns]
            target["keypoints"] = torch.tensor(keypoints, dtype=torch.float32).reshape(-1, self.num_keypoints, 3)
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self):
        return f"CocoDetection(ann_file={str(self.ann_file)!r}, {len(self)} images, {len(self.classes)} classes)"
