"""How well do a detector's anchors fit your boxes? Reads the ground truth, reports coverage, suggests a better grid.

    python references/anchor_helper.py --dataset voc --data-path ../shared/data/BCCD --classes RBC,WBC,Platelets \\
        --model fasterrcnn_resnet50_fpn
    python references/anchor_helper.py --data-path ../shared/data/PennFudanPed --model fasterrcnn_mobilenet_v3_large_fpn
    python references/anchor_helper.py ... --anchor-sizes 32,64,128,256,512 --anchor-ratios 0.5,1,2   # judge a grid
    python references/anchor_helper.py ... --num-sizes 5 --num-ratios 4                              # suggest 5 x 4

Takes every train.py flag, so the dataset is built as train.py builds it. Boxes are read from the annotation records
(no image is decoded; Penn-Fudan decodes its masks) and scaled as the model's own resize scales them: shorter side to
min_size unless the longer would pass max_size. An anchor of size s and ratio r (h/w, torchvision's convention) is
s/sqrt(r) wide and s*sqrt(r) high; a box is "covered" when some anchor shape, centred on it, overlaps it with IoU >=
0.5. That ignores the anchors' stride and offset: it says whether a shape fits, not whether one sits at the right place.
The RPN calls an anchor positive at IoU >= 0.7 (and otherwise keeps each box's best anchor), so both shares are shown.

The suggestion keeps the form torchvision's AnchorGenerator takes: sizes x ratios, the same ratios on every feature
level; FPN models of R-CNN (resnet50_fpn) take one size per level. Sizes and ratios are found by k-means with distance
1 - IoU along each axis, and compared with scalings of the current grid. No random draws: every run prints the same.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import masks_to_boxes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where train.py lives
import common  # noqa: E402

import datasets  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from datasets.images import read_image  # noqa: E402
from extras import skip_bad_images  # noqa: E402
from extras.formats import BoxRecords  # noqa: E402

COCO_RANGES = {"small (<32^2)": (0, 32**2), "medium (<96^2)": (32**2, 96**2), "large": (96**2, math.inf)}  # px^2
# Factors on the current sizes, tried as grids: torchvision's sizes double from one to the next, so factors within
# one octave (x0.7-x1.4) try every placement of the grid between the boxes' sizes
SCALINGS = (0.6, 0.7, 0.8, 0.9, 1.1, 1.25, 1.4)
PERCENTILES = (5, 25, 50, 75, 95)


def int_list(text):  # "32,64,128" -> [32, 64, 128]
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def get_args_parser():
    parser = common.parser_with_train_flags(__doc__)
    # fmt: off
    anchors = parser.add_argument_group("anchors")
    anchors.add_argument("--anchor-sizes", default=None, type=int_list,
                         help="grid to judge: sizes in px at the model's input scale, e.g. 32,64,128,256,512 "
                              "(default: the model's)")
    anchors.add_argument("--anchor-ratios", default=None, type=float_list,
                         help="grid to judge: aspect ratios h/w, e.g. 0.5,1,2 (default: the model's)")
    anchors.add_argument("--num-sizes", default=None, type=int,
                         help="sizes in the suggestion (default: as many as now; FPN R-CNN: one per level, 5)")
    anchors.add_argument("--num-ratios", default=None, type=int,
                         help="ratios in the suggestion (default: as many as now, 3)")
    anchors.add_argument("--split", default="train", choices=("train", "val"),
                         help="read the boxes of this set (default train)")
    # fmt: on
    return parser


def dataset_boxes(dataset):
    """Per image (boxes float [N, 4] XYXY px, labels int64 [N], height, width), crowd/ignored boxes left out.

    Reads the records the dataset classes keep, so no image is decoded (Penn-Fudan: only its masks).
    """
    if isinstance(dataset, skip_bad_images.SkipBadImages):
        return dataset_boxes(dataset.dataset)
    if isinstance(dataset, torch.utils.data.Subset):  # torch's and datasets.Subset
        everything = dataset_boxes(dataset.dataset)
        return [everything[i] for i in dataset.indices]
    if isinstance(dataset, BoxRecords):  # formats: VOCDetection, CustomDataset
        items = dataset.items
        return [(r["boxes"][r["iscrowd"] == 0], r["labels"][r["iscrowd"] == 0], r["height"], r["width"]) for r in items]
    if isinstance(dataset, datasets.CocoDetection):
        out = []
        for r in dataset.images:
            keep = torch.tensor([not a.get("iscrowd", 0) for a in r["anns"]], dtype=torch.bool)
            labels = torch.tensor([dataset.category_id_to_label[a["category_id"]] for a in r["anns"]])
            out.append((r["boxes"][keep], labels[keep].long(), r["height"], r["width"]))
        return out
    if isinstance(dataset, datasets.PennFudanDataset):
        out = []
        for path in dataset.masks:
            id_map = read_image(path)[0]  # uint8 [H, W]: 0 = background, k = pedestrian k
            ids = id_map.unique()
            ids = ids[ids != 0]
            # +1: the pixel-extent box, as PennFudanDataset makes it
            boxes = masks_to_boxes(id_map[None] == ids[:, None, None]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            out.append((boxes, torch.ones(len(ids), dtype=torch.int64), *id_map.shape))
        return out
    print(f"note: {type(dataset).__name__} is not a class this script knows: decoding every sample to read its boxes")
    out = []
    for i in range(len(dataset)):
        image, target = dataset[i]  # after the training transforms: random ones (lsj) change the boxes
        keep = target.get("iscrowd", torch.zeros(len(target["boxes"]))) == 0
        out.append((target["boxes"][keep], target["labels"][keep], *image.shape[-2:]))
    return out


def resized_size(height, width, min_size, max_size):
    """(H, W) after GeneralizedRCNNTransform: scale the shorter side to min_size unless the longer passes max_size."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)  # interpolate(scale_factor=...) rounds down


