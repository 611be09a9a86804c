"""Dataset formats beyond the tutorial's Penn-Fudan and COCO json, each an extra that datasets.DATASETS imports when
--dataset names it: voc.py (Pascal VOC XML), custom.py (mmdetection's list of dicts), yolo.py (YOLO txt labels).

`BoxRecords` is what they share: a format parses its files into `self.items`, one dict per image, and BoxRecords
reads the image and returns the datasets/ contract. A new box format needs only that parsing.
"""

import torch
from torchvision import tv_tensors

from datasets.images import read_image
from utils import SetupError


class BoxRecords(torch.utils.data.Dataset):
    """Shared by VOCDetection and CustomDataset, which parse their files into `self.items`: one dict per image with
    path, height, width, boxes (float32 [N, 4] XYXY), labels and iscrowd. Subclasses say how to fix a wrong size."""

    def size_fix(self, item):
        raise NotImplementedError

    def masks(self, item):
        """uint8 [N, H, W] instance masks of an item, for a format that has them (yolo.py); None: boxes only."""
        return None

    def __len__(self):
        return len(self.items)

    def get_height_and_width(self, idx):
        item = self.items[idx]
        return item["height"], item["width"]

    def __getitem__(self, idx):
        item = self.items[idx]
        height, width = item["height"], item["width"]
        image = read_image(item["path"], "RGB")  # uint8 [3, H, W]
        if image.shape[-2:] != (height, width):  # boxes drawn on another size would train in the wrong place
            raise SetupError(f"{item['path']} is {image.shape[2]}x{image.shape[1]} pixels but {self.size_fix(item)}")
        boxes = item["boxes"].clone()  # a copy: a transform must never edit the stored boxes
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": item["labels"].clone(),
            "image_id": idx,
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": item["iscrowd"].clone(),
        }
        masks = self.masks(item)
        if masks is not None:  # the contract's area is the mask's where there is one
            target["masks"] = tv_tensors.Mask(masks)
            target["area"] = masks.sum(dim=(1, 2)).float()
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
