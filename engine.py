"""The training loop (`train_one_epoch`) and COCO evaluation (`evaluate`) for any dataset that follows the contract."""

import contextlib
import io
import json
import math
import os
from collections import defaultdict
from unittest import mock

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

import utils

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# COCOeval's 10 keypoint stats: no small objects (keypoints are not labelled on them), one maxDets (20)
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def stat_names(iou_type):
    """The names of COCOeval.stats, in order, for bbox / segm (12) or keypoints (10)."""
    return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES


PASTE = "torchvision.models.detection.transform.paste_masks_in_image"  # where the models' postprocess finds it
PER_INSTANCE_KEYS = ("boxes", "labels", "masks", "keypoints", "area", "iscrowd")


def _to_device(target, device):
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def _readable(images, targets):
    """Drop the samples SkipBadImages marked unreadable (None); returns (images, targets, number dropped)."""
    keep = [i for i, target in enumerate(targets) if target is not None]
    return [images[i] for i in keep], [targets[i] for i in keep], len(targets) - len(keep)


def _without_crowd(target):
    # Crowd / ignored regions are ground truth for evaluation only: torchvision's R-CNN losses have no "ignore"
    # label, so training on them would teach the model that a crowd is one object.
    if "iscrowd" not in target or not target["iscrowd"].any():
        return target
    keep = target["iscrowd"] == 0
    return {k: v[keep] if k in PER_INSTANCE_KEYS else v for k, v in target.items()}


def train_one_epoch(
    model,
    optimizer,
    data_loader,
    device,
    epoch,
    print_freq,
    scaler=None,
    amp_dtype=None,
    log_file=None,
    first_step=0,
    should_stop=None,
    max_nonfinite=0,
):
    """One pass over `data_loader`; the first epoch warms the lr up linearly from lr/1000 over <= 1000 steps.

    Returns the epoch's mean of each loss (and of lr) and "steps": the steps of this epoch done so far. Every
    `print_freq` steps the current values are also appended to the JSON-lines `log_file` (rank 0).
    first_step: steps of this epoch done before a resume (the loader already skips their batches).
    should_stop(): checked after every step (a signal arrived); when true the epoch ends early, "steps" says where.
    A non-finite loss raises FloatingPointError naming the batch's image ids and every loss value; with
    max_nonfinite > 0, that many such steps are skipped (not applied) first, each reported.
    """
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    # Fresh heads on pretrained features give large early gradients: ramp the lr up over the first epoch.
    warmup_iters = min(1000, first_step + len(data_loader) - 1) if epoch == 0 else 0
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    step, skipped, unreadable = first_step, 0, 0
    for images, targets in metric_logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]"):
        images, targets, bad = _readable(images, targets)
        unreadable += bad
        # every image of this batch was unreadable (--skip-bad-images): skip the step if every rank's was; else
        # this rank steps on a blank image with a zero loss, joining DDP's gradient all-reduce like the others
        if not utils.any_rank(images):
            step += 1
            continue
        empty = not images
        if empty:
            images, targets = _blank_sample(model)
        if step < warmup_iters:  # lr/1000 at step 0, rising linearly to lr at step warmup_iters
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * (1e-3 + (1 - 1e-3) * step / warmup_iters)
        elif step == warmup_iters and epoch == 0:
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"]
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [_without_crowd(_to_device(t, device)) for t in targets]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        if empty:
            loss_dict = {k: v * 0.0 for k, v in loss_dict.items()}
        loss = sum(loss_dict.values())

        loss_dict_reduced = utils.reduce_dict(loss_dict)  # averaged over ranks: every rank takes the same decision
        loss_value = sum(loss_dict_reduced.values()).item()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if not math.isfinite(loss_value):
            losses = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict_reduced.items())
            problem = f"loss is {loss_value} at epoch {epoch} on images {[t['image_id'] for t in targets]} ({losses})"
            if skipped >= max_nonfinite:
                raise FloatingPointError(f"{problem}.\n  Check those images' boxes, lower --lr, or --skip-nonfinite N.")
            skipped += 1
            print(f"Skipped step {step - 1}: {problem} ({skipped} of {max_nonfinite} allowed)")
            continue
        if scaler is not None:  # fp16 on CUDA: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        metric_logger.update(loss=loss_value, **loss_dict_reduced)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        if log_file and (step - 1) % print_freq == 0 and utils.is_main_process():
            record = {"epoch": epoch, "iter": step - 1, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}
            record.update({k: v.item() for k, v in loss_dict_reduced.items()})
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if should_stop is not None and should_stop():
            break
    metric_logger.synchronize_between_processes()
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    return {**stats, "steps": step, "nonfinite_skipped": skipped, "unreadable_skipped": unreadable}


