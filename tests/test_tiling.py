"""extras/tiling.py: small objects in a generated 2000 x 2000 image are found on tiles and missed without, an object on
a tile seam is reported once, masks land in the whole image, engine.evaluate scores a TiledDetector as it is, and
references/convert_dataset.py --tile cuts a generated COCO dataset into training tiles."""

import json
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from conftest import REPO
from PIL import Image
from torchvision.ops import box_iou

import engine
import predict
import utils
from datasets.coco import CocoDetection
from extras.tiling import TiledDetector, tile_grid
from utils import SetupError

sys.path.insert(0, str(REPO / "references"))
import convert_dataset  # noqa: E402

SIZE = 2000  # the large image's side (px)
TILE = 256  # the tiles' side, and the stand-in detector's input size: on a tile it sees every pixel
OBJECT = 6  # px: at the detector's 256 / 2000 scale an object covers under 0.4 of a pixel, below its 0.5 threshold


class BlobDetector(torch.nn.Module):
    """A deterministic stand-in for a trained detector that resizes its input as an R-CNN does (a real one takes
    minutes to train). The image is scaled so that its longer side is `size` px (antialiased: the resize averages
    pixels, as GeneralizedRCNNTransform's does), pixels brighter than 0.5 are grouped into 8-connected blobs, and each
    blob's box (score: its brightness) and mask are mapped back to the input's pixels. An object averaged into
    pixels under 0.5 vanishes, as small objects do for a real detector at its input size."""

    def __init__(self, size=TILE, masks=False):
        super().__init__()
        self.size, self.masks = size, masks
        self.score_thresh, self.detections_per_img = 0.05, 100  # set by predict.detection_settings
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # predict.detect reads the device from the parameters

    def forward(self, images):
        outputs = []
        for image in images:
            height, width = image.shape[-2:]
            small_h, small_w = (round(side * self.size / max(height, width)) for side in (height, width))
            small = F.interpolate(image[None], (small_h, small_w), mode="bilinear", antialias=True)[0].mean(0)
            ids, count = scipy.ndimage.label(small.numpy() > 0.5, structure=np.ones((3, 3)))
            slices = scipy.ndimage.find_objects(ids)
            boxes = torch.tensor([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices], dtype=torch.float32)
            boxes = boxes.reshape(-1, 4) * torch.tensor([width / small_w, height / small_h] * 2)
            scores = torch.tensor([float(small.numpy()[ids == k].mean()) for k in range(1, count + 1)])
            keep = scores.argsort(descending=True)[: self.detections_per_img]
            output = {"boxes": boxes[keep], "labels": torch.ones(len(keep), dtype=torch.int64), "scores": scores[keep]}
            if self.masks:  # probabilities [N, 1, H, W], as Mask R-CNN's
                blobs = torch.from_numpy(ids)[None] == torch.arange(1, count + 1)[:, None, None]
                output["masks"] = F.interpolate(blobs[:, None].float(), (height, width), mode="nearest")[keep]
            outputs.append(output)
        return outputs


