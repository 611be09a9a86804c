"""tta.TTA: views mapped back exactly, merged by NMS or box voting, masks averaged before the 0.5 cut."""

from types import SimpleNamespace

import pytest
import torch

import models
import transforms
from extras.tta import TTA

TRUTH = [10.0, 8.0, 30.0, 28.0]  # the bright square of `_image`, XYXY pixel extents


def _image(height=40, width=48):
    image = torch.zeros(3, height, width)
    x1, y1, x2, y2 = (int(v) for v in TRUTH)
    image[0, y1:y2, x1:x2] = 1.0
    return image


class BiasedDetector(torch.nn.Module):
    """Finds the bright rectangle of channel 0 and reports it with errors we can compute by hand.

    The box is shifted right by min_size / 400 pixels (2 px at the model's own min_size 800) in the image it is
    given, so a flipped view errs to the left once mapped back. score = min_size / 1000, label 1, and the mask is
    `mask_prob` inside the reported box. Records the (min_size, max_size) of every call.
    """

    def __init__(self, mask_prob=0.6, fail_at=None):
        super().__init__()
        self.transform = SimpleNamespace(min_size=(800,), max_size=1333)
        self.roi_heads = SimpleNamespace(detections_per_img=100)
        self.mask_prob, self.fail_at, self.calls = mask_prob, fail_at, []

    def forward(self, images):
        min_size = self.transform.min_size[-1]
        self.calls.append((min_size, self.transform.max_size))
        if min_size == self.fail_at:
            raise MemoryError("out of memory at this scale")
        outputs = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            shift = min_size / 400
            box = torch.tensor([[xs.min() + shift, ys.min(), xs.max() + 1 + shift, ys.max() + 1]])
            masks = torch.zeros(1, 1, *image.shape[-2:])
            x1, y1, x2, y2 = box[0].int().tolist()
            masks[0, 0, y1:y2, x1:x2] = self.mask_prob
            scores = torch.tensor([min_size / 1000])
            outputs.append({"boxes": box, "labels": torch.tensor([1]), "scores": scores, "masks": masks})
        return outputs


def test_flipped_view_maps_back_exactly():
    tta = TTA(BiasedDetector()).eval()
    (plain,), (flipped,) = tta._view([_image()]), tta._view([_image()], flip=True)
    # the detector errs 2 px to the right of what it sees: to the right in the image, to the left in its mirror
    assert plain["boxes"].tolist() == [[12.0, 8.0, 32.0, 28.0]]
    assert flipped["boxes"].tolist() == [[8.0, 8.0, 28.0, 28.0]]
    assert (flipped["masks"][0, 0, 8:28, 8:28] == 0.6).all() and flipped["masks"].sum() == pytest.approx(0.6 * 400)


def test_scales_set_min_size_scale_max_size_and_are_restored():
    detector = BiasedDetector()
    TTA(detector, hflip=False, scales=(400, 1000)).eval()([_image()])
    assert detector.calls == [(400, 666), (1000, 1666)]  # max_size 1333 scaled by 400 / 800 and 1000 / 800
    assert (detector.transform.min_size, detector.transform.max_size) == ((800,), 1333)

    failing = BiasedDetector(fail_at=1000)
    with pytest.raises(MemoryError):
        TTA(failing, hflip=False, scales=(400, 1000)).eval()([_image()])
    assert (failing.transform.min_size, failing.transform.max_size) == ((800,), 1333)


def test_two_scales_merge_into_one_box():
    # min_size 400: box [11, 8, 31, 28] score 0.4; min_size 800: [12, 8, 32, 28] score 0.8; IoU 380 / 420
    nms = TTA(BiasedDetector(), hflip=False, scales=(400, 800), merge="nms").eval()([_image()])[0]
    assert nms["boxes"].tolist() == [[12.0, 8.0, 32.0, 28.0]] and nms["scores"].tolist() == [pytest.approx(0.8)]
    assert nms["labels"].tolist() == [1]

    vote = TTA(BiasedDetector(), hflip=False, scales=(400, 800), merge="vote").eval()([_image()])[0]
    x1, x2 = (0.4 * 11 + 0.8 * 12) / 1.2, (0.4 * 31 + 0.8 * 32) / 1.2  # score-weighted means
    assert vote["boxes"][0].tolist() == pytest.approx([x1, 8.0, x2, 28.0])
    assert vote["scores"].tolist() == [pytest.approx(0.8)]


