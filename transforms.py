"""Train and eval presets on torchvision.transforms.v2.

Datasets return tv_tensors (Image, BoundingBoxes, Mask), so every v2 transform moves boxes and masks together with
the pixels. Person keypoints [N, 17, 3] are the exception: a mirrored left wrist is a right wrist, which v2 cannot
know, so `HorizontalFlip` mirrors them and swaps the sides; lsj refuses them. Resizing to the model's input size is not
done here: the R-CNN models resize inside (GeneralizedRCNNTransform, min_size 800 / max_size 1333 by default).
"""

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

# --data-augmentation policies. "multiscale" is not a dataset transform: the model's own resize would undo any
# resize done here, so models.prepare_model swaps the model's resize for multiscale.MultiScaleResize.
POLICIES = ("hflip", "photometric", "multiscale", "lsj")
# COCO person keypoints: nose, then (left, right) pairs of eyes, ears, shoulders, elbows, wrists, hips, knees, ankles
COCO_KEYPOINT_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


class HorizontalFlip(torch.nn.Module):
    """v2's horizontal flip for the image, boxes and masks; keypoints [N, J, 3] mirrored with left/right swapped."""

    def __init__(self, p=0.5, keypoint_flip=COCO_KEYPOINT_FLIP):
        super().__init__()
        self.p, self.keypoint_flip = p, list(keypoint_flip)

    def forward(self, image, target):
        if torch.rand(()) >= self.p:
            return image, target
        target = {k: F.horizontal_flip(v) if isinstance(v, tv_tensors.TVTensor) else v for k, v in target.items()}
        if "keypoints" in target:
            keypoints = target["keypoints"][:, self.keypoint_flip].clone()
            keypoints[..., 0] = image.shape[-1] - keypoints[..., 0]  # continuous x: pixel centre c -> W - c
            target["keypoints"] = keypoints
        return F.horizontal_flip(image), target


def _labels_and_per_box_fields(inputs):
    # SanitizeBoundingBoxes drops a box together with every tensor returned here (masks are found on their own)
    target = inputs[1]
    return tuple(target[k] for k in ("labels", "area", "iscrowd", "keypoints") if k in target)


def _finish(train):
    steps = []
    if train:
        # Clip boxes pushed past the border by a crop, then drop those left degenerate (< 1 px wide or high).
        steps += [T.ClampBoundingBoxes(), T.SanitizeBoundingBoxes(labels_getter=_labels_and_per_box_fields)]
    # uint8 [0, 255] -> float32 [0, 1]; the model normalises with ImageNet mean/std itself
    return steps + [T.ToDtype(torch.float32, scale=True), T.ToPureTensor()]


def get_transform(train, policy="hflip", hflip_prob=0.5, lsj_size=1024):
    """The transform applied to (image, target) pairs; `train=False` only converts the image to float. Policies:
    hflip (the tutorial's), photometric (hflip + colour jitter), multiscale (hflip here, sizes in the model's resize:
    extras/multiscale.py), lsj (large-scale jitter: resize by 0.1-2.0x of lsj_size, crop/pad to its square, hflip)."""
    if not train:
        return T.Compose(_finish(train=False))
    if policy not in POLICIES:
        raise ValueError(f"unknown data augmentation {policy!r}; choose one of: {', '.join(POLICIES)}")
    steps = [HorizontalFlip(hflip_prob)]
    if policy == "photometric":
        steps.append(T.RandomPhotometricDistort(p=0.5))
    elif policy == "lsj":
        steps = [
            T.ScaleJitter(target_size=(lsj_size, lsj_size), scale_range=(0.1, 2.0), antialias=True),
            T.RandomCrop(lsj_size, pad_if_needed=True),
        ] + steps
    return T.Compose(steps + _finish(train=True))
