"""Run a trained detector on your images: a script that draws and saves its predictions, and a Python API.

    python predict.py --checkpoint work_dirs/run/best.pth photos/ street.jpg --out predictions/
    python predict.py --checkpoint fasterrcnn_resnet50_fpn:DEFAULT street.jpg --out coco/   # torchvision's COCO model

--out receives <stem>.png for every image (predictions drawn by draw.draw_predictions), results.json (COCO results
format: image_id, file_name, category_id = label, bbox as x, y, width, height in pixels, score, and segmentation as
RLE for Mask R-CNN) and images.json ([{id, file_name, width, height}], image_id = position in the input list).

From Python:
    from predict import load_model, predict
    model = load_model("work_dirs/run/best.pth")
    result = predict(model, ["street.jpg"])[0]   # boxes [N, 4] XYXY, labels, names, scores (, masks [N, H, W])
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import PIL.Image
import pycocotools.mask as mask_util
import torch
from torchvision.ops import box_convert
from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype, to_pil_image

import models
import utils
from datasets.images import UnreadableImage, read_image
from extras import draw

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")  # what a folder given on the command line is scanned for


def load_model(checkpoint, device="cpu"):
    """A model in eval mode on `device`, with `model.class_names` (label k is class_names[k - 1]).

    checkpoint: a file written by train.py, rebuilt as it was trained (model, classes, input size), or
    "MODEL:WEIGHTS" for one of torchvision's COCO models, e.g. "fasterrcnn_resnet50_fpn:DEFAULT" (downloaded once).
    """
    checkpoint = os.fspath(checkpoint)
    name, colon, weights = checkpoint.partition(":")
    if colon and name in models.TORCHVISION_MODELS and not os.path.exists(checkpoint):
        enum = models.resolve_weights(name, weights)
        if enum is None or isinstance(enum, str):
            raise utils.SetupError(f"{checkpoint}: after MODEL: give torchvision weights, such as DEFAULT or COCO_V1")
        # categories[0] is "__background__": dropping it keeps label k -> categories[k], as for our checkpoints
        class_names = list(enum.meta["categories"][1:])
        model = models.get_model(name, num_classes=len(class_names) + 1, weights=weights)
    else:
        if not os.path.isfile(checkpoint):
            raise utils.SetupError(
                f"no checkpoint {checkpoint} (nor MODEL:WEIGHTS naming one of {', '.join(models.TORCHVISION_MODELS)})"
            )
        hint = "for torchvision's own weights pass MODEL:WEIGHTS, e.g. fasterrcnn_resnet50_fpn:DEFAULT"
        state = utils.load_checkpoint(checkpoint, "--checkpoint", hint)
        class_names = list(state["class_names"])
        model = models.model_from_checkpoint(state)  # as train.py built it: parts, anchors, input size
    model.class_names = class_names
    # channels_last, folded BatchNorm and (CPU) the multi-threaded RoIAlign: faster, the same detections in fp32
    return models.prepare_model(model, torch.device(device)).eval()


def to_image(image):
    """A file path, PIL image or uint8 / float tensor [3, H, W] -> float32 [3, H, W] in [0, 1], the models' input."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image, "RGB", hint="")  # UnreadableImage (a SetupError) names a file it cannot read
    elif isinstance(image, PIL.Image.Image):
        image = pil_to_tensor(image.convert("RGB"))
    return to_dtype(image, torch.float32, scale=True)


def predict(model, images, score_thresh=0.5, batch_size=4):
    """`model`'s detections (from load_model) for each of `images` (file paths, PIL images, tensors), in order:

        boxes  float32 [N, 4], XYXY in pixels of that image    labels int64 [N], 1..K    scores float32 [N]
        names  list of N class names                          masks  bool [N, H, W] (Mask R-CNN models only)

    Only detections scoring above `score_thresh` are returned, best first.
    """
    device = next(model.parameters()).device
    # The model drops low scores itself before NMS and before pasting masks at full size: give it our threshold
    # (it may be below the one it was built with), so that work is done only for the detections we return.
    detector = getattr(model, "model", model)  # a tta.TTA holds the model
    detector = getattr(detector, "roi_heads", detector)  # RetinaNet and FCOS hold score_thresh themselves
    built_thresh, detector.score_thresh = detector.score_thresh, score_thresh
    results = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = [to_image(image).to(device) for image in images[start : start + batch_size]]
                for output in model(batch):
                    result = {k: output[k].cpu() for k in ("boxes", "labels", "scores")}
                    result["names"] = [model.class_names[label - 1] for label in result["labels"].tolist()]
                    if "masks" in output:  # probabilities [N, 1, H, W] -> one boolean mask per object
                        result["masks"] = (output["masks"][:, 0] > 0.5).cpu()
                    results.append(result)
    finally:
        detector.score_thresh = built_thresh
    return results


