"""Pascal VOC's metric: AP at IoU 0.5 per class and their mean, next to COCO's AP (train.py adds it for --dataset voc).

    engine.evaluate(model, loader, device, class_names=names, scorers=[voc_eval.score])

Delete this file and that argument in train.py and evaluation reports COCO's metrics only.
"""

from collections import defaultdict

import numpy as np
import torch
from torchvision.ops import box_iou


def voc_ap50(annotations, detections, class_names):
    """Pascal VOC AP at IoU 0.5 per class: the area under the precision-recall curve made monotone (VOC2010+ rule).

    Crowd / difficult ground truth is "don't care": a detection whose best match is one counts neither way.
    Boxes are COCO xywh in pixel extents (no VOC "+1"), as everywhere in this project.
    """

    def xyxy(boxes):
        boxes = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)

    table = {}
    for label, name in enumerate(class_names, start=1):
        truth = defaultdict(list)
        for ann in annotations:
            if ann["category_id"] == label:
                truth[ann["image_id"]].append(ann)
        gt_boxes = {image_id: xyxy([a["bbox"] for a in anns]) for image_id, anns in truth.items()}
        matched = {image_id: [False] * len(anns) for image_id, anns in truth.items()}
        num_positives = sum(not a["iscrowd"] for anns in truth.values() for a in anns)
        hits = []  # 1 = true positive, 0 = false positive, in order of decreasing score
        for det in sorted((d for d in detections if d["category_id"] == label), key=lambda d: -d["score"]):
            anns = truth.get(det["image_id"], [])
            if not anns:
                hits.append(0)
                continue
            ious = box_iou(xyxy(det["bbox"]), gt_boxes[det["image_id"]])[0]
            best = int(ious.argmax())
            if ious[best] < 0.5:
                hits.append(0)
            elif anns[best]["iscrowd"]:
                continue
            else:
                hits.append(0 if matched[det["image_id"]][best] else 1)
                matched[det["image_id"]][best] = True
        if num_positives == 0:
            table[name] = float("nan")
            continue
        tp = np.cumsum(hits, dtype=np.float64)
        recall = np.concatenate([[0.0], tp / num_positives, [1.0]])
        precision = np.concatenate([[0.0], tp / np.maximum(np.arange(1, len(hits) + 1), 1), [0.0]])
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
        steps = np.nonzero(recall[1:] != recall[:-1])[0]
        table[name] = float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))
    return table


def score(annotations, detections, class_names):
    """engine.evaluate's scorer: {"voc_ap50_per_class": {name: AP}, "voc_mAP50": mean over classes}, printed."""
    per_class = voc_ap50(annotations, detections, class_names)
    results = {"voc_ap50_per_class": per_class, "voc_mAP50": float(np.nanmean(list(per_class.values())))}
    print("VOC AP@0.5 per class (area under the interpolated precision-recall curve):")
    for name, ap in per_class.items():
        print(f"  {name:<24} {ap * 100:6.1f}")
    print(f"  {'mAP@0.5':<24} {results['voc_mAP50'] * 100:6.1f}")
    return results