def box_shapes(records, min_size, max_size):
    """-> (w, h) float64 [N, 2] at the model's input scale, labels [N], original areas px^2 [N], scales [N]."""
    shapes, labels, areas, scales = [], [], [], []
    for boxes, box_labels, height, width in records:
        new_h, new_w = resized_size(height, width, min_size, max_size)
        wh = (boxes[:, 2:] - boxes[:, :2]).double()
        shapes.append(wh * torch.tensor([new_w / width, new_h / height], dtype=torch.float64))  # resize_boxes' ratios
        labels.append(box_labels)
        areas.append(wh.prod(dim=1))
        scales.append(torch.full((len(boxes),), new_h / height, dtype=torch.float64))
    return torch.cat(shapes), torch.cat(labels), torch.cat(areas), torch.cat(scales)


def anchor_shapes(sizes, ratios):
    """(w, h) float64 [len(sizes) * len(ratios), 2] of the anchors torchvision makes (rounded to whole pixels)."""
    base = AnchorGenerator().generate_anchors(list(sizes), list(ratios), dtype=torch.float64)  # [A, 4] around 0
    return base[:, 2:] - base[:, :2]


def best_iou(shapes, anchors):
    """Best IoU of each box [N, 2] with any anchor [A, 2], both centred at the same point -> [N]."""
    inter = torch.minimum(shapes[:, None], anchors[None]).prod(dim=2)  # [N, A]
    union = shapes.prod(dim=1)[:, None] + anchors.prod(dim=1)[None] - inter
    return (inter / union).max(dim=1).values


def kmeans_1d(values, k, iterations=100):
    """k centres of positive values: Lloyd's algorithm on log(values), started at evenly spaced quantiles.

    Two boxes of equal area (ratios a, b) or of equal ratio (sizes a, b) lose IoU as |log a - log b| grows, so the
    nearest centre in log space is the one of highest IoU: YOLO's k-means with 1 - IoU, along one axis.
    """
    x = values.double().log()
    centres = torch.quantile(x, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iterations):
        nearest = (x[:, None] - centres[None]).abs().argmin(dim=1)
        new = torch.stack([x[nearest == j].mean() if (nearest == j).any() else centres[j] for j in range(k)])
        if torch.equal(new, centres):
            break
        centres = new
    return centres.exp().sort().values.tolist()


