"""Proposal recall: how many ground-truth boxes the RPN's proposals cover, the ceiling of what the box head can find
(train.py --eval proposal, to tune anchors; mmdetection's proposal metric).

    metrics = proposals.evaluate_proposals(model, val_loader, device)   # {"AR@100": .., "AR@300": .., ...}

Delete this file and its call in train.py and --eval takes bbox only.
"""

import contextlib
import io

import torch
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.transform import resize_boxes

import engine
import utils


def rpn_proposals(model, images):
    """Run `model` (eval mode) on `images`; its RPN's proposals, one [P, 4] XYXY per image in that image's pixels.

    They come best objectness first (the RPN's filter_proposals sorts them; P <= its post_nms_top_n, 1000 by
    default). The RPN sees the images as model.transform resized them, so they are mapped back as the model's
    postprocess maps its detections.
    """
    rpn = (model.module if hasattr(model, "module") else model).rpn  # DDP keeps the model in .module
    captured = []  # per RPN call: (proposals [P, 4] per image in resized pixels, resized (h, w) per image)
    hook = rpn.register_forward_hook(lambda module, args, output: captured.append((output[0], args[0].image_sizes)))
    try:
        model(images)
    finally:
        hook.remove()
    ((boxes, sizes),) = captured
    return [resize_boxes(b.float(), size, image.shape[-2:]) for b, size, image in zip(boxes, sizes, images)]


def _average_recall(coco_eval, area_index, max_dets_index):
    # recall [IoU thresholds, 1 (any class), areas, max_dets]; -1 where that area has no ground truth
    recall = coco_eval.eval["recall"][:, 0, area_index, max_dets_index]
    return float(recall.mean()) if (recall > -1).all() else float("nan")


@torch.inference_mode()
def evaluate_proposals(model, data_loader, device, max_dets=(100, 300, 1000), amp_dtype=None, print_freq=50):
    """Recall of the RPN's proposals against every ground-truth box, of any class: what the box head can still find.

    COCOeval (bbox, useCats=0) matches each image's best N proposals (by objectness) to its boxes; AR is the recall
    averaged over IoU .50:.95, as mmdetection's proposal metric. AR@N for N above the RPN's post_nms_top_n
    (rpn_post_nms_top_n_test, 1000 by default) equals AR@post_nms_top_n. Under torchrun each rank scores its share
    and results are gathered as in `evaluate`. Returns {"AR@100": .., "AR@300": .., "AR@1000": .., "AR_s@1000": ..,
    "AR_m@1000": .., "AR_l@1000": ..} (small / medium / large objects: area < 32^2, < 96^2, above, in pixels).
    """
    model.eval()
    metric_logger = utils.MetricLogger()
    per_image = {}  # image_id -> (image entry, ground-truth annotations, proposals as COCO results)
    for images, targets in metric_logger.log_every(data_loader, print_freq, "Proposals:"):
        images, targets, _ = engine.readable(images, targets)
        if not images:
            continue
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            proposals = rpn_proposals(model, images)
        for image, target, boxes in zip(images, targets, proposals):
            # only the order matters to recall: score 1 for the best proposal, falling with the rank
            scores = (1 - torch.arange(len(boxes)) / max(len(boxes), 1)).tolist()
            results = [
                {"image_id": target["image_id"], "category_id": 1, "bbox": box, "score": score}
                for box, score in zip(engine.xywh(boxes), scores)
            ]
            per_image[target["image_id"]] = (*engine.ground_truth(target, *image.shape[-2:]), results)

    gathered = engine.gather_records(per_image)
    return engine.share(_score_proposals(*gathered[:3], max_dets) if gathered is not None else None, detections=False)


def _score_proposals(images, annotations, proposals, max_dets):
    """evaluate_proposals' recall of the gathered proposals, on rank 0."""
    # the categories only have to exist: with useCats = 0 every proposal is matched against every box
    num_labels = max([ann["category_id"] for ann in annotations], default=1)
    class_names = [str(k) for k in range(1, num_labels + 1)]
    coco_gt = engine.coco_from_records(images, annotations, class_names)
    coco_eval = COCOeval(coco_gt, engine.load_results(coco_gt, images, proposals, class_names), "bbox")
    coco_eval.params.useCats = 0
    coco_eval.params.maxDets = list(max_dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    results = {f"AR@{n}": _average_recall(coco_eval, 0, m) for m, n in enumerate(max_dets)}
    for area, size in ((1, "s"), (2, "m"), (3, "l")):  # COCOeval's area ranges: all, small, medium, large
        results[f"AR_{size}@{max_dets[-1]}"] = _average_recall(coco_eval, area, len(max_dets) - 1)
    print("Proposal recall (any class, averaged over IoU .50:.95):")
    print("  " + " ".join(f"{name:>10}" for name in results))
    print("  " + " ".join(f"{value * 100:10.1f}" for value in results.values()))
    return results
