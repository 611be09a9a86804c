"""Large images cut into overlapping tiles: tiled inference (TiledDetector) and training tiles (cut_coco).

A detector resizes its input (an R-CNN: shorter side to 800 px), so on a 6000 x 4000 aerial photo a 12 px car shrinks
to 2 px and is gone. Run it on tiles of about its input size instead, and the car keeps its pixels:

    model = tiling.TiledDetector(model, tile_size=800, overlap=0.2, merge="nms", full_image=True).eval()
    outputs = model([image])  # the model's format: boxes in the image's pixels, masks pasted into the whole image

predict.py enters here with --tile; train.py --test-only can evaluate TiledDetector(model) with engine.evaluate as it
is; references/convert_dataset.py --tile writes training tiles of a COCO dataset with cut_coco. Delete this file and
those calls and nothing else changes.
"""

import json
import math
import random
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from torchvision.transforms.v2.functional import to_pil_image

from datasets.coco import read_coco, segmentation_to_rle
from datasets.images import read_image
from extras.tta import merge_detections
from utils import SetupError

# A box that ends within this many pixels of a tile's cut edge is taken as cut off by it: detectors clip boxes to
# their input, but rarely to the exact pixel.
EDGE_PX = 2


def tile_starts(length, tile_size, overlap):
    """Offsets (px) of tiles `tile_size` long covering `length` px, neighbours sharing at least `overlap` of a tile."""
    if length <= tile_size:
        return [0]
    count = math.ceil((length - tile_size) / (tile_size * (1 - overlap))) + 1
    # spread evenly from 0 to length - tile_size: the last tile ends on the border and every overlap is about the same
    return [round(i * (length - tile_size) / (count - 1)) for i in range(count)]


def tile_grid(height, width, tile_size, overlap=0.2):
    """Tiles (x0, y0, x1, y1) in pixels covering a height x width image, row by row; a side shorter than the tile
    gives one tile of that side's length."""
    if not 0 <= overlap < 1:
        raise ValueError(f"tile overlap is a fraction of the tile, 0 <= overlap < 1; got {overlap}")
    xs, ys = tile_starts(width, tile_size, overlap), tile_starts(height, tile_size, overlap)
    return [(x, y, min(x + tile_size, width), min(y + tile_size, height)) for y in ys for x in xs]


def cut_edges(boxes, tile, height, width):
    """bool [N]: boxes (XYXY in the tile's pixels) reaching a tile edge that is a cut, not the image's border."""
    x0, y0, x1, y1 = tile
    x_low, y_low, x_high, y_high = boxes.unbind(1)
    return (
        ((x_low <= EDGE_PX) & (x0 > 0))
        | ((y_low <= EDGE_PX) & (y0 > 0))
        | ((x_high >= x1 - x0 - EDGE_PX) & (x1 < width))
        | ((y_high >= y1 - y0 - EDGE_PX) & (y1 < height))
    )


