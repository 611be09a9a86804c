"""How long do pasting and RLE-encoding a Mask R-CNN's masks take? torchvision's way against extras/speed.py's.

    python references/benchmark_masks.py                      # 100 detections on a 800 x 1066 image
    python references/benchmark_masks.py --detections 20 --height 480 --width 640

before: torchvision's paste_masks_in_image (a float mask of the whole image per detection), `> 0.5`, then each mask
        copied to Fortran order and encoded alone, as torchvision's reference evaluation does.
after:  speed.paste_masks (bilinear resize inside each box only, bool, already column-major) and one encode call.
Both give the same RLEs (checked on every run). Times are medians over --repeats, in ms per image.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where engine.py lives
import engine  # noqa: E402
from extras import speed  # noqa: E402


def fake_detections(n, height, width, seed=0):
    """Mask probabilities [n, 1, 28, 28] (smooth blobs, as a trained head gives) and boxes [n, 4] inside the image."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1, 1, 28)
    centre = torch.rand(n, 2, 1, generator=g) - 0.5
    radius = (grid[None, :, None] - centre[:, 1:]) ** 2 + (grid[None, None, :] - centre[:, :1]) ** 2  # [n, 28, 28]
    masks = torch.sigmoid(6 * (0.5 - radius) + torch.randn(n, 28, 28, generator=g))[:, None]
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
    size = (0.05 + 0.45 * torch.rand(n, 2, generator=g)) * torch.tensor([width, height])
    return masks, torch.cat([xy, (xy + size).minimum(torch.tensor([width - 1.0, height - 1.0]))], 1)


def before(masks, boxes, image_size):
    pasted = paste_masks_in_image(masks, boxes, image_size, padding=1) > 0.5
    t = time.perf_counter()
    rles = [mask_util.encode(np.array(m[0, :, :, None], dtype=np.uint8, order="F"))[0] for m in pasted.numpy()]
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles, t


def after(masks, boxes, image_size):
    pasted = speed.paste_masks(masks, boxes, image_size)
    t = time.perf_counter()
    return engine.encode_masks(pasted[:, 0]), t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detections", default=100, type=int, help="masks per image (default 100, the models' cap)")
    parser.add_argument("--height", default=800, type=int, help="image height (default 800)")
    parser.add_argument("--width", default=1066, type=int, help="image width (default 1066)")
    parser.add_argument("--repeats", default=5, type=int, help="timed runs of each (default 5)")
    args = parser.parse_args()

    masks, boxes = fake_detections(args.detections, args.height, args.width)
    size = (args.height, args.width)
    if before(masks, boxes, size)[0] != after(masks, boxes, size)[0]:
        raise SystemExit("error: the two ways give different RLEs")
    print(f"{args.detections} masks on a {args.height} x {args.width} image, ms (median of {args.repeats}):")
    print("| way | paste | encode | total |\n|---|---|---|---|")
    totals = {}
    for name, way in (("before", before), ("after", after)):
        paste, encode = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, pasted = way(masks, boxes, size)
            paste.append(pasted - start)
            encode.append(time.perf_counter() - pasted)
        times = [statistics.median(paste) * 1e3, statistics.median(encode) * 1e3]
        totals[name] = sum(times)
        print(f"| {name} | {times[0]:.1f} | {times[1]:.1f} | {totals[name]:.1f} |")
    print(f"after / before: x{totals['before'] / totals['after']:.1f} faster")


if __name__ == "__main__":
    main()