def _blank_sample(model):
    """A 64x64 black image without objects, and its target with every field the model's heads read."""
    heads = getattr(getattr(model, "module", model), "roi_heads", None)
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "image_id": -1}
    if heads is not None and heads.has_mask():
        target["masks"] = torch.zeros((0, 64, 64), dtype=torch.uint8)
    if heads is not None and heads.has_keypoint():
        target["keypoints"] = torch.zeros((0, heads.keypoint_predictor.kps_score_lowres.out_channels, 3))
    return [torch.zeros(3, 64, 64)], [target]


@torch.no_grad()
def validation_loss(model, data_loader, device, amp_dtype=None):
    """Mean losses on the validation set, comparable with the training losses.

    torchvision's R-CNN models return losses only in training mode, so this runs them in training mode without
    gradients, with every BatchNorm layer kept in eval mode so validation images do not move its statistics.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    totals = defaultdict(float)  # loss name -> sum over this rank's batches; "batches" counts them
    for images, targets in data_loader:
        images, targets, _ = _readable(images, targets)
        if not images:  # no collective inside this loop: ranks may see different numbers of batches
            continue
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [_without_crowd(_to_device(t, device)) for t in targets]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_dict = model(images, targets)
        for name, value in {"loss": sum(loss_dict.values()), **loss_dict}.items():
            totals[name] += float(value)
        totals["batches"] += 1
    model.eval()
    merged = defaultdict(float)  # every rank's sums, even from a rank that had nothing to score
    for part in utils.all_gather(dict(totals)):
        for name, value in part.items():
            merged[name] += value
    batches = merged.pop("batches", 0)
    return {name: value / batches for name, value in merged.items()}


# ------------------------------------------------------------------------------------------------ evaluation
def _encode_masks(masks):
    """uint8/bool [N, H, W] -> COCO RLEs with str counts (json-ready)."""
    masks = masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)  # a view: no copy
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy()))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def paste_masks(masks, boxes, image_size, padding=1):
    """The model's masks pasted into the image and cut at 0.5: bool [N, 1, H, W], computed only inside each box.

    The same numbers as torchvision's paste_masks_in_image followed by `> 0.5` (same box expansion, same bilinear
    resize), without its full-image float mask per detection: with 100 detections per image those writes were most of
    the evaluation time. The result is a transposed view of an [N, W, H] array: each mask column-major, the order
    pycocotools' RLE encoder reads, so encoding needs no copy either.
    masks: probabilities [N, 1, M, M] (M = 28); boxes: float [N, 4] XYXY in the image's pixels.
    """
    n, _, m, _ = masks.shape
    height, width = image_size
    # one pixel of zero padding around each mask, and the box grown to match, as torchvision does
    padded = F.pad(masks, (padding,) * 4)
    centre, half = (boxes[:, :2] + boxes[:, 2:]) * 0.5, (boxes[:, 2:] - boxes[:, :2]) * 0.5 * ((m + 2 * padding) / m)
    pasted = torch.zeros(n, width, height, dtype=torch.bool, device=masks.device)
    for k, (x0, y0, x1, y1) in enumerate(torch.cat([centre - half, centre + half], 1).to(torch.int64).tolist()):
        size = (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))  # box pixels, both ends included
        inside = F.interpolate(padded[k : k + 1], size=size, mode="bilinear", align_corners=False)[0, 0] > 0.5
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)  # clipped to the image
        if cx1 > cx0 and cy1 > cy0:
            pasted[k, cx0:cx1, cy0:cy1] = inside[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].T
    return pasted.transpose(1, 2)[:, None]


def _xywh(boxes):
    boxes = boxes.float().cpu()
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def _ground_truth(target, height, width):
    """One image's COCO 'image' entry and annotations (ids are assigned later)."""
    anns = []
    masks = _encode_masks(target["masks"]) if "masks" in target else None
    for i, (box, label) in enumerate(zip(_xywh(target["boxes"]), target["labels"].tolist())):
        ann = {"image_id": target["image_id"], "bbox": box, "category_id": label}
        ann["area"] = float(target["area"][i]) if "area" in target else box[2] * box[3]
        ann["iscrowd"] = int(target["iscrowd"][i]) if "iscrowd" in target else 0
        if masks is not None:
            ann["segmentation"] = masks[i]
        if "keypoints" in target:  # COCOeval skips people whose keypoints are all unlabelled (visibility 0)
            ann["keypoints"] = target["keypoints"][i].flatten().tolist()
            ann["num_keypoints"] = int((target["keypoints"][i, :, 2] > 0).sum())
        anns.append(ann)
    return {"id": target["image_id"], "height": height, "width": width}, anns


