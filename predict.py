"""Run a trained detector on your images and videos: a script that draws and saves its predictions, and a Python API.

    python predict.py --checkpoint work_dirs/run/best.pth photos/ street.jpg --out predictions/
    python predict.py --checkpoint fasterrcnn_resnet50_fpn:DEFAULT street.jpg --out coco/   # torchvision's COCO model
    python predict.py --checkpoint best.pth photos/ --out out/ --batch-size 8 -j 4     # many images: decoding overlaps
    python predict.py --checkpoint best.pth drone.mp4 --out out/                        # a video (pip install av)
    python predict.py --checkpoint best.pth aerial.tif --out out/ --tile 800            # small objects, large images
    python predict.py --checkpoint best.pth new/ --out out/ --save-annotations new.json # pre-labelling

--out receives <stem>.png for every image (predictions drawn by draw.draw_predictions), results.json (COCO results
format: image_id, file_name, category_id = label, bbox as x, y, width, height in pixels, score, and segmentation as
RLE for Mask R-CNN) and images.json ([{id, file_name, width, height}], image_id = position in the input list).
A video (.mp4, .avi, .mov, .mkv) gives <stem>.mp4 (drawn, extras/video.py) and <stem>.json (per frame: index, time
in seconds, detections). --tile runs the model on overlapping tiles (extras/tiling.py). --save-annotations FILE
writes the detections as a COCO annotation file to correct in a labelling tool and train on (masks as RLE).

From Python:
    from predict import load_model, predict
    model = load_model("work_dirs/run/best.pth")
    result = predict(model, ["street.jpg"])[0]   # boxes [N, 4] XYXY, labels, names, scores (, masks [N, H, W])
"""

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import PIL.Image
import pycocotools.mask as mask_util
import torch
from torchvision.ops import box_convert, nms
from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype, to_pil_image

import checkpoints
import models
import utils
from datasets.images import UnreadableImage, read_image
from extras import draw

# what a folder given on the command line is scanned for; a video is predicted when given as a file
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


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
        state = checkpoints.load_checkpoint(checkpoint, "--checkpoint", hint)
        class_names = list(state["class_names"])
        model = models.model_from_checkpoint(state)  # as train.py built it: parts, anchors, input size
        # the F1-optimal threshold of the checkpoint's last evaluation (extras/error_analysis.py), if it had one
        model.recommended_score_thresh = state.get("score_thresh")
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


@contextlib.contextmanager
def detection_settings(model, score_thresh, max_det=None):
    """Within the block, `model` keeps detections scoring above `score_thresh`, at most `max_det` per image (None: its
    own limit); a wrapper (tta.TTA, tiling.TiledDetector) and the model it holds alike. Put back afterwards."""
    saved = []

    def set_(holder, name, value):
        saved.append((holder, name, getattr(holder, name)))
        setattr(holder, name, value)

    module = model
    while module is not None:
        holder = getattr(module, "roi_heads", module)  # R-CNNs hold both in roi_heads; RetinaNet, FCOS themselves
        if max_det is not None and hasattr(holder, "detections_per_img"):
            set_(holder, "detections_per_img", max_det)
        module = getattr(module, "model", None)  # a wrapper holds the model
        if module is None:
            # The model drops low scores itself before NMS and before pasting masks at full size: give it our
            # threshold (it may be below its own), so that work is done only for the detections we return.
            set_(holder, "score_thresh", score_thresh)
    try:
        yield
    finally:
        for holder, name, value in reversed(saved):
            setattr(holder, name, value)


