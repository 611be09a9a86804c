"""--out: the final evaluation's detections as a COCO results json (image_id, category_id, bbox, score,
segmentation), the file pycocotools' loadRes and the COCO evaluation server read. Delete this file and its call in
train.py and --out writes nothing.
"""

import json

import utils


def write_detections(path, metrics, dataset):
    """Write metrics["detections"] to `path` on rank 0; labels go back to the dataset's own category ids where it has
    them (a COCO json whose ids are not 1..K)."""
    if not utils.is_main_process() or "detections" not in metrics:
        return
    to_category = getattr(dataset, "label_to_category_id", None)
    detections = [
        {**d, "category_id": to_category[d["category_id"]] if to_category else d["category_id"]}
        for d in metrics["detections"]
    ]
    with open(path, "w") as f:
        json.dump(detections, f)
    print(f"Wrote {len(detections)} detections to {path}")
