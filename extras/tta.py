"""Test-time augmentation: an R-CNN run on several views of each image (mirrored, other sizes), detections merged.

    model = tta.TTA(model, hflip=True, scales=(640, 800, 1000), merge="vote").eval()

train.py enters here with --tta / --tta-scales (`evaluate_with_tta`, the final evaluation scored with and without);
predict.py wraps its model the same way. Delete this file and those calls and nothing else changes.
"""

import torch
import torchvision

from engine import evaluate
from transforms import COCO_KEYPOINT_FLIP


class TTA(torch.nn.Module):
    """Test-time augmentation: run an R-CNN (eval mode) on several views of each image and merge the detections.

    Views: each min_size in `scales` (pixels of the shorter side; the model's own when None), each also on the
    horizontally flipped image when `hflip`. Every view's detections are mapped back to the original image's pixels
    and concatenated, then merged per class: "nms" keeps the best box of each overlapping group (IoU > iou_thresh),
    "vote" moves it to the score-weighted mean of the boxes of its class overlapping it by IoU >= iou_thresh.
    Either way a kept detection keeps its score and keypoints, and its mask is the mean of the mask probabilities of
    those overlapping detections (averaged before the usual 0.5 cut; with speed.PasteInBoxes the masks come cut, and
    the mean is a vote). At most `detections_per_img` are returned,
    best first, in the model's output format. Wrap the bare model (not DDP); every view's masks [N, 1, H, W] are
    held until the merge.
    """

    def __init__(
        self, model, hflip=True, scales=None, merge="nms", iou_thresh=0.5, detections_per_img=None, keypoint_flip=None
    ):
        super().__init__()
        if merge not in ("nms", "vote"):
            raise ValueError(f"unknown TTA merge {merge!r}; choose one of: nms, vote")
        if not hasattr(model, "transform") or not hasattr(model, "roi_heads"):
            raise ValueError("TTA wraps a torchvision R-CNN (pass the model itself, not its DDP wrapper)")
        # a mirrored left wrist is a right wrist: flipped keypoints need the left/right pairs (COCO's by default)
        self.keypoint_flip = list(COCO_KEYPOINT_FLIP if keypoint_flip is None else keypoint_flip)
        keypoint_predictor = getattr(model.roi_heads, "keypoint_predictor", None)
        if hflip and keypoint_predictor is not None:
            num_keypoints = keypoint_predictor.kps_score_lowres.out_channels
            if num_keypoints != len(self.keypoint_flip):
                raise ValueError(
                    f"the model predicts {num_keypoints} keypoints but keypoint_flip pairs {len(self.keypoint_flip)}: "
                    f"pass keypoint_flip (index of each keypoint's mirror image) or hflip=False"
                )
        self.model, self.hflip, self.merge, self.iou_thresh = model, hflip, merge, iou_thresh
        self.scales = tuple(int(s) for s in scales) if scales else (None,)
        self.detections_per_img = detections_per_img or model.roi_heads.detections_per_img

    def _unflip(self, output, width):
        """Detections on a flipped image -> detections on the image (`width` pixels wide)."""
        output = dict(output)
        x1, y1, x2, y2 = output["boxes"].unbind(1)
        output["boxes"] = torch.stack([width - x2, y1, width - x1, y2], dim=1)  # pixel extents mirror exactly
        if "masks" in output:  # [N, 1, H, W]
            output["masks"] = output["masks"].flip(-1)
        if "keypoints" in output:  # [N, K, 3] as (x, y, visible); continuous x mirrors as x -> W - x
            keypoints = output["keypoints"][:, self.keypoint_flip]
            keypoints[..., 0] = width - keypoints[..., 0]
            output["keypoints"] = keypoints
            output["keypoints_scores"] = output["keypoints_scores"][:, self.keypoint_flip]
        return output

    def _view(self, images, min_size=None, flip=False):
        """The model's detections on one view of `images`, in each original image's pixels."""
        resize = self.model.transform  # GeneralizedRCNNTransform: resizes inside the model, maps results back
        saved = resize.min_size, resize.max_size
        if min_size is not None:
            # max_size grows with min_size: with a fixed cap a wide image would reach it at every large scale and
            # those views would all be the same size
            resize.min_size, resize.max_size = (min_size,), round(saved[1] * min_size / saved[0][-1])
        try:
            outputs = self.model([image.flip(-1) for image in images] if flip else images)
        finally:
            resize.min_size, resize.max_size = saved
        if flip:
            outputs = [self._unflip(output, image.shape[-1]) for output, image in zip(outputs, images)]
        return outputs

    def _merge(self, views):
        """One image's detections from every view -> one set: per-class NMS or box voting, masks averaged."""
        return merge_detections(views, self.merge, self.iou_thresh, self.detections_per_img)

    @torch.no_grad()
    def forward(self, images):
        """images: list of float [3, H, W] -> list of {"boxes", "labels", "scores", ...}, as the wrapped model."""
        if self.model.training:
            raise RuntimeError("TTA is for inference only (there is no TTA loss): call .eval() on it first")
        flips = (False, True) if self.hflip else (False,)
        views = [self._view(images, scale, flip) for scale in self.scales for flip in flips]  # [view][image]
        return [self._merge([view[i] for view in views]) for i in range(len(images))]


