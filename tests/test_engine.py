import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.roi_heads import paste_masks_in_image

import engine
import models
import utils
from extras import speed, voc_eval


class FixedModel(torch.nn.Module):
    """Returns preset outputs per image_id; the images themselves are ignored."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, images):
        out = self.outputs[self.calls : self.calls + len(images)]
        self.calls += len(images)
        return out


def _dataset(num_images=4):
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(num_images):
        n = 1 + i % 3
        xy = torch.randint(0, 60, (n, 2), generator=gen).float()
        wh = torch.randint(10, 40, (n, 2), generator=gen).float()
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(n, 100, 100, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        labels = torch.randint(1, 3, (n,), generator=gen)
        target = {
            "boxes": boxes,
            "labels": labels,
            "masks": masks,
            "image_id": 10 + i,
            "area": masks.sum((1, 2)).float(),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
        }
        items.append((torch.zeros(3, 100, 100), target))
    return items


def _perfect(target):
    return {
        "boxes": target["boxes"],
        "labels": target["labels"],
        "scores": torch.ones(len(target["labels"])),
        "masks": target["masks"][:, None].float(),
    }


def test_perfect_predictions_give_ap_1():
    data = _dataset()
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=utils.collate_fn)
    model = FixedModel([_perfect(t) for _, t in data])
    metrics = engine.evaluate(model, loader, torch.device("cpu"), class_names=["a", "b"])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert set(metrics["bbox_per_class"]) == {"a", "b"}
    assert all(v["AP"] == pytest.approx(1.0) for v in metrics["bbox_per_class"].values())


def test_shifted_boxes_match_pycocotools(tmp_path):
    data = _dataset(6)
    outputs = []
    for i, (_, t) in enumerate(data):
        out = _perfect(t)
        out["boxes"] = t["boxes"] + torch.tensor([3.0 * i, -2.0, 3.0 * i, 4.0])  # growing shifts: partial credit
        out["scores"] = torch.linspace(0.9, 0.5, len(t["labels"]))
        del out["masks"]
        outputs.append(out)
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=utils.collate_fn)
    metrics = engine.evaluate(FixedModel(outputs), loader, torch.device("cpu"), class_names=["a", "b"])
    assert "segm" not in metrics and 0.05 < metrics["bbox"]["AP"] < 0.95

    # The same numbers straight from pycocotools, through json files written independently of engine.py
    images, anns, dets = [], [], []
    for (_, t), out in zip(data, outputs):
        images.append({"id": t["image_id"], "height": 100, "width": 100})
        for k, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": t["image_id"],
                    "category_id": int(t["labels"][k]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(t["area"][k]),
                    "iscrowd": 0,
                }
            )
        for (x1, y1, x2, y2), s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            dets.append({"image_id": t["image_id"], "category_id": lab, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
        )
    )
    coco_gt = COCO(str(gt_file))
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    assert [metrics["bbox"][name] for name in engine.STAT_NAMES] == pytest.approx(list(coco_eval.stats))


def test_no_detections_gives_zero():
    data = _dataset(2)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=utils.collate_fn)
    metrics = engine.evaluate(FixedModel([empty, empty]), loader, torch.device("cpu"), class_names=["a", "b"])
    assert metrics["bbox"]["AP"] == 0.0


def test_nonfinite_loss_names_images_and_losses():
    class NaNModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {"loss_classifier": self.w * float("nan"), "loss_box_reg": self.w * 0.5}

    data = _dataset(2)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=utils.collate_fn)
    model = NaNModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match=r"\[10, 11\].*loss_classifier=nan.*loss_box_reg=0.5"):
        engine.train_one_epoch(model, optimizer, loader, torch.device("cpu"), 0, 10)
    assert model.w.item() == 1.0  # the bad step was not applied


def test_voc_ap50_by_hand():
    # 2 positives and one difficult (crowd) box; detections by score: hit, miss, hit on the difficult one, hit.
    gt = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "iscrowd": 0},
        {"image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "iscrowd": 1},
    ]
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "score": 0.75},
        {"image_id": 1, "category_id": 1, "bbox": [51, 51, 10, 10], "score": 0.7},
    ]
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1 up to recall 1/2, then 2/3: AP = 1/2 + 1/3
    table = voc_eval.voc_ap50(gt, dets, ["a", "b"])
    assert table["a"] == pytest.approx(0.5 + 1 / 3)
    assert table["b"] != table["b"]  # no ground truth: NaN, left out of the mean
    assert voc_eval.voc_ap50(gt, dets[:1] + dets[3:], ["a"])["a"] == pytest.approx(1.0)


def test_paste_masks_equals_torchvision_paste_then_threshold():
    g = torch.Generator().manual_seed(0)
    for height, width in ((300, 400), (337, 379), (64, 48)):
        masks = torch.rand(60, 1, 28, 28, generator=g)
        corner = torch.rand(60, 2, generator=g) * torch.tensor([width, height])
        size = torch.rand(60, 2, generator=g) * torch.tensor([width / 2, height / 2])
        size[:5] = 0.3  # sub-pixel boxes
        boxes = torch.cat([corner, corner + size], 1)  # boxes hanging over the right and bottom edges are clipped,
        boxes[:, 0::2], boxes[:, 1::2] = (
            boxes[:, 0::2].clamp(0, width),
            boxes[:, 1::2].clamp(0, height),
        )  # as detections
        expected = paste_masks_in_image(masks, boxes, (height, width)) > 0.5
        pasted = speed.paste_masks(masks, boxes, (height, width))
        assert pasted.dtype == torch.bool and pasted.shape == expected.shape and torch.equal(pasted, expected)
        # each mask column-major in memory: what pycocotools encodes, and the RLE matches the thresholded probabilities
        assert pasted[:, 0].permute(1, 2, 0).numpy().flags["F_CONTIGUOUS"]
        assert engine.encode_masks(pasted[:, 0]) == engine.encode_masks(expected[:, 0])


def test_evaluate_scores_the_same_masks_as_torchvision_paste():
    """speed.PasteInBoxes, installed as the model's transform, gives evaluate() the masks torchvision's pasting does."""
    torch.manual_seed(0)
    model = models.get_model("maskrcnn_resnet50_fpn", num_classes=2, weights="none", min_size=64, max_size=96)
    model.roi_heads.score_thresh = 0.0  # every detection is kept: 100 masks per image
    loader = [
        (
            [torch.rand(3, 70, 90)],
            [
                {
                    "boxes": torch.tensor([[5.0, 5, 40, 50]]),
                    "labels": torch.tensor([1]),
                    "masks": torch.ones(1, 70, 90, dtype=torch.uint8),
                    "image_id": 1,
                }
            ],
        )
    ]
    reference = engine.evaluate(model, loader, torch.device("cpu"), ["a"])  # torchvision's paste_masks_in_image
    model.transform = speed.PasteInBoxes(model.transform)
    calls = []
    model.transform.register_forward_hook(lambda *args: calls.append(1))
    lean = engine.evaluate(model, loader, torch.device("cpu"), ["a"])
    assert calls == [1]
    model.eval()
    with torch.no_grad():
        (output,) = model(loader[0][0])
    assert output["masks"].dtype == torch.bool and output["masks"].shape == (100, 1, 70, 90)  # cut, in the image
    assert len(lean["detections"]) == 100
    assert [d["segmentation"] for d in lean["detections"]] == [d["segmentation"] for d in reference["detections"]]
    assert lean["segm"] == reference["segm"]