def list_images(inputs):
    """Command-line inputs -> image paths: files as given, folders replaced by their images (sorted by name)."""
    paths, missing = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                missing.append(f"{item} (a folder with no {'/'.join(IMAGE_EXTENSIONS)} file)")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            missing.append(str(item))
    if missing:
        raise utils.SetupError("no such image: " + ", ".join(missing))
    by_stem = {}
    for path in paths:  # drawings are saved as <stem>.png: two inputs must not write the same file
        if path.stem in by_stem:
            raise utils.SetupError(f"{by_stem[path.stem]} and {path} would both be drawn to {path.stem}.png")
        by_stem[path.stem] = path
    return paths


def coco_results(prediction, image_id, file_name):
    """One image's detections as COCO result dicts (bbox x, y, width, height; masks as RLE)."""
    boxes = box_convert(prediction["boxes"], "xyxy", "xywh").tolist()
    results = [
        {"image_id": image_id, "file_name": file_name, "category_id": label, "bbox": box, "score": score}
        for label, box, score in zip(prediction["labels"].tolist(), boxes, prediction["scores"].tolist())
    ]
    if "masks" in prediction:
        # pycocotools wants Fortran-ordered uint8 [H, W, N]; counts are bytes, json needs str
        rles = mask_util.encode(prediction["masks"].permute(1, 2, 0).numpy().astype("uint8", order="F"))
        for result, rle in zip(results, rles):
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    return results


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, and folders of images")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a train.py checkpoint (.pth), or MODEL:WEIGHTS for torchvision's COCO models",
    )
    parser.add_argument("--out", required=True, help="folder for the drawings, results.json and images.json")
    parser.add_argument(
        "--score-thresh", default=0.5, type=float, help="keep detections scoring above this (default 0.5)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default cuda when available)",
    )
    parser.add_argument("--batch-size", default=4, type=int, help="images per forward pass (default 4)")
    parser.add_argument(
        "--tta",
        default="none",
        choices=("none", "hflip"),
        help="test-time augmentation: also predict on the mirrored image and merge (default none)",
    )
    parser.add_argument(
        "--tta-scales",
        default=None,
        type=lambda s: [int(v) for v in s.split(",")],
        help="test-time shorter sides, e.g. 640,800,1000 px, merged (default: the model's one)",
    )
    parser.add_argument(
        "--tta-merge",
        default="nms",
        choices=("nms", "vote"),
        help="merge the views' boxes by per-class NMS or score-weighted voting (default nms)",
    )
    return parser


def main(args):
    if args.batch_size < 1:
        raise utils.SetupError("--batch-size must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.SetupError("--device cuda, but torch sees no CUDA GPU; pass --device cpu")
    paths = list_images(args.inputs)
    model = load_model(args.checkpoint, args.device)
    if args.tta != "none" or args.tta_scales:
        class_names = model.class_names
        from extras import tta  # test-time augmentation

        model = tta.TTA(model, hflip=args.tta == "hflip", scales=args.tta_scales, merge=args.tta_merge).eval()
        model.class_names = class_names
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    detections, images, seconds = [], [], []  # seconds: model time per image, a batch's time shared by its images
    unreadable = []  # a corrupt file, a non-image with an image's name, a Mac's ._IMG.jpg: warned about, skipped
    start = time.perf_counter()
    for first in range(0, len(paths), args.batch_size):
        batch, batch_ids = [], []
        for image_id in range(first, min(first + args.batch_size, len(paths))):
            try:
                batch.append(to_image(paths[image_id]))
                batch_ids.append(image_id)
            except UnreadableImage as e:
                unreadable.append(paths[image_id])
                print(f"\nwarning: skipped {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        if not batch:
            continue
        tic = time.perf_counter()
        predictions = predict(model, batch, args.score_thresh, args.batch_size)  # returns CPU tensors: synchronised
        seconds += [(time.perf_counter() - tic) / len(batch)] * len(batch)
        for image_id, image, prediction in zip(batch_ids, batch, predictions):
            path = paths[image_id]
            print(f"\r[{image_id + 1}/{len(paths)}] {path.name}", end="", file=sys.stderr, flush=True)
            drawing = draw.draw_predictions(image, prediction, model.class_names, args.score_thresh)
            to_pil_image(drawing).save(out / f"{path.stem}.png")
            height, width = image.shape[-2:]
            images.append({"id": image_id, "file_name": str(path), "width": width, "height": height})
            detections += coco_results(prediction, image_id, str(path))
    print(file=sys.stderr)
    total = time.perf_counter() - start
    if not images:
        raise utils.SetupError(f"none of the {len(paths)} images could be read (see the warnings above)")

    (out / "results.json").write_text(json.dumps(detections))
    (out / "images.json").write_text(json.dumps(images, indent=1))
    ms = [1000 * s for s in seconds]
    if unreadable:
        print(f"Skipped {len(unreadable)} unreadable files (warned above), first: {unreadable[0]}")
    print(
        f"{len(images)} images, model time per image: {statistics.mean(ms):.1f} ms mean, "
        f"{statistics.median(ms):.1f} median, {max(ms):.1f} max; {len(images) / total:.2f} images/s overall "
        f"(reading and drawing included)"
    )
    print(f"Wrote {len(images)} drawings, results.json ({len(detections)} detections) and images.json to {out}")


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