def covered_share(boxes, others):
    """[N, M]: the share of each box's area (XYXY) that each of `others` covers."""
    top_left = torch.maximum(boxes[:, None, :2], others[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], others[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(2)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(1)
    return intersection / area.clamp(min=1e-6)[:, None]


class TiledDetector(torch.nn.Module):
    """Run a detector (eval mode; anything taking a list of [3, H, W] images and returning torchvision's list of
    dicts) on overlapping tiles of each image, and merge the tiles' detections into one set per image.

    tile_size: the tile's side in pixels; about the model's input size (its min_size) keeps objects at their own
    scale. overlap: the share of a tile its neighbours also see (0.2); an object smaller than the overlap is whole in
    some tile. full_image: also run the model on each whole image (at its own scale) for objects larger than a tile.
    batch_size: tiles per forward pass.

    The merge: a detection touching a tile's cut edge (a fragment of an object the tile cuts) goes when a whole
    detection of its class covers at least `iou_thresh` of it; then "nms" (per-class NMS) or "vote" (score-weighted
    boxes) merges the rest as tta.merge_detections does, at most `detections_per_img` (default the model's). Masks,
    when the model has them, come pasted into the whole image and cut at 0.5: bool [N, 1, H, W] (a float mask of a
    large image costs 4 bytes a pixel per detection). Keypoints are moved to the image's pixels.
    """

    def __init__(
        self, model, tile_size, overlap=0.2, merge="nms", full_image=False, batch_size=4, iou_thresh=0.5,
        detections_per_img=None,
    ):  # fmt: skip
        super().__init__()
        if merge not in ("nms", "vote"):
            raise ValueError(f"unknown tile merge {merge!r}; choose one of: nms, vote")
        if tile_size < 32 or batch_size < 1:
            raise ValueError(f"tile_size must be >= 32 px and batch_size >= 1; got {tile_size}, {batch_size}")
        tile_grid(tile_size, tile_size, tile_size, overlap)  # checks overlap
        self.model, self.tile_size, self.overlap, self.merge = model, tile_size, overlap, merge
        self.full_image, self.batch_size, self.iou_thresh = full_image, batch_size, iou_thresh
        detector = getattr(model, "roi_heads", model)  # R-CNNs hold the limit in roi_heads; RetinaNet, FCOS, TTA not
        self.detections_per_img = detections_per_img or getattr(detector, "detections_per_img", 100)

    def _run(self, crops):
        """The model's outputs for a list of [3, h, w] crops, up to `batch_size` crops of one size at a time (the model
        pads a batch to its largest image, which changes the detections near the borders of the smaller ones)."""
        outputs, by_size = [None] * len(crops), {}
        for i, crop in enumerate(crops):
            by_size.setdefault(tuple(crop.shape), []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                for i, output in zip(batch, self.model([crops[i] for i in batch])):
                    outputs[i] = output
        return outputs

    @torch.no_grad()
    def forward(self, images):
        """images: list of float [3, H, W] -> list of {"boxes", "labels", "scores"(, "masks", "keypoints")}."""
        if self.training:
            raise RuntimeError("TiledDetector is for inference only: call .eval() on it first")
        # views: (image index, tile (x0, y0, x1, y1) or None for the whole image) and the crop the model sees
        views, crops, wholes = [], [], []
        for i, image in enumerate(images):
            height, width = image.shape[-2:]
            tiles = tile_grid(height, width, self.tile_size, self.overlap)
            views += [(i, tile) for tile in tiles]
            crops += [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in tiles]
            if self.full_image and len(tiles) > 1:  # (an image within one tile is already seen whole)
                wholes.append(i)
        views += [(i, None) for i in wholes]
        outputs = self._run(crops + [images[i] for i in wholes])

        per_image = [[] for _ in images]
        for index, ((i, tile), output) in enumerate(zip(views, outputs)):
            height, width = images[i].shape[-2:]
            found = {key: output[key] for key in ("boxes", "labels", "scores", "keypoints", "keypoints_scores")
                     if key in output}  # fmt: skip
            fragment = torch.zeros(len(found["boxes"]), dtype=torch.bool, device=found["boxes"].device)
            if tile is not None:
                fragment = cut_edges(found["boxes"], tile, height, width)
                shift = found["boxes"].new_tensor(tile[:2])
                found["boxes"] = found["boxes"] + shift.repeat(2)
                if "keypoints" in found:  # [N, K, 3] as (x, y, visible)
                    found["keypoints"] = torch.cat(
                        [found["keypoints"][..., :2] + shift, found["keypoints"][..., 2:]], 2
                    )
            # where each detection came from, to paste its mask after the merge
            found["view"] = torch.full_like(found["labels"], index)
            found["row"] = torch.arange(len(found["labels"]), device=found["labels"].device)
            found["fragment"] = fragment
            per_image[i].append(found)
        return [self._merge(found, image, views, outputs) for found, image in zip(per_image, images)]

    def _merge(self, found, image, views, outputs):
        """One image's detections from its tiles -> the model's output format for the whole image."""
        merged = {key: torch.cat([f[key] for f in found]) for key in found[0]}
        fragment = merged.pop("fragment")
        if fragment.any() and not fragment.all():
            share = covered_share(merged["boxes"][fragment], merged["boxes"][~fragment])
            same_class = merged["labels"][fragment, None] == merged["labels"][None, ~fragment]
            keep = torch.ones_like(fragment)
            keep[fragment] = ~((share >= self.iou_thresh) & same_class).any(1)
            merged = {key: value[keep] for key, value in merged.items()}
        output = merge_detections([merged], self.merge, self.iou_thresh, self.detections_per_img)
        view, row = output.pop("view").tolist(), output.pop("row").tolist()
        if "masks" in outputs[0]:
            height, width = image.shape[-2:]
            masks = torch.zeros((len(view), 1, height, width), dtype=torch.bool, device=image.device)
            for k, (v, r) in enumerate(zip(view, row)):
                x0, y0 = views[v][1][:2] if views[v][1] is not None else (0, 0)
                mask = outputs[v]["masks"][r]  # [1, h, w]: probabilities, or bool when already cut
                masks[k, :, y0 : y0 + mask.shape[-2], x0 : x0 + mask.shape[-1]] = mask > 0.5
            output["masks"] = masks
        return output


# ------------------------------------------------------------------------------------------------ training tiles
def clip_annotation(ann, box, mask, tile, min_visible):
    """One annotation on one tile -> the tile's annotation (bbox, area, segmentation in tile pixels), or None when
    under `min_visible` of its box area is on the tile. box: XYXY in image pixels; mask: uint8 [H, W] or None."""
    x0, y0, x1, y1 = tile
    left, top, right, bottom = max(box[0], x0), max(box[1], y0), min(box[2], x1), min(box[3], y1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    if right <= left or bottom <= top or (right - left) * (bottom - top) < min_visible * area:
        return None
    clipped = {k: v for k, v in ann.items() if k not in ("id", "image_id", "segmentation", "keypoints")}
    clipped["bbox"] = [round(v, 6) for v in (left - x0, top - y0, right - left, bottom - top)]
    clipped["area"] = round((right - left) * (bottom - top), 6)
    if mask is not None:
        crop = np.asfortranarray(mask[y0:y1, x0:x1])
        if not crop.any():  # the box reaches the tile, the object does not
            return None
        rle = mask_util.encode(crop)
        clipped["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        clipped["area"] = int(crop.sum())
    if ann.get("keypoints"):  # keypoints off the tile become unlabelled (0, 0, 0)
        points = np.array(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        inside = (points[:, 2] > 0) & (points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0)
        inside &= points[:, 1] < y1
        points[:, :2] -= (x0, y0)
        points[~inside] = 0
        clipped["keypoints"], clipped["num_keypoints"] = points.flatten().tolist(), int(inside.sum())
    return clipped


def cut_coco(ann_file, images, out, tile_size, overlap=0.2, min_visible=0.3, max_empty_share=0.2, seed=0):
    """Cut every image of a COCO dataset into tiles: tile images in the folder OUT without .json (tiles/train.json ->
    tiles/train/<stem>_<x0>_<y0>.<ext>), their annotations in OUT, a COCO json with the input's categories.

    A box keeps its part on a tile when that is at least `min_visible` of its area; segmentations are cut to the tile
    (written as RLE). Tiles without objects are negatives: at most `max_empty_share` of the tiles written are empty,
    chosen at random with `seed`. Returns {"tiles", "empty_tiles", "empty_dropped", "annotations", "remnants"} counts.
    """
    categories, image_entries, anns_per_image = read_coco(ann_file)
    folder = Path(out).with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    tiles, empty, names, remnants = [], [], {}, 0  # tiles: (image entry, tile, annotations); empty: (image, tile)
    for im in image_entries:
        anns, height, width = anns_per_image[im["id"]], im["height"], im["width"]
        boxes = [(x, y, x + w, y + h) for x, y, w, h in (ann["bbox"] for ann in anns)]
        masks = [
            mask_util.decode(segmentation_to_rle(ann["segmentation"], box, height, width))
            if ann.get("segmentation") else None
            for ann, box in zip(anns, boxes)
        ]  # fmt: skip
        for tile in tile_grid(height, width, tile_size, overlap):
            kept = [clip_annotation(a, b, m, tile, min_visible) for a, b, m in zip(anns, boxes, masks)]
            touching = sum(b[0] < tile[2] and b[2] > tile[0] and b[1] < tile[3] and b[3] > tile[1] for b in boxes)
            kept = [ann for ann in kept if ann is not None]
            remnants += touching - len(kept)
            (tiles if any(not ann.get("iscrowd") for ann in kept) else empty).append((im, tile, kept))
    # at most max_empty_share of all tiles empty: E / (K + E) <= share  <=>  E <= share * K / (1 - share)
    allowed = len(empty) if max_empty_share >= 1 else math.floor(max_empty_share * len(tiles) / (1 - max_empty_share))
    chosen = random.Random(seed).sample(range(len(empty)), min(allowed, len(empty)))
    order = {id(im): n for n, im in enumerate(image_entries)}
    written = sorted(tiles + [empty[k] for k in chosen], key=lambda t: (order[id(t[0])], t[1][1], t[1][0]))

    out_images, out_anns, source, image = [], [], None, None
    for image_id, (im, tile, kept) in enumerate(written, start=1):
        if source is not im:  # tiles come grouped by image: each is decoded once
            source, image = im, read_image(Path(images) / im["file_name"], "RGB")
            if image.shape[-2:] != (im["height"], im["width"]):
                raise SetupError(f"{im['file_name']} is {image.shape[2]}x{image.shape[1]} px but {ann_file} says "
                                 f"{im['width']}x{im['height']}; fix its width and height in the json")  # fmt: skip
        x0, y0, x1, y1 = tile
        path = Path(im["file_name"])
        name = f"{path.stem}_{x0}_{y0}{path.suffix.lower() or '.png'}"
        if names.setdefault(name, im["file_name"]) != im["file_name"]:
            raise SetupError(f"{names[name]} and {im['file_name']} would both write tile {name}; rename one")
        jpeg = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}  # PIL's default 75 blurs edges
        to_pil_image(image[:, y0:y1, x0:x1]).save(folder / name, **jpeg)
        out_images.append({"id": image_id, "file_name": name, "width": x1 - x0, "height": y1 - y0})
        out_anns += [{"id": len(out_anns) + k, "image_id": image_id, **ann} for k, ann in enumerate(kept, start=1)]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"images": out_images, "annotations": out_anns, "categories": categories}, f)
    return {"tiles": len(written), "empty_tiles": len(chosen), "empty_dropped": len(empty) - len(chosen),
            "annotations": len(out_anns), "remnants": remnants}  # fmt: skip
