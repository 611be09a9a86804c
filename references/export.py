"""Export a train.py checkpoint to one TorchScript or ONNX file, then check that it detects what PyTorch does.

    python references/export.py --checkpoint work_dirs/run/best.pth --format onnx --out model.onnx
    python references/export.py --checkpoint work_dirs/run/best.pth --format torchscript --out model.pt
    python references/export.py --checkpoint best.pth --format onnx --out model.onnx --verify-images photos/

The file holds the whole detector: resize and normalisation before, boxes scaled back to the input's pixels and
masks pasted at its size after. It takes ONE image per call, [3, H, W] RGB of any size: uint8 0-255 or float 0-1
(TorchScript takes both; an ONNX file the --input-dtype it was exported with). Outputs: boxes [N, 4] XYXY pixels,
labels [N] (k names class_names[k - 1]), scores [N], and masks [N, 1, H, W] (probabilities) or keypoints [N, K, 3]
and keypoints_scores [N, K]. Class names and the model's settings are in the file's metadata.

The parity check (--verify N, default 20 validation images of the checkpoint's dataset or of --dataset/--data-path;
--verify-images DIR for a folder of images; --verify 0 skips it) runs the file and the eager model on the same
images, matches their detections (same class, IoU > 0.5) and reports the largest box and score differences, the
mean mask IoU, the COCO AP of both (dataset images) and the time per image. It exits 1 when they disagree beyond
--tol-px, --tol-score, --tol-ap or the mask IoU floor, naming the output that differs.
ONNX needs: pip install onnx onnxruntime (or pip install -r requirements-extras.txt).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where train.py lives
import checkpoints  # noqa: E402
import engine  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from datasets.images import read_image  # noqa: E402
from extras import export  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# train.py's data flags the parity check accepts; absent, the checkpoint's own (what the model was validated on)
DATA_FLAGS = ("dataset", "data_path", "train_ann", "val_ann", "train_images", "val_images", "val_split", "classes",
              "val_size", "split_seed")  # fmt: skip
MIN_MASK_IOU = 0.95  # mean IoU of matched masks cut at 0.5; the same masks give ~0.999 (boundary pixels at 0.5)
MAX_UNMATCHED = 0.1  # share of detections without a counterpart; ties at the threshold or NMS leave a few


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    out = parser.add_argument_group("export")
    out.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py (.pth)")
    out.add_argument("--format", default="onnx", choices=export.FORMATS, help="file format (default onnx)")
    out.add_argument("--out", required=True, help="the file to write, e.g. model.onnx or model.pt")
    out.add_argument(
        "--input-dtype",
        default="uint8",
        choices=("uint8", "float32"),
        help="ONNX input: uint8 0-255 or float32 0-1 (default uint8; TorchScript takes both)",
    )
    out.add_argument(
        "--score-thresh",
        default=None,
        type=float,
        help="detections scoring below this are dropped inside the file (default: the checkpoint's)",
    )
    out.add_argument(
        "--opset", default=export.ONNX_OPSET, type=int, help=f"ONNX opset, 11 or newer (default {export.ONNX_OPSET})"
    )
    check = parser.add_argument_group("parity check")
    check.add_argument(
        "--verify",
        default=20,
        type=int,
        help="validation images to compare the file and PyTorch on; 0 skips the check (default 20)",
    )
    check.add_argument("--verify-images", default=None, help="compare on the images of this folder instead (no AP)")
    check.add_argument("--tol-px", default=1.0, type=float, help="largest box difference allowed, px (default 1.0)")
    check.add_argument("--tol-score", default=0.01, type=float, help="largest score difference allowed (default 0.01)")
    check.add_argument("--tol-ap", default=0.1, type=float, help="largest AP difference allowed, points (default 0.1)")
    data = parser.add_argument_group("data (train.py's flags; default: the checkpoint's)")
    for flag in DATA_FLAGS:
        kind = int if flag in ("val_size", "split_seed") else str
        data.add_argument("--" + flag.replace("_", "-"), default=None, type=kind, help=f"as train.py's --{flag}")
    return parser


def verification_images(args, checkpoint):
    """[(image uint8 [3, H, W], target or None)] for the parity check, and the dataset's class names (or None)."""
    if args.verify_images:
        paths = sorted(p for p in Path(args.verify_images).glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise utils.SetupError(f"--verify-images {args.verify_images}: no {'/'.join(IMAGE_EXTENSIONS)} file there")
        return [(read_image(p, "RGB", hint=""), None) for p in paths[: args.verify or None]], None
    data_args = train.get_args_parser().parse_args([])
    vars(data_args).update({k: v for k, v in checkpoint["args"].items() if k in vars(data_args)})
    vars(data_args).update({k: getattr(args, k) for k in DATA_FLAGS if getattr(args, k) is not None})
    try:
        _, val_set, class_names = train.get_datasets(data_args)
    except utils.SetupError as e:
        raise utils.SetupError(
            f"{e}\n  The parity check reads the validation images of --dataset {data_args.dataset} "
            f"(--data-path {data_args.data_path}); pass other data flags, --verify-images DIR, or --verify 0"
        ) from e
    if list(class_names) != list(checkpoint["class_names"]):
        raise utils.SetupError(
            f"the dataset's classes {list(class_names)} are not the checkpoint's {list(checkpoint['class_names'])}: "
            f"pass the --classes it was trained with"
        )
    samples = [val_set[i] for i in range(min(args.verify, len(val_set)))]
    # the validation transform gives float 0-1 from uint8 files: back to those bytes, exactly
    return [((image * 255).round().to(torch.uint8), target) for image, target in samples], class_names


def timed(run, image, seconds):
    tic = time.perf_counter()
    output = run(image)
    seconds.append(time.perf_counter() - tic)
    return output


def parity_check(model, path, samples, class_names):
    """Run eager PyTorch and the exported file on `samples`; print the comparison, return it as a dict."""
    eager, exported = export.Deployable(model).eval(), export.Runner(path)
    parity, eager_s, exported_s = export.Parity(), [], []
    images, annotations, results = [], [], {"eager": [], "exported": []}
    with torch.inference_mode():
        for index, (image, target) in enumerate(samples):
            print(f"\r[{index + 1}/{len(samples)}] comparing", end="", file=sys.stderr, flush=True)
            ours, theirs = timed(eager, image, eager_s), timed(exported, image, exported_s)
            parity.add(ours, theirs)
            if target is not None:
                entry, anns = engine.ground_truth(target, *image.shape[-2:])
                images.append(entry)
                annotations += anns
                results["eager"] += export.coco_results(ours, target["image_id"])
                results["exported"] += export.coco_results(theirs, target["image_id"])
    print(file=sys.stderr)
    report = parity.summary()
    print(f"Parity on {len(samples)} images: {report['matched']} detections matched, {report['unmatched']} unmatched")
    print(f"  largest box difference {report['box_px']:.4f} px, largest score difference {report['score']:.2e}")
    if "mask_iou" in report:
        print(f"  mean mask IoU {report['mask_iou']:.4f}")
    if parity.keypoint_px:
        print(f"  largest keypoint difference {parity.keypoint_px:.4f} px")
    if class_names is not None:
        iou_types = ["bbox"] + ["segm"] * ("mask_iou" in report)
        iou_types += ["keypoints"] * any("keypoints" in a for a in annotations)
        for iou_type in iou_types:
            ap = [export.coco_ap(images, annotations, results[k], class_names, iou_type) for k in results]
            report[f"{iou_type}_ap"] = ap
            print(f"  COCO {iou_type} AP: PyTorch {ap[0]:.2f}, exported {ap[1]:.2f}")
    ms = [1000 * statistics.median(s[1:] or s) for s in (eager_s, exported_s)]  # the first call also warms up
    print(f"  time per image on this machine (median): PyTorch {ms[0]:.1f} ms, exported {ms[1]:.1f} ms")
    return report


def disagreements(report, args):
    """What the exported file gets wrong, in words (empty: it agrees)."""
    problems = []
    if report["box_px"] > args.tol_px:
        problems.append(f"boxes differ by up to {report['box_px']:.3f} px (--tol-px {args.tol_px})")
    if report["score"] > args.tol_score:
        problems.append(f"scores differ by up to {report['score']:.4f} (--tol-score {args.tol_score})")
    if report.get("mask_iou", 1.0) < MIN_MASK_IOU:
        problems.append(f"masks differ: mean IoU {report['mask_iou']:.3f} < {MIN_MASK_IOU}")
    total = report["matched"] * 2 + report["unmatched"]
    if report["unmatched"] > MAX_UNMATCHED * total:
        problems.append(f"{report['unmatched']} of {total} detections have no counterpart in the other model")
    for key in (k for k in report if k.endswith("_ap")):
        if abs(report[key][0] - report[key][1]) > args.tol_ap:
            problems.append(f"{key[:-3]} AP differs: {report[key][0]:.2f} vs {report[key][1]:.2f} (--tol-ap)")
    return problems


def main(args):
    if args.verify < 0:
        raise utils.SetupError("--verify must be >= 0 (0 skips the parity check)")
    if args.format == "onnx":
        export.import_onnx()  # stops now with the pip command when they are missing
        if args.opset < 11:
            raise utils.SetupError("--opset must be 11 or newer: torchvision's RoIAlign and NMS need it")
    if args.verify_images and not os.path.isdir(args.verify_images):
        raise utils.SetupError(f"--verify-images {args.verify_images} is not a folder")
    checkpoint = checkpoints.load_checkpoint(args.checkpoint, "--checkpoint", "pass a checkpoint written by train.py")
    options = {} if args.score_thresh is None else {"box_score_thresh": args.score_thresh}
    # plain torchvision modules (no speed path): what scripting and tracing understand, and what users deploy
    model = models.model_from_checkpoint(checkpoint, **options).eval()
    samples, class_names = verification_images(args, checkpoint) if args.verify else ([], None)

    metadata = export.describe(model, checkpoint["class_names"], args.format, args.input_dtype, args.checkpoint)
    tic = time.perf_counter()
    if args.format == "onnx":
        export.export_onnx(model, args.out, metadata, args.input_dtype, args.opset)
    else:
        export.export_torchscript(model, args.out, metadata)
    size = os.path.getsize(args.out) / 2**20
    print(f"Wrote {args.out} ({args.format}, {size:.1f} MB) in {time.perf_counter() - tic:.1f} s: {metadata['model']}, "
          f"classes {metadata['class_names']}, input {metadata['input']}")  # fmt: skip
    if not samples:
        return 0
    problems = disagreements(parity_check(model, args.out, samples, class_names), args)
    if problems:
        print(f"FAILED: {args.out} does not reproduce {metadata['model']}: " + "; ".join(problems))
        return 1
    print(f"OK: {args.out} reproduces the PyTorch model")
    return 0


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
