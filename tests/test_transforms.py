import torch
from conftest import make_pennfudan
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

import transforms
from datasets.pennfudan import PennFudanDataset


def _check_consistent(image, target):
    """Boxes are the pixel extents of the masks, and the bright objects sit under the masks."""
    assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0]))
    inside = image[:, target["masks"].any(0).bool()]
    assert inside.float().mean() > 0.5  # objects are drawn with values 150-255, background 0-60


def test_hflip_moves_image_boxes_and_masks_together(tmp_path):
    make_pennfudan(tmp_path / "pf", num_images=3)
    raw = PennFudanDataset(tmp_path / "pf")
    flipped = PennFudanDataset(tmp_path / "pf", transforms=transforms.get_transform(True, hflip_prob=1.0))
    for idx in range(3):
        image0, target0 = raw[idx]
        image, target = flipped[idx]
        width = image0.shape[-1]
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert torch.allclose(image, image0.flip(-1).float() / 255)
        expected = target0["boxes"].clone()
        expected[:, [0, 2]] = width - target0["boxes"][:, [2, 0]]
        assert torch.equal(target["boxes"], expected)
        assert torch.equal(target["masks"], target0["masks"].flip(-1))
        _check_consistent(image, target)
        assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor  # plain tensors for the model


def test_eval_transform_only_converts(tmp_path):
    make_pennfudan(tmp_path / "pf", num_images=1)
    image0, target0 = PennFudanDataset(tmp_path / "pf")[0]
    image, target = transforms.get_transform(False)(image0, target0)
    assert torch.allclose(image, image0.float() / 255)
    assert torch.equal(target["boxes"], target0["boxes"].as_subclass(torch.Tensor))


def test_lsj_keeps_targets_consistent_and_drops_degenerate_boxes(tmp_path):
    make_pennfudan(tmp_path / "pf", num_images=4)
    ds = PennFudanDataset(tmp_path / "pf", transforms=transforms.get_transform(True, policy="lsj", lsj_size=96))
    torch.manual_seed(0)
    for _ in range(5):
        for idx in range(len(ds)):
            image, target = ds[idx]
            assert image.shape[-2:] == (96, 96)
            n = len(target["boxes"])
            assert all(len(target[k]) == n for k in ("labels", "masks", "area", "iscrowd"))
            if n:
                assert ((target["boxes"][:, 2:] - target["boxes"][:, :2]) >= 1).all()


def test_sanitize_drops_zero_size_box_with_its_fields():
    image = tv_tensors.Image(torch.zeros(3, 20, 20, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[2, 2, 10, 10], [5, 5, 5, 12]], format="XYXY", canvas_size=(20, 20))
    target = {
        "boxes": boxes,
        "labels": torch.tensor([1, 2]),
        "area": torch.tensor([64.0, 0.0]),
        "iscrowd": torch.tensor([0, 0]),
        "image_id": 0,
    }
    _, out = transforms.get_transform(True, hflip_prob=0.0)(image, target)
    assert out["labels"].tolist() == [1] and out["area"].tolist() == [64.0] and len(out["iscrowd"]) == 1


def test_flip_mirrors_keypoints_and_swaps_left_and_right():
    image = tv_tensors.Image(torch.zeros(3, 20, 30, dtype=torch.uint8))
    keypoints = torch.zeros(1, 17, 3)
    keypoints[0, 1] = torch.tensor([10.0, 5.0, 2.0])  # left eye at x = 10
    keypoints[0, 2] = torch.tensor([14.0, 5.0, 1.0])  # right eye at x = 14
    target = {
        "boxes": tv_tensors.BoundingBoxes([[8, 2, 16, 18]], format="XYXY", canvas_size=(20, 30)),
        "labels": torch.tensor([1]),
        "keypoints": keypoints,
        "image_id": 0,
    }
    _, out = transforms.HorizontalFlip(p=1.0)(image, target)
    assert out["keypoints"][0, 1].tolist() == [16.0, 5.0, 1.0]  # the new left eye is the mirrored right eye
    assert out["keypoints"][0, 2].tolist() == [20.0, 5.0, 2.0]
    assert out["boxes"].tolist() == [[14, 2, 22, 18]]