def detect(model, images, agnostic_iou=None):
    """The model on a list of float [3, H, W] images (sizes may differ) -> predict's results.

    agnostic_iou: also one NMS over all classes at this IoU (torchvision's NMS is per class), for objects that
    would otherwise be reported twice under two class names.
    """
    device = next(model.parameters()).device
    # One forward pass per image size: torchvision pads a batch to its largest image, and the padding changes the
    # features near the right and bottom borders of the smaller ones, so that their detections would depend on the
    # batch they came in (measured in tests/test_predict_workloads.py). Same-size images batch as they are.
    outputs, by_size = [None] * len(images), {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    for indices in by_size.values():
        for i, output in zip(indices, model([images[i].to(device) for i in indices])):
            outputs[i] = output
    results = []
    for output in outputs:
        result = {k: output[k].cpu() for k in ("boxes", "labels", "scores")}
        if "masks" in output:  # probabilities [N, 1, H, W] (or already cut) -> one boolean mask per object
            result["masks"] = (output["masks"][:, 0] > 0.5).cpu()
        if agnostic_iou is not None:
            keep = nms(result["boxes"], result["scores"], agnostic_iou)  # best first, as the model's order
            result = {k: v[keep] for k, v in result.items()}
        result["names"] = [model.class_names[label - 1] for label in result["labels"].tolist()]
        results.append(result)
    return results


def default_score_thresh(model):
    """The checkpoint's recommended --score-thresh (F1-optimal on its validation set), else 0.5."""
    recommended = getattr(model, "recommended_score_thresh", None)
    return 0.5 if recommended is None else recommended


def predict(model, images, score_thresh=None, batch_size=1, max_det=None, agnostic_iou=None):
    """`model`'s detections (from load_model) for each of `images` (file paths, PIL images, tensors), in order:

        boxes  float32 [N, 4], XYXY in pixels of that image    labels int64 [N], 1..K    scores float32 [N]
        names  list of N class names                          masks  bool [N, H, W] (Mask R-CNN models only)

    Only detections scoring above `score_thresh` are returned (None: the checkpoint's recommended threshold, else
    0.5), best first, at most `max_det` (None: the model's limit, torchvision's 100). `batch_size` images go through
    the model at a time; see detect for `agnostic_iou`.
    """
    score_thresh = default_score_thresh(model) if score_thresh is None else score_thresh
    results = []
    with detection_settings(model, score_thresh, max_det), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            results += detect(model, [to_image(image) for image in images[start : start + batch_size]], agnostic_iou)
    return results


class ImageFiles(torch.utils.data.Dataset):
    """(index, float [3, H, W] image or None, None or why it is unreadable) for each path: decoded in the DataLoader's
    worker processes while the model runs. An unreadable file (a corrupt file, a non-image with an image's name, a
    Mac's ._IMG.jpg) is warned about and skipped, not a stop."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, to_image(self.paths[index]), None
        except UnreadableImage as e:
            return index, None, str(e).splitlines()[0]


class Progress:
    """A line "[n/N] name  12.3 images/s  eta 0:00:41" on stderr: rewritten in place on a terminal; in a log file
    (where a carriage return does not go back) one every tenth of the way. total None: no eta (a video that does not
    say how many frames it holds)."""

    def __init__(self, total, unit="images"):
        self.total, self.unit, self.done, self.shown = total, unit, 0, 0
        self.tty, self.start = sys.stderr.isatty(), time.perf_counter()
        self.every = 1 if self.tty else max(1, (total or 1000) // 10)

    def update(self, count, name=""):
        self.done += count
        if not self.tty and self.done - self.shown < self.every and self.done != self.total:
            return
        self.shown = self.done
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        line = f"[{self.done}/{self.total or '?'}] {name}  {rate:.1f} {self.unit}/s"
        if self.total:
            line += f"  eta {timedelta(seconds=round((self.total - self.done) / max(rate, 1e-9)))}"
        print(f"\r{line}\033[K" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def warn(self, message):
        print(f"\r\033[K{message}" if self.tty else message, file=sys.stderr, flush=True)

    def close(self):
        if self.tty and self.shown:
            print(file=sys.stderr)


def list_inputs(inputs):
    """Command-line inputs -> (image paths, video paths): files as given, folders replaced by their images (sorted)."""
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
    by_stem = {"results": "results.json", "images": "images.json"}
    for path in paths:  # drawings are saved as <stem>.png, videos as <stem>.mp4 and .json: no two may clash
        if path.stem in by_stem:
            raise utils.SetupError(f"{by_stem[path.stem]} and {path} would both be written to {path.stem}.*")
        by_stem[path.stem] = path
    videos = [path for path in paths if path.suffix.lower() in VIDEO_EXTENSIONS]
    return [path for path in paths if path not in videos], videos


def detection_dicts(prediction):
    """One image's detections as json dicts: category_id (= label), bbox (x, y, width, height in pixels), score, and
    for masks segmentation (RLE) and area (its pixels)."""
    boxes = box_convert(prediction["boxes"], "xyxy", "xywh").tolist()
    found = [
        {"category_id": label, "bbox": box, "score": score}
        for label, box, score in zip(prediction["labels"].tolist(), boxes, prediction["scores"].tolist())
    ]
    if "masks" in prediction:
        # pycocotools wants Fortran-ordered uint8 [H, W, N]; counts are bytes, json needs str
        rles = mask_util.encode(prediction["masks"].permute(1, 2, 0).numpy().astype("uint8", order="F"))
        for detection, rle, area in zip(found, rles, mask_util.area(rles).tolist()):
            detection["segmentation"], detection["area"] = {"size": rle["size"], "counts": rle["counts"].decode()}, area
    return found


def coco_results(prediction, image_id, file_name):
    """One image's detections as COCO result dicts (bbox x, y, width, height; masks as RLE)."""
    return [{"image_id": image_id, "file_name": file_name, **d} for d in detection_dicts(prediction)]


def coco_annotations(images, detections, class_names):
    """images.json entries and results.json detections -> (a COCO annotation file: boxes, masks as RLE, the score
    kept for sorting in a labelling tool; the folder its file names are relative to, the images' common folder)."""
    folder = Path(os.path.commonpath([Path(im["file_name"]).resolve().parent for im in images]))
    entries = [im | {"file_name": Path(im["file_name"]).resolve().relative_to(folder).as_posix()} for im in images]
    annotations = []
    for d in detections:
        x, y, width, height = d["bbox"]
        # In steps of 1/16 px, exact in binary: x + width is then the right edge itself, inside the image (float32
        # boxes clipped to an 80 px wide image can come back as x + width = 80.000003, a box crossing the border)
        x1, y1, x2, y2 = (round(v * 16) / 16 for v in (x, y, x + width, y + height))
        if x2 <= x1 or y2 <= y1:  # under 1/16 px wide or high (torchvision keeps boxes down to 0.01 px): no object
            continue
        bbox = [x1, y1, x2 - x1, y2 - y1]
        ann = {"id": len(annotations) + 1, "image_id": d["image_id"], "category_id": d["category_id"], "bbox": bbox}
        ann |= {"area": d.get("area", bbox[2] * bbox[3]), "iscrowd": 0, "score": round(d["score"], 4)}
        annotations.append(ann | ({"segmentation": d["segmentation"]} if "segmentation" in d else {}))
    categories = [{"id": k, "name": name} for k, name in enumerate(class_names, start=1)]
    return {"images": entries, "annotations": annotations, "categories": categories}, folder


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, video files")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a train.py checkpoint (.pth), or MODEL:WEIGHTS for torchvision's COCO models",
    )
    parser.add_argument("--out", required=True, help="folder for the drawings, results.json and images.json")
    parser.add_argument(
        "--score-thresh",
        default=None,
        type=float,
        help="keep detections scoring above this (default: the checkpoint's recommended one, F1-optimal on its "
        "validation set; else 0.5)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default cuda when available)",
    )
    run = parser.add_argument_group("many images")
    run.add_argument(
        "--batch-size",
        default=1,
        type=int,
        help="images (video frames; with --tile, tiles) per forward pass (default 1)",
    )
    run.add_argument("-j", "--workers", default=2, type=int, help="processes decoding images (default 2; 0: none)")
    run.add_argument("--max-det", default=100, type=int, help="at most this many detections per image (default 100)")
    run.add_argument(
        "--agnostic-nms",
        action="store_true",
        help="also one NMS over all classes, for objects given two class labels (default off: per class only)",
    )
    run.add_argument("--agnostic-iou", default=0.5, type=float, help="IoU of --agnostic-nms (default 0.5)")
    run.add_argument(
        "--save-annotations",
        default=None,
        help="also write the detections above --score-thresh as a COCO annotation FILE.json (default none)",
    )
    tta = parser.add_argument_group("test-time augmentation")
    tta.add_argument(
        "--tta",
        default="none",
        choices=("none", "hflip"),
        help="test-time augmentation: also predict on the mirrored image and merge (default none)",
    )
    tta.add_argument(
        "--tta-scales",
        default=None,
        type=lambda s: [int(v) for v in s.split(",")],
        help="test-time shorter sides, e.g. 640,800,1000 px, merged (default: the model's one)",
    )
    tta.add_argument(
        "--tta-merge",
        default="nms",
        choices=("nms", "vote"),
        help="merge the views' boxes by per-class NMS or score-weighted voting (default nms)",
    )
    tiles = parser.add_argument_group("large images")
    tiles.add_argument(
        "--tile", default=0, type=int, help="run the model on tiles of this many pixels square (default 0: off)"
    )
    tiles.add_argument(
        "--tile-overlap", default=0.2, type=float, help="share of a tile its neighbours also see (default 0.2)"
    )
    tiles.add_argument(
        "--tile-merge",
        default="nms",
        choices=("nms", "vote"),
        help="merge the tiles' boxes by per-class NMS or score-weighted voting (default nms)",
    )
    tiles.add_argument(
        "--tile-full-image",
        action="store_true",
        help="also run the whole image at the model's scale, for objects larger than a tile (default off)",
    )
    return parser