def large_image(boxes, seed=0):
    """float [3, SIZE, SIZE]: dark noise with a bright square at each XYXY box."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand((3, SIZE, SIZE), generator=generator) * 0.2
    for x1, y1, x2, y2 in boxes:
        image[:, y1:y2, x1:x2] = 0.9
    return image


def small_objects(count=40, seed=0):
    """`count` OBJECT px squares (XYXY) at random, none closer than 3 OBJECTs to another."""
    rng, boxes = np.random.default_rng(seed), []
    while len(boxes) < count:
        x, y = (int(v) for v in rng.integers(10, SIZE - 10 - OBJECT, size=2))
        if all(abs(x - bx) > 3 * OBJECT or abs(y - by) > 3 * OBJECT for bx, by, _, _ in boxes):
            boxes.append((x, y, x + OBJECT, y + OBJECT))
    return boxes


def recall(output, boxes, iou=0.5):
    found = box_iou(torch.tensor(boxes, dtype=torch.float32), output["boxes"])
    return (found.max(1).values >= iou).float().mean().item() if found.numel() else 0.0


def test_tile_grid_covers_the_image_with_the_overlap():
    tiles = tile_grid(SIZE, 1000, TILE, overlap=0.2)
    xs, ys = sorted({t[0] for t in tiles}), sorted({t[1] for t in tiles})
    assert len(tiles) == len(xs) * len(ys) and xs[0] == ys[0] == 0
    assert max(t[2] for t in tiles) == 1000 and max(t[3] for t in tiles) == SIZE  # the last tiles end on the border
    for starts in (xs, ys):
        steps = np.diff(starts)
        assert (TILE - steps >= 0.2 * TILE - 1).all()  # neighbours share at least 20% of a tile (rounding: 1 px)
    assert tile_grid(100, 300, TILE) == [(0, 0, 256, 100), (44, 0, 300, 100)]  # a short side: one tile that long


def test_small_objects_are_found_on_tiles_and_missed_without():
    boxes = small_objects()
    image = large_image(boxes)
    detector = BlobDetector().eval()
    [plain] = detector([image])
    tiled = TiledDetector(detector, TILE, overlap=0.2, batch_size=8).eval()
    [found] = tiled([image])
    print(f"recall without tiles {recall(plain, boxes):.2f}, with tiles {recall(found, boxes):.2f}")
    assert recall(plain, boxes) == 0.0  # every object averaged away at 256 / 2000
    assert recall(found, boxes) == 1.0 and len(found["boxes"]) == len(boxes)  # each once, seams and overlaps too
    assert found["scores"].tolist() == sorted(found["scores"].tolist(), reverse=True)
    with pytest.raises(RuntimeError, match="eval"):
        tiled.train()([image])


def test_an_object_on_a_seam_is_reported_once_and_whole():
    # tiles start at x = 0, 194, 388, ...: the first ends at 256, the second at 450
    assert [t[0] for t in tile_grid(TILE, SIZE, TILE, 0.2)][:3] == [0, 194, 388]
    seam = (252, 100, 252 + OBJECT, 100 + OBJECT)  # crosses x = 256: a fragment on tile 1, whole on tile 2
    overlap = (200, 300, 200 + OBJECT, 300 + OBJECT)  # whole on both tiles: the merge removes the copy
    big = (1000, 1000, 1300, 1300)  # larger than a tile: in pieces on every tile it touches
    image = large_image([seam, overlap, big])
    for merge in ("nms", "vote"):
        [found] = TiledDetector(BlobDetector(), TILE, merge=merge).eval()([image])
        boxes = found["boxes"].tolist()
        assert sum(box[0] < 500 for box in boxes) == 2, boxes  # the seam and the overlap object, once each
        assert [252, 100, 258, 106] in boxes and [200, 300, 206, 306] in boxes
        assert sum(box[0] >= 1000 - 1 for box in boxes) > 1  # the big square, in pieces (see full_image)

    [found] = TiledDetector(BlobDetector(), TILE, full_image=True).eval()([image])
    big_found = [box for box in found["boxes"].tolist() if box[0] >= 900]
    assert len(big_found) == 1 and big_found[0] == pytest.approx(big, abs=SIZE / TILE)  # pieces dropped: once


def test_masks_are_pasted_into_the_whole_image():
    boxes = [(252, 100, 258, 106), (1500, 1700, 1506, 1706), (1990, 0, 1996, 6)]  # a seam, inside, the corner
    image = large_image(boxes)
    [found] = TiledDetector(BlobDetector(masks=True), TILE).eval()([image])
    masks = found["masks"]
    assert masks.shape == (3, 1, SIZE, SIZE) and masks.dtype == torch.bool
    for mask, box in zip(masks, found["boxes"].int().tolist()):
        expected = torch.zeros((SIZE, SIZE), dtype=torch.bool)
        expected[box[1] : box[3], box[0] : box[2]] = True
        assert box in [list(b) for b in boxes] and torch.equal(mask[0], expected)


def test_engine_evaluate_and_predict_take_a_tiled_detector():
    """What train.py --test-only does with model = TiledDetector(model): engine.evaluate, unchanged."""
    boxes = small_objects(count=10, seed=1)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.ones(len(boxes), dtype=torch.int64),
        "image_id": 1,
        "area": torch.full((len(boxes),), float(OBJECT * OBJECT)),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
    }
    loader = torch.utils.data.DataLoader([(large_image(boxes), target)], batch_size=1, collate_fn=utils.collate_fn)
    device = torch.device("cpu")
    plain = engine.evaluate(BlobDetector(), loader, device, class_names=["blob"])
    tiled = engine.evaluate(TiledDetector(BlobDetector(), TILE), loader, device, class_names=["blob"])
    print(f"AP without tiles {plain['bbox']['AP']:.3f}, with tiles {tiled['bbox']['AP']:.3f}")
    assert plain["bbox"]["AP"] == 0 and tiled["bbox"]["AP"] > 0.9

    model = TiledDetector(BlobDetector(), TILE).eval()
    model.class_names = ["blob"]
    [result] = predict.predict(model, [large_image(boxes)], score_thresh=0.5, max_det=4)
    assert len(result["boxes"]) == 4 and result["names"] == ["blob"] * 4
    assert model.detections_per_img == 100 and model.model.score_thresh == 0.05  # put back afterwards


def write_coco_dataset(root):
    """Two 320 x 200 PNGs with polygon-segmented rectangles, and one without objects -> (json path, image folder)."""
    objects = {
        1: [(10, 10, 40, 30), (110, 60, 160, 100)],  # the second crosses the seams at x = 128 and 64 of 128 px tiles
        2: [(300, 150, 320, 200)],  # in the bottom-right corner
        3: [],
    }
    images, annotations = [], []
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, boxes in objects.items():
        pixels = rng.integers(0, 60, size=(200, 320, 3), dtype=np.uint8)
        for x1, y1, x2, y2 in boxes:
            pixels[y1:y2, x1:x2] = 200
            polygon = [x1, y1, x2, y1, x2, y2, x1, y2]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": 7, "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "segmentation": [polygon]}
            )  # fmt: skip
        Image.fromarray(pixels).save(root / "images" / f"img{image_id}.png")
        images.append({"id": image_id, "file_name": f"img{image_id}.png", "width": 320, "height": 200})
    ann_file = root / "instances.json"
    categories = [{"id": 7, "name": "box"}]
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file, root / "images"


def test_convert_dataset_cuts_coco_into_training_tiles(tmp_path, capsys):
    ann_file, images = write_coco_dataset(tmp_path / "coco")
    out = tmp_path / "tiles" / "train.json"
    argv = ["--from", "coco", "--ann-file", ann_file, "--img-prefix", images, "--to", "coco", "--out", out]
    argv += ["--tile", 128, "--tile-overlap", 0.5, "--min-visible", 0.3, "--max-empty-share", 0.2, "--workers", 1]
    counts = convert_dataset.main(convert_dataset.get_args_parser().parse_args([str(a) for a in argv]))
    assert "images: " in capsys.readouterr().out

    data = json.loads(out.read_text())
    assert data["categories"] == [{"id": 7, "name": "box"}]
    tiles = {im["id"]: im for im in data["images"]}
    assert len(tiles) == counts["tiles"] and all(im["width"] == im["height"] == 128 for im in tiles.values())
    # 320 x 200 at 128 px, overlap 0.5: x at 0, 64, 128, 192; y at 0, 36, 72 -> 12 tiles per image, 36 in all
    empty = [i for i in tiles if not any(a["image_id"] == i for a in data["annotations"])]
    assert counts["tiles"] + counts["empty_dropped"] == 36 and len(empty) == counts["empty_tiles"]
    assert len(empty) <= 0.2 * len(tiles) and counts["empty_tiles"] > 0  # the share, reached

    by_name = {im["file_name"]: im["id"] for im in data["images"]}
    anns = {name: [a for a in data["annotations"] if a["image_id"] == i] for name, i in by_name.items()}
    # (110, 60, 160, 100) on the tile at (64, 0): clipped to 46 x 40 at (46, 60), and exactly its pixels in the mask
    [ann] = anns["img1_64_0.png"]
    assert ann["bbox"] == [46, 60, 50, 40] and ann["area"] == 50 * 40 and ann["segmentation"]["size"] == [128, 128]
    mask = mask_util.decode(ann["segmentation"])
    assert mask.sum() == 50 * 40 and mask[60:100, 46:96].all()
    # on the tile at (128, 0) it keeps 32 of its 50 px width (64% >= 30%); the tile at (0, 0) holds 18 px (36%)
    assert [a["bbox"] for a in anns["img1_128_0.png"]] == [[0, 60, 32, 40]]
    assert [a["bbox"] for a in anns["img1_0_0.png"]] == [[10, 10, 30, 20], [110, 60, 18, 40]]
    assert anns.get("img1_0_72.png", []) == []  # there 18 x 28 px: 25% of the box, a remnant (an empty tile now)
    pixels = np.asarray(Image.open(out.with_suffix("") / "img1_64_0.png"))
    assert np.array_equal(pixels, np.asarray(Image.open(images / "img1.png"))[0:128, 64:192])

    # (300, 150, 320, 200) keeps 14 of its 50 px height (28%) on the tile at y = 36: only the one at (192, 72) has it
    assert [a["bbox"] for name in anns for a in anns[name] if name.startswith("img2")] == [[108, 78, 20, 50]]

    dataset = CocoDetection(out.with_suffix(""), out, masks=True)  # as train.py loads it, masks included
    assert len(dataset) == len(tiles) and dataset.classes == ["box"]
    [index] = [k for k, record in enumerate(dataset.images) if record["id"] == by_name["img2_192_72.png"]]
    image, target = dataset[index]
    assert image.shape == (3, 128, 128) and target["boxes"].tolist() == [[108, 78, 128, 128]]
    assert target["masks"].shape == (1, 128, 128) and target["masks"].sum() == 20 * 50

    argv[argv.index("coco", 3)] = "custom"  # --to custom
    with pytest.raises(SetupError, match="--tile cuts a COCO dataset into COCO tiles"):
        convert_dataset.main(convert_dataset.get_args_parser().parse_args([str(a) for a in argv]))