def _detections(output, image_id):
    """One image's predictions as COCO result dicts; mask probabilities are cut at 0.5 as torchvision's eval does."""
    boxes, scores, labels = _xywh(output["boxes"]), output["scores"].tolist(), output["labels"].tolist()
    masks = [None] * len(scores)
    if "masks" in output:  # probabilities [N, 1, H, W], or already cut by paste_masks
        masks = _encode_masks(
            output["masks"][:, 0] if output["masks"].dtype == torch.bool else output["masks"][:, 0] > 0.5
        )
    keypoints = output["keypoints"].flatten(1).tolist() if "keypoints" in output else [None] * len(scores)
    results = []
    for box, score, label, mask, points in zip(boxes, scores, labels, masks, keypoints):
        result = {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
        if mask is not None:
            result["segmentation"] = mask
        if points is not None:
            result["keypoints"] = points
        results.append(result)
    return results


def coco_from_records(images, annotations, class_names):
    """A pycocotools COCO object built in memory (no json file) from image entries and annotations."""
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    coco = COCO()
    categories = [{"id": k, "name": name} for k, name in enumerate(class_names, start=1)]
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # silence "creating index..."
        coco.createIndex()
    return coco


def per_class_ap(coco_eval, class_names):
    """AP (IoU .50:.95) and AP50 per category, from COCOeval's precision array [T, R, K, areas, max_dets]."""
    precision = coco_eval.eval["precision"]
    table = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        all_iou, iou50 = precision[:, :, k, 0, -1], precision[0, :, k, 0, -1]  # area "all", 100 detections
        table[class_names[cat_id - 1]] = {
            "AP": float(all_iou[all_iou > -1].mean()) if (all_iou > -1).any() else float("nan"),
            "AP50": float(iou50[iou50 > -1].mean()) if (iou50 > -1).any() else float("nan"),
        }
    return table


def format_per_class(table, iou_type):
    lines = [f"{iou_type} AP per class:", f"  {'class':<24} {'AP':>6} {'AP50':>6}"]
    lines += [f"  {name:<24} {v['AP'] * 100:6.1f} {v['AP50'] * 100:6.1f}" for name, v in table.items()]
    return "\n".join(lines)


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


def _gather(per_image, flags=()):
    """{image_id: (image entry, annotations, results)} and boolean `flags` of every rank, on rank 0 only ->
    (images, annotations, results, each flag true on every rank); None on the other ranks, which have nothing to
    score (a rank with no image to score sends an empty dict: every rank joins the same collectives)."""
    parts = utils.gather_to_main((per_image, tuple(flags)))
    if parts is None:
        return None
    merged = {}
    for part, _ in parts:  # rank order; a padded duplicate keeps its first copy
        for image_id, record in part.items():
            merged.setdefault(image_id, record)
    records = list(merged.values())
    flags = tuple(all(values) for values in zip(*(f for _, f in parts)))
    return [r[0] for r in records], [a for r in records for a in r[1]], [d for r in records for d in r[2]], flags


def _share(results, detections=True):
    """Rank 0's metrics on every rank (without the detections, which only rank 0 writes out)."""
    summary = utils.broadcast_from_main(results and {k: v for k, v in results.items() if k != "detections"})
    return results if results is not None else {**summary, **({"detections": []} if detections else {})}


def _load_results(coco_gt, images, results, class_names):
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes writes ids and areas into the dicts it gets (copies keep ours clean) and cannot take an empty
        # list: an untrained model still gets its (zero) table
        if not results:
            return coco_from_records(images, [], class_names)
        return coco_gt.loadRes([dict(r) for r in results])


@torch.inference_mode()
def evaluate(
    model,
    data_loader,
    device,
    class_names=None,
    amp_dtype=None,
    print_freq=50,
    voc_metric=False,
    show_dir=None,
    show_count=None,
    show_thresh=0.5,
):
    """Run the model over `data_loader` and score it with pycocotools (bbox, plus segm for mask models).

    Ground truth is built from the targets the loader yields, so any dataset that follows the contract works.
    Under torchrun each rank evaluates its share; results are gathered and the duplicates that the sampler's
    padding adds are dropped, so the numbers equal a single-process evaluation. `voc_metric` adds Pascal VOC's
    mAP@0.5 ("voc_mAP50", "voc_ap50_per_class"). `show_dir` receives drawn predictions (score >= show_thresh, ground
    truth in red) of the first `show_count` images (all when None) as {image_id}.png. Returns
    {"bbox": {"AP": .., "AP50": .., ...}, "bbox_per_class": {name: {"AP": .., "AP50": ..}}, ..., "detections": [...]}
    """
    model.eval()
    metric_logger = utils.MetricLogger()
    if show_dir:
        os.makedirs(show_dir, exist_ok=True)
    per_image = {}  # image_id -> (image entry, ground-truth annotations, detections)
    # A torchvision R-CNN pastes its masks through this one function; answer with cut masks (not under TTA, which
    # averages probabilities)
    plain = isinstance(getattr(model, "module", model), GeneralizedRCNN)
    lean_masks = mock.patch(PASTE, paste_masks) if plain else contextlib.nullcontext()
    # segm / keypoints are scored when the model predicts them and the dataset has them
    score_masks = score_keypoints = True
    for images, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images, targets, _ = _readable(images, targets)
        if not images:
            continue
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None), lean_masks:
            outputs = model(images)
        for image, target, output in zip(images, targets, outputs):
            output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
            score_masks = score_masks and "masks" in output and "masks" in target
            score_keypoints = score_keypoints and "keypoints" in output and "keypoints" in target
            image_entry, anns = _ground_truth(target, *image.shape[-2:])
            per_image[target["image_id"]] = (image_entry, anns, _detections(output, target["image_id"]))
            if show_dir and (show_count is None or len(per_image) <= show_count):
                drawn = utils.draw_predictions(image, output, class_names or [], show_thresh, target=target)
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(
                    os.path.join(show_dir, f"{target['image_id']}.png")
                )

    gathered = _gather(per_image, (score_masks, score_keypoints))
    return _share(_score(*gathered, class_names, voc_metric) if gathered is not None else None)


