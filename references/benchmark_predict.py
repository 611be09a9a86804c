"""How fast does a trained model predict here? predict() at batch 1 and batch N, and the exported TorchScript and ONNX
Runtime files, on the same images, one after the other in this process.

    python references/benchmark_predict.py --checkpoint best.pth --images ../shared/data/PennFudanPed/PNGImages
    python references/benchmark_predict.py --checkpoint best.pth --images photos/ --num-images 40 --batch-size 8 \\
        --runtimes eager,torchscript,onnx

images/s counts everything from the file to the detections: decoding, the model (its resize and postprocessing
included), nothing drawn or written. Eager runs predict.predict as predict.py does (the speed path on); the exported
files run one image per call (what references/export.py writes). A first pass over a few images is not timed (the
first call at a new size is slow). Timings on a shared machine swing 2-3x: compare rows of one run only.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
import checkpoints  # noqa: E402
import models  # noqa: E402
import predict  # noqa: E402
import utils  # noqa: E402
from datasets.images import read_image  # noqa: E402
from extras import export  # noqa: E402

RUNTIMES = ("eager", "torchscript", "onnx")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint")
    parser.add_argument("--images", required=True, help="a folder of images")
    parser.add_argument("--num-images", default=40, type=int, help="images measured, sorted by name (default 40)")
    parser.add_argument("--batch-size", default=8, type=int, help="the batch of the second eager row (default 8)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="eager, torchscript, onnx (default all)")
    parser.add_argument("--warmup", default=3, type=int, help="untimed images first, per row (default 3)")
    return parser


def timed(run, paths, warmup):
    """(images/s, median ms per call) of run(list of paths) -> list of results, called per chunk of paths."""
    run(paths[:warmup])
    tic = time.perf_counter()
    per_call = run(paths)
    seconds = time.perf_counter() - tic
    return len(paths) / seconds, statistics.median(per_call) * 1000 if per_call else float("nan")


def eager_rows(checkpoint, paths, batch_size, warmup):
    model = predict.load_model(checkpoint)

    def run(chunk, batch):
        calls = []
        for start in range(0, len(chunk), batch):
            tic = time.perf_counter()
            predict.predict(model, chunk[start : start + batch], batch_size=batch)
            calls.append((time.perf_counter() - tic) / len(chunk[start : start + batch]))
        return calls

    return [(f"eager, batch {b}", *timed(lambda c, b=b: run(c, b), paths, warmup)) for b in (1, batch_size)]


def exported_row(name, path, paths, warmup):
    runner = export.Runner(path)

    def run(chunk):
        calls = []
        for image_path in chunk:
            tic = time.perf_counter()
            runner(read_image(image_path, "RGB"))  # uint8 [3, H, W], as a decoder gives it
            calls.append(time.perf_counter() - tic)
        return calls

    return (f"{name}, batch 1", *timed(run, paths, warmup))


def main(args):
    runtimes = args.runtimes.split(",")
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise utils.SetupError(f"--runtimes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(RUNTIMES)}")
    suffixes = (".jpg", ".jpeg", ".png", ".bmp")
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in suffixes)[: args.num_images]
    if not paths:
        raise utils.SetupError(f"--images {args.images}: no .jpg/.png/.bmp images there")
    if "onnx" in runtimes:
        export.import_onnx()  # stops with the pip command when onnx / onnxruntime are missing
    rows = eager_rows(args.checkpoint, paths, args.batch_size, args.warmup) if "eager" in runtimes else []
    checkpoint = checkpoints.load_checkpoint(args.checkpoint, "--checkpoint")
    model = models.model_from_checkpoint(checkpoint).eval()  # plain torchvision modules, as export.py exports
    with tempfile.TemporaryDirectory() as folder:
        for name in [r for r in runtimes if r != "eager"]:
            path = os.path.join(folder, f"model.{name}")
            metadata = export.describe(model, checkpoint["class_names"], name, "uint8", args.checkpoint)
            if name == "onnx":
                export.export_onnx(model, path, metadata)
            else:
                export.export_torchscript(model, path, metadata)
            rows.append(exported_row("ONNX Runtime" if name == "onnx" else "TorchScript", path, paths, args.warmup))
    print(f"\n{checkpoint['model_args']['name']}, {len(paths)} images from {args.images}, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print("| runtime | images/s | ms per image (median) |\n|---|---|---|")
    for name, images_per_s, median_ms in rows:
        print(f"| {name} | {images_per_s:.2f} | {median_ms:.0f} |")
    return rows


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