def test_hflip_vote_cancels_a_left_right_bias():
    # [12, 8, 32, 28] and its mirror's [8, 8, 28, 28], equal scores: their mean is the true box
    output = TTA(BiasedDetector(), hflip=True, merge="vote").eval()([_image()])[0]
    assert output["boxes"].tolist() == [TRUTH]


def test_masks_are_averaged_before_thresholding():
    output = TTA(BiasedDetector(mask_prob=0.6), hflip=True).eval()([_image()])[0]
    masks = output["masks"]  # [1, 1, H, W]: the views' 0.6 over x 12..31 and over x 8..27
    row = masks[0, 0, 10]
    assert row[8:12].tolist() == pytest.approx([0.3] * 4) and row[28:32].tolist() == pytest.approx([0.3] * 4)
    assert row[12:28].tolist() == pytest.approx([0.6] * 16) and row[:8].sum() == row[32:].sum() == 0
    # cut at 0.5 after averaging: only where both views agree (thresholding first would keep x 8..31)
    assert torch.nonzero(row > 0.5).flatten().tolist() == list(range(12, 28))


def test_other_classes_and_distant_boxes_are_not_merged():
    tta = TTA(BiasedDetector(), merge="vote", detections_per_img=2).eval()
    views = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[20.0, 0, 30, 10], [1, 0, 11, 10]]), "labels": torch.tensor([1, 1])},
    ]
    views[0]["scores"], views[1]["scores"] = torch.tensor([0.9, 0.8]), torch.tensor([0.7, 0.3])
    output = tta._merge(views)  # kept: 0.9 (class 1, joined by the 0.3 box), 0.8 (class 2); 0.7 cut by the limit
    assert output["labels"].tolist() == [1, 2] and output["scores"].tolist() == pytest.approx([0.9, 0.8])
    assert output["boxes"][0].tolist() == pytest.approx([0.25, 0, 10.25, 10])  # (0.9 * 0 + 0.3 * 1) / 1.2, ...


def test_training_mode_and_bad_merge_fail_early():
    with pytest.raises(ValueError, match="nms, vote"):
        TTA(BiasedDetector(), merge="mean")
    with pytest.raises(RuntimeError, match="eval"):
        TTA(BiasedDetector()).train()([_image()])


def test_real_mask_rcnn_gives_valid_outputs():
    torch.manual_seed(0)
    model = models.get_model("maskrcnn_resnet50_fpn", num_classes=3, weights="none", min_size=64, max_size=96)
    tta = TTA(model, hflip=True, scales=(48, 64), merge="vote", detections_per_img=20).eval()
    images = [torch.rand(3, 60, 90), torch.rand(3, 72, 50)]
    outputs = tta(images)
    assert (model.transform.min_size, model.transform.max_size) == ((64,), 96)
    for image, output in zip(images, outputs):
        height, width = image.shape[-2:]
        boxes, scores = output["boxes"], output["scores"]
        assert 0 < len(boxes) <= 20 and set(output) == {"boxes", "labels", "scores", "masks"}
        eps = 1e-4  # a weighted mean of boxes at the border may land one float rounding past it
        assert (boxes[:, :2] >= -eps).all() and (boxes[:, :2] <= boxes[:, 2:]).all()
        assert (boxes[:, 2] <= width + eps).all() and (boxes[:, 3] <= height + eps).all()
        assert (scores[:-1] >= scores[1:]).all() and set(output["labels"].tolist()) <= {1, 2}
        assert output["masks"].shape == (len(boxes), 1, height, width)
        assert output["masks"].min() >= 0 and output["masks"].max() <= 1


def test_real_keypoint_rcnn_flips_keypoints_back():
    torch.manual_seed(0)
    model = models.get_model("keypointrcnn_resnet50_fpn", num_classes=2, weights="none", min_size=64, max_size=96)
    model.eval()
    image = torch.rand(3, 64, 80)
    tta = TTA(model, hflip=True).eval()
    (plain,) = model([image])
    (flipped,) = tta._view([image], flip=True)
    assert flipped["keypoints"].shape[1:] == (17, 3)
    # the model on the mirrored image, mapped back, equals mirroring its keypoints and swapping left and right
    (mirror,) = model([image.flip(-1)])
    expected = mirror["keypoints"][:, list(transforms.COCO_KEYPOINT_FLIP)]
    assert torch.equal(flipped["keypoints"][..., 0], 80 - expected[..., 0])
    assert torch.equal(flipped["keypoints"][..., 1], expected[..., 1]) and len(plain["boxes"]) > 0
    with pytest.raises(ValueError, match="keypoint_flip"):
        TTA(model, keypoint_flip=[0, 1])