def check_args(args):
    """Every flag problem before the model loads."""
    if args.batch_size < 1 or args.workers < 0 or args.max_det < 1:
        raise utils.SetupError("--batch-size and --max-det must be >= 1, --workers >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.SetupError("--device cuda, but torch sees no CUDA GPU; pass --device cpu")
    if args.tile and (args.tile < 32 or not 0 <= args.tile_overlap < 1):
        raise utils.SetupError("--tile is a size in pixels (>= 32) and --tile-overlap a fraction, 0 <= R < 1")
    if args.save_annotations and Path(args.save_annotations).suffix != ".json":
        raise utils.SetupError(f"--save-annotations writes a COCO .json file; got {args.save_annotations}")


def predict_images(model, paths, out, args, agnostic_iou=None):
    """The images: <stem>.png drawings, results.json, images.json -> (images.json entries, detections)."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths), args.batch_size, num_workers=args.workers, collate_fn=list)
    detections, images, seconds, unreadable = [], [], [], []  # seconds: model time per image, a batch's shared
    progress, start = Progress(len(paths)), time.perf_counter()
    for batch in loader:  # [(index, image, error)]
        for index, _, error in batch:
            if error:
                unreadable.append(paths[index])
                progress.warn(f"warning: skipped {error}")
        readable = [(index, image) for index, image, error in batch if error is None]
        tic = time.perf_counter()
        predictions = detect(model, [image for _, image in readable], agnostic_iou) if readable else []
        seconds += [(time.perf_counter() - tic) / max(len(readable), 1)] * len(readable)  # detect synchronises
        for (image_id, image), prediction in zip(readable, predictions):
            path = paths[image_id]
            drawing = draw.draw_predictions(image, prediction, model.class_names, args.score_thresh)
            to_pil_image(drawing).save(out / f"{path.stem}.png")
            height, width = image.shape[-2:]
            images.append({"id": image_id, "file_name": str(path), "width": width, "height": height})
            detections += coco_results(prediction, image_id, str(path))
        progress.update(len(batch), paths[batch[-1][0]].name)
    progress.close()
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
    return images, detections


def annotate(model, frames, score_thresh, agnostic_iou=None):
    """A video's frames (float [3, H, W]) -> [(drawing uint8 [3, H, W], detection dicts)], for extras/video.py."""
    predictions = detect(model, frames, agnostic_iou)
    return [
        (draw.draw_predictions(frame, prediction, model.class_names, score_thresh), detection_dicts(prediction))
        for frame, prediction in zip(frames, predictions)
    ]


def main(args):
    check_args(args)
    paths, videos = list_inputs(args.inputs)
    if args.save_annotations and not paths:
        raise utils.SetupError("--save-annotations lists images; videos get their per-frame <stem>.json")
    model = load_model(args.checkpoint, args.device)
    class_names = model.class_names
    if args.score_thresh is None:
        args.score_thresh = default_score_thresh(model)
        recommended = getattr(model, "recommended_score_thresh", None) is not None
        source = "the checkpoint's F1-optimal one" if recommended else "0.5"
        print(f"--score-thresh {args.score_thresh:.3f} ({source}; pass --score-thresh to choose)")
    if args.tta != "none" or args.tta_scales:
        from extras import tta  # test-time augmentation

        model = tta.TTA(model, hflip=args.tta == "hflip", scales=args.tta_scales, merge=args.tta_merge).eval()
    if args.tile:
        from extras import tiling  # large images: the model on overlapping tiles

        tiled = dict(merge=args.tile_merge, full_image=args.tile_full_image, batch_size=args.batch_size)
        model = tiling.TiledDetector(model, args.tile, args.tile_overlap, **tiled).eval()
    model.class_names = class_names
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    agnostic_iou = args.agnostic_iou if args.agnostic_nms else None
    with detection_settings(model, args.score_thresh, args.max_det), torch.inference_mode():
        images, detections = predict_images(model, paths, out, args, agnostic_iou) if paths else ([], [])
        for path in videos:
            from extras import video  # PyAV, imported only for a video

            frames = functools.partial(annotate, model, score_thresh=args.score_thresh, agnostic_iou=agnostic_iou)
            count = video.annotate_video(path, out, frames, class_names, args.batch_size, Progress)
            print(f"Wrote {out / path.stem}.mp4 and {path.stem}.json ({count} frames)")
    if args.save_annotations:
        data, folder = coco_annotations(images, detections, class_names)
        Path(args.save_annotations).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save_annotations).write_text(json.dumps(data))
        print(
            f"Wrote {args.save_annotations}: {len(data['annotations'])} annotations (masks as RLE) on "
            f"{len(data['images'])} images; file names are relative to {folder} (train.py --train-images)"
        )


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
