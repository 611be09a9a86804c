"""Predictions drawn on their images: --show-dir, the validation images of report.md, predict.py, browse_dataset.py.

evaluate(model, loader, device, on_image=draw.ImageSaver("val_images", class_names, count=4))
"""

import os

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def draw_predictions(image, prediction, class_names, score_thresh=0.5, color="lime", target=None, gt_color="red"):
    """uint8 [3, H, W] image with the prediction's boxes, "name score" captions and masks drawn on it.

    `target` (optional ground truth) is drawn first, in `gt_color`, so a mistake shows as two colours.
    """

    def name(label):
        return class_names[label - 1] if 0 < label <= len(class_names) else str(label)

    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).to(torch.uint8)
    image = image.cpu()
    if target is not None and len(target["boxes"]):
        captions = [name(int(label)) for label in target["labels"]]
        image = draw_bounding_boxes(image, target["boxes"].cpu().float(), captions, colors=gt_color, width=2)
    keep = prediction["scores"] >= score_thresh
    if "masks" in prediction and keep.any():
        masks = prediction["masks"][keep].cpu()
        masks = masks[:, 0] > 0.5 if masks.dim() == 4 else masks.bool()  # model output: probabilities [N, 1, H, W]
        image = draw_segmentation_masks(image, masks, alpha=0.4, colors=color)
    if keep.any():
        captions = [
            f"{name(int(label))} {score:.2f}"
            for label, score in zip(prediction["labels"][keep], prediction["scores"][keep].tolist())
        ]
        image = draw_bounding_boxes(image, prediction["boxes"][keep].cpu().float(), captions, colors=color, width=2)
    return image


class ImageSaver:
    """engine.evaluate's `on_image`: saves the first `count` images (all when None) with their predictions (score >=
    `score_thresh`, in lime) and ground truth (in red) drawn, as FOLDER/{image_id}.png."""

    def __init__(self, folder, class_names, count=None, score_thresh=0.5):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.class_names, self.count, self.score_thresh, self.saved = (
            folder,
            class_names,
            count,
            score_thresh,
            0,
        )

    def __call__(self, image, target, output):
        if self.count is not None and self.saved >= self.count:
            return
        drawn = draw_predictions(image, output, self.class_names or [], self.score_thresh, target=target)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(os.path.join(self.folder, f"{target['image_id']}.png"))
        self.saved += 1