def _score(images, annotations, detections, flags, class_names, voc_metric):
    """evaluate's COCO (and VOC) scoring of the gathered detections, on rank 0."""
    score_masks, score_keypoints = flags
    if class_names is None:
        class_names = [str(k) for k in range(1, max([a["category_id"] for a in annotations], default=0) + 1)]
    iou_types = ["bbox"] + ["segm"] * score_masks + ["keypoints"] * score_keypoints
    coco_gt = coco_from_records(images, annotations, class_names)
    results = {"detections": detections}
    for iou_type in iou_types:
        coco_eval = COCOeval(coco_gt, _load_results(coco_gt, images, detections, class_names), iou_type)
        with contextlib.redirect_stdout(io.StringIO()):  # keep the summary, drop pycocotools' progress chatter
            coco_eval.evaluate()
            coco_eval.accumulate()
        print(f"IoU metric: {iou_type}")
        coco_eval.summarize()
        results[iou_type] = dict(zip(stat_names(iou_type), (float(s) for s in coco_eval.stats), strict=True))
        results[f"{iou_type}_per_class"] = per_class_ap(coco_eval, class_names)
        print(format_per_class(results[f"{iou_type}_per_class"], iou_type))
    if voc_metric:
        results["voc_ap50_per_class"] = voc_ap50(annotations, detections, class_names)
        results["voc_mAP50"] = float(np.nanmean(list(results["voc_ap50_per_class"].values())))
        print("VOC AP@0.5 per class (area under the interpolated precision-recall curve):")
        for name, ap in results["voc_ap50_per_class"].items():
            print(f"  {name:<24} {ap * 100:6.1f}")
        print(f"  {'mAP@0.5':<24} {results['voc_mAP50'] * 100:6.1f}")
    return results


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
        images, targets, _ = _readable(images, targets)
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
                for box, score in zip(_xywh(boxes), scores)
            ]
            per_image[target["image_id"]] = (*_ground_truth(target, *image.shape[-2:]), results)

    gathered = _gather(per_image)
    return _share(_score_proposals(*gathered[:3], max_dets) if gathered is not None else None, detections=False)


def _score_proposals(images, annotations, proposals, max_dets):
    """evaluate_proposals' recall of the gathered proposals, on rank 0."""
    # the categories only have to exist: with useCats = 0 every proposal is matched against every box
    num_labels = max([ann["category_id"] for ann in annotations], default=1)
    class_names = [str(k) for k in range(1, num_labels + 1)]
    coco_gt = coco_from_records(images, annotations, class_names)
    coco_eval = COCOeval(coco_gt, _load_results(coco_gt, images, proposals, class_names), "bbox")
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
