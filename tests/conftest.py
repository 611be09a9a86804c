"""Shared fixtures: a generated Penn-Fudan-layout dataset, and the real datasets of ../shared/data when present."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Real datasets (never copied into the repository): $DETECTION_DATA, else ../shared/data beside the checkout.
SHARED_DATA = Path(os.environ.get("DETECTION_DATA", REPO.parent / "shared" / "data"))


def make_pennfudan(root, num_images=6, seed=0, sizes=((96, 128), (112, 80))):
    """Write a Penn-Fudan-layout dataset: PNG images with 1-3 bright rectangles, and instance-id masks.

    Returns the list of per-image ground truth boxes (pixel extents, XYXY) in file order.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "PNGImages").mkdir(parents=True, exist_ok=True)
    (root / "PedMasks").mkdir(parents=True, exist_ok=True)
    all_boxes = []
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        image = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        boxes = []
        for obj_id in range(1, int(rng.integers(1, 4)) + 1):
            bw, bh = int(rng.integers(12, w // 2)), int(rng.integers(16, h // 2))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            mask[y1 : y1 + bh, x1 : x1 + bw] = obj_id  # later objects may occlude earlier ones
            image[y1 : y1 + bh, x1 : x1 + bw] = rng.integers(150, 255, size=3, dtype=np.uint8)
        for obj_id in range(1, mask.max() + 1):
            ys, xs = np.nonzero(mask == obj_id)
            if len(xs):
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        name = f"Ped{i:05d}"
        Image.fromarray(image).save(root / "PNGImages" / f"{name}.png")
        Image.fromarray(mask).save(root / "PedMasks" / f"{name}_mask.png")
        all_boxes.append(boxes)
    return all_boxes


# The most a test may leave in its tmp_path (pytest deletes a passing test's at its teardown): the suite's temp folder
# then stays under 1 GB while it runs. Checkpoints are the big files: small models, --save-interval, one copy.
TMP_LIMIT_MB = 700


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """After each test's body, before pytest deletes its tmp_path: fail it when it wrote more than TMP_LIMIT_MB."""
    result = yield
    path = item.funcargs.get("tmp_path")
    if path is not None:
        megabytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
        if os.environ.get("TMP_SIZES"):  # TMP_SIZES=file: every test's size, to find the big ones
            with open(os.environ["TMP_SIZES"], "a") as f:
                f.write(f"{megabytes:.0f} MB {item.nodeid}\n")
        assert megabytes < TMP_LIMIT_MB, f"{item.nodeid} left {megabytes:.0f} MB in {path}: write smaller files"
    return result


@pytest.fixture
def pennfudan_dir(tmp_path):
    root = tmp_path / "PennFudanPed"
    make_pennfudan(root, num_images=8)
    return root


@pytest.fixture
def real_pennfudan():
    root = SHARED_DATA / "PennFudanPed"
    if not (root / "PNGImages").is_dir():
        pytest.skip(f"real Penn-Fudan not found at {root} (set DETECTION_DATA to the folder holding PennFudanPed/)")
    return root