def merge_detections(views, merge="nms", iou_thresh=0.5, detections_per_img=100):
    """One image's detections from several views (dicts of boxes [M_i, 4] in the image's pixels, labels, scores, ...)
    -> one dict: per-class NMS ("nms") or score-weighted box voting ("vote"), at most `detections_per_img`, best first.

    Every other key follows its kept detection, except masks [M_i, 1, H, W]: a kept mask is the mean of the masks of
    the detections that vote for it. extras/tiling.py merges its tiles' detections here too.
    """
    merged = {key: torch.cat([view[key] for view in views]) for key in views[0]}  # M detections
    boxes, scores, labels = merged["boxes"].float(), merged["scores"].float(), merged["labels"]
    keep = torchvision.ops.batched_nms(boxes, scores, labels, iou_thresh)[:detections_per_img]
    # members[k, m]: detection m is of kept detection k's class and overlaps it, so it votes for k's box / mask
    members = (torchvision.ops.box_iou(boxes[keep], boxes) >= iou_thresh) & (labels[keep, None] == labels)
    members[torch.arange(len(keep)), keep] = True  # a zero-area box has IoU nan with itself
    output = {key: value[keep] for key, value in merged.items() if key != "masks"}
    output["boxes"], output["scores"] = boxes[keep], scores[keep]
    if merge == "vote":
        weights = members * scores  # [K, M]
        output["boxes"] = weights @ boxes / weights.sum(1, keepdim=True)
    if "masks" in merged:
        masks = merged["masks"].float()  # [M, 1, H, W] probabilities
        mean = members.float() @ masks.flatten(1) / members.sum(1, keepdim=True)
        output["masks"] = mean.view(len(keep), *masks.shape[1:])
    return output


def evaluate_with_tta(model, data_loader, device, metrics, hflip=True, scales=None, merge="nms", **eval_options):
    """`metrics` (evaluate's, without TTA) plus "tta": the same evaluation of TTA(model), and the AP it changes."""
    # each process wraps its own replica (not DDP's wrapper); evaluate() gathers the merged detections
    print(f"Test-time augmentation: hflip {hflip}, scales {scales or 'the model size'}")
    tta_metrics = evaluate(TTA(model, hflip=hflip, scales=scales, merge=merge), data_loader, device, **eval_options)
    metrics["tta"] = {k: v for k, v in tta_metrics.items() if k != "detections"}
    for iou_type in ("bbox", "segm", "keypoints"):
        if iou_type in metrics:
            # the difference of the printed numbers, so that the line adds up
            before, after = (round(m[iou_type]["AP"] * 100, 1) for m in (metrics, metrics["tta"]))
            print(f"{iou_type} AP without TTA {before:.1f}, with TTA {after:.1f} ({after - before:+.1f})")
    return metrics