def increasing(values, step):
    """Sorted values rounded to `step`, nudged apart so none repeats (a repeated anchor is a wasted one)."""
    out = []
    for v in sorted(values):
        v = max(round(round(v / step) * step, 2), step)
        out.append(v if not out or v > out[-1] else round(out[-1] + step, 2))
    return [int(v) if step == 1 else v for v in out]


def candidate_grids(shapes, current, num_sizes, num_ratios):
    """{name: (sizes, ratios)}: the current grid, k-means sizes and ratios, their mixes with the current grid and
    scalings of it, the mixes only where the current grid has num_sizes sizes / num_ratios ratios."""
    sizes_now, ratios_now = current
    k_sizes = increasing(kmeans_1d(shapes.prod(dim=1).sqrt(), num_sizes), 1)  # sqrt(area), px
    k_ratios = increasing(kmeans_1d(shapes[:, 1] / shapes[:, 0], num_ratios), 0.01)  # h / w
    grids = {"current": current}
    ratio_sets = {"k-means ratios": k_ratios}
    if len(ratios_now) == num_ratios:
        ratio_sets["current ratios"] = ratios_now
    for ratio_name, ratios in ratio_sets.items():
        grids[f"k-means sizes x {ratio_name}"] = (k_sizes, ratios)
        if len(sizes_now) == num_sizes:
            if ratio_name != "current ratios":
                grids[f"current sizes x {ratio_name}"] = (sizes_now, ratios)
            for f in SCALINGS:
                grids[f"current sizes x{f:g} x {ratio_name}"] = (increasing([s * f for s in sizes_now], 1), ratios)
    return grids


def coverage(ious):
    return (ious >= 0.5).double().mean().item(), (ious >= 0.7).double().mean().item(), ious.mean().item()


def score(ious):
    """Higher is better: the share of boxes covered at 0.5 plus the share at the RPN's 0.7 (a box that fits well
    counts twice), then the mean best IoU to break ties."""
    at_05, at_07, mean = coverage(ious)
    return round(at_05 + at_07, 6), round(mean, 6)


def percentiles(values):
    q = torch.quantile(values, torch.tensor(PERCENTILES, dtype=torch.float64) / 100).tolist()
    return (
        "  ".join(f"p{p} {v:.3g}" for p, v in zip(PERCENTILES, q))
        + f"  (min {values.min():.3g}, max {values.max():.3g})"
    )


