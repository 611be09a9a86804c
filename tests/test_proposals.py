"""proposals.evaluate_proposals / rpn_proposals: RPN recall, with proposals mapped back from the resized input."""

import math

import pytest
import torch

import models
from extras.proposals import evaluate_proposals, rpn_proposals

# (height, width) and ground-truth boxes (XYXY pixels) of each image: small (< 32^2 px), medium and large objects
IMAGES = [
    ((240, 320), [[10.0, 20.0, 30.0, 40.0], [100.0, 50.0, 150.0, 110.0], [180.0, 100.0, 300.0, 200.0]]),
    ((200, 150), [[5.0, 5.0, 25.0, 21.0], [20.0, 40.0, 140.0, 150.0]]),
    ((120, 160), [[40.0, 30.0, 90.0, 100.0]]),
]


class TruthRPN(torch.nn.Module):
    """An RPN whose proposals are the ground truth (in the resized input, as a real RPN's), optionally moved right
    by `shift` x each box's width. Images come in loader order; records the resized sizes it saw."""

    def __init__(self, shift=0.0):
        super().__init__()
        self.shift, self.next, self.sizes = shift, 0, []

    def forward(self, images, features, targets=None):
        proposals = []
        for resized in images.image_sizes:
            (height, width), boxes = IMAGES[self.next % len(IMAGES)]
            self.next += 1
            boxes = torch.tensor(boxes)
            boxes[:, 0::2] += self.shift * (boxes[:, 2:3] - boxes[:, 0:1])
            scale = torch.tensor([resized[1] / width, resized[0] / height] * 2)
            proposals.append(boxes * scale)
            self.sizes.append(tuple(resized))
        return proposals, {}


def _model(rpn=None):
    torch.manual_seed(0)
    model = models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, weights="none", min_size=64)
    if rpn is not None:
        model.rpn = rpn
    return model.eval()


def _loader(batch_size=2):
    samples = []
    for i, ((height, width), boxes) in enumerate(IMAGES):
        boxes = torch.tensor(boxes)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([1 + k % 2 for k in range(len(boxes))]),
            "image_id": 7 + i,
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
        }
        samples.append((torch.rand(3, height, width), target))
    return [tuple(zip(*samples[i : i + batch_size])) for i in range(0, len(samples), batch_size)]


class Wrapped(torch.nn.Module):
    """Stands in for DistributedDataParallel, which keeps the model in .module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, images):
        return self.module(images)


def test_proposals_are_mapped_back_exactly():
    rpn = TruthRPN()
    images = [image for batch in _loader() for image in batch[0]]
    proposals = rpn_proposals(Wrapped(_model(rpn)), images)
    assert rpn.sizes == [(64, 85), (85, 64), (64, 85)]  # the model's resize (min_size 64) ran before the RPN
    for boxes, (_, truth) in zip(proposals, IMAGES):
        assert torch.allclose(boxes, torch.tensor(truth), atol=1e-4)


def test_ground_truth_proposals_give_recall_1():
    results = evaluate_proposals(_model(TruthRPN()), _loader(), torch.device("cpu"))
    assert set(results) == {"AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000"}
    assert all(value == pytest.approx(1.0) for value in results.values())


def test_proposals_off_by_more_than_iou_half_give_recall_0():
    # moved by 0.6 x their width: IoU 0.4 / 1.6 = 0.25 with their box, below every threshold of .50:.95
    results = evaluate_proposals(_model(TruthRPN(shift=0.6)), _loader(), torch.device("cpu"), max_dets=(1, 10))
    assert results == {"AR@1": 0.0, "AR@10": 0.0, "AR_s@10": 0.0, "AR_m@10": 0.0, "AR_l@10": 0.0}


def test_real_rpn_recall_is_a_fraction_growing_with_the_proposal_count(capsys):
    results = evaluate_proposals(_model(), _loader(batch_size=3), torch.device("cpu"), max_dets=(10, 100, 1000))
    assert 0 <= results["AR@10"] <= results["AR@100"] <= results["AR@1000"] <= 1
    assert all(0 <= value <= 1 for value in results.values() if not math.isnan(value))
    assert "AR_l@1000" in capsys.readouterr().out