def main(args):
    # Random weights: nothing is downloaded, and the resize and the anchors do not depend on the weights
    # (built with its own anchors: --anchor-sizes / --anchor-ratios here name the grid to judge)
    plain = argparse.Namespace(**{**vars(args), "anchor_sizes": None, "anchor_ratios": None})
    plain.weights_backbone = "none"
    model = train.get_model(plain, 2, "none")
    min_size, max_size = model.transform.min_size[-1], model.transform.max_size  # evaluation's, px
    generator = model.rpn.anchor_generator
    levels = len(generator.sizes)
    per_level = levels > 1 and all(len(s) == 1 for s in generator.sizes)  # R-CNN FPN: one size per level
    sizes_now = args.anchor_sizes or sorted({s for level in generator.sizes for s in level})
    ratios_now = args.anchor_ratios or list(generator.aspect_ratios[0])
    num_sizes, num_ratios = args.num_sizes or len(sizes_now), args.num_ratios or len(ratios_now)
    if min(sizes_now + ratios_now) <= 0 or min(num_sizes, num_ratios) < 1:
        raise utils.SetupError("anchor sizes and ratios must be > 0, --num-sizes and --num-ratios >= 1")
    if per_level and not num_sizes == len(sizes_now) == levels:
        raise utils.SetupError(f"{args.model} takes one anchor size per FPN level: give {levels} sizes, not "
                               f"{len(sizes_now)} (--anchor-sizes) and {num_sizes} (--num-sizes)")  # fmt: skip

    train_set, val_set, class_names = train.get_datasets(args)
    dataset = train_set if args.split == "train" else val_set
    shapes, labels, areas, scales = box_shapes(dataset_boxes(dataset), min_size, max_size)
    if not len(shapes):
        raise utils.SetupError(f"the {args.split} set of {args.data_path} has no boxes to fit anchors to")
    print(f"{args.model} on the {args.split} set of {args.dataset}: {len(dataset)} images, {len(shapes)} boxes")
    print(f"model input: shorter side {min_size} px, longer at most {max_size} px: "
          f"boxes scaled x{scales.min():.3g} to x{scales.max():.3g}")  # fmt: skip
    if len(model.transform.min_size) > 1 or args.data_augmentation == "lsj":
        print(f"  (--data-augmentation {args.data_augmentation} trains at other scales too; this is evaluation's)")
    print(f"box size sqrt(w*h), px at that scale: {percentiles(shapes.prod(dim=1).sqrt())}")
    print(f"box ratio h/w:                        {percentiles(shapes[:, 1] / shapes[:, 0])}")
    where = "given" if args.anchor_sizes or args.anchor_ratios else "the model's"
    layout = f"one per level, {levels} levels" if per_level else f"the same on each of {levels} feature maps"
    print(f"current anchors ({where}): sizes {sizes_now} ({layout}) x ratios {ratios_now}")

    grids = candidate_grids(shapes, (sizes_now, ratios_now), num_sizes, num_ratios)
    results = {name: best_iou(shapes, anchor_shapes(*grid)) for name, grid in grids.items()}
    ranked = sorted(results, key=lambda name: score(results[name]), reverse=True)  # stable: current wins a tie
    best = next(n for n in ranked if (len(grids[n][0]), len(grids[n][1])) == (num_sizes, num_ratios))
    print("\ngrids tried, best first: share of boxes with a shape IoU >= 0.5 / >= 0.7, mean best IoU")
    for name in ranked:
        ious, (sizes, ratios) = results[name], grids[name]
        print(f"  {name:38} {'/'.join(f'{c:6.1%}' for c in coverage(ious)[:2])}  {coverage(ious)[2]:.3f}  "
              f"sizes {','.join(map(str, sizes))} ratios {','.join(map(str, ratios))}")  # fmt: skip

    groups = {"all": torch.ones(len(shapes), dtype=torch.bool)}
    groups |= {name: labels == k for k, name in enumerate(class_names, start=1) if (labels == k).any()}
    groups |= {name: (areas >= lo) & (areas < hi) for name, (lo, hi) in COCO_RANGES.items()}  # original px^2
    print(f"\ncoverage by class and by COCO size range (original image area, as APs/APm/APl), current -> {best}:")
    print(f"  {'':16} {'boxes':>6}   {'IoU>=0.5':>17}   {'IoU>=0.7':>17}   {'mean IoU':>13}")
    for name, mask in groups.items():
        if mask.any():
            now, new = coverage(results["current"][mask]), coverage(results[best][mask])
            print(f"  {name:16} {int(mask.sum()):6}   {now[0]:7.1%} -> {new[0]:6.1%}   {now[1]:7.1%} -> {new[1]:6.1%}"
                  f"   {now[2]:5.3f} -> {new[2]:5.3f}")  # fmt: skip

    sizes, ratios = grids[best]
    print(f"\nsuggested: sizes {sizes} x ratios (h/w) {ratios} ({best})")
    print(f"  --anchor-sizes {','.join(map(str, sizes))} --anchor-ratios {','.join(map(str, ratios))}")
    level_sizes = tuple((s,) for s in sizes) if per_level else (tuple(sizes),) * levels
    print(f"  AnchorGenerator(sizes={level_sizes}, aspect_ratios=({tuple(ratios)},) * {levels})")
    print("  (pass the flags to train.py with the same --model; the AnchorGenerator is for models.py)")
    if len(level_sizes[0]) * len(ratios) != generator.num_anchors_per_location()[0]:
        print("  A different number of anchors per location gives the RPN fresh last layers: train a few epochs more.")
    return grids[best]


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
