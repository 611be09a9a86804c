"""The training loop (`train_one_epoch`) and COCO evaluation (`evaluate`) for any dataset that follows the contract."""

import contextlib
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import utils

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# COCOeval's 10 keypoint stats: no small objects (keypoints are not labelled on them), one maxDets (20)
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def stat_names(iou_type):
    """The names of COCOeval.stats, in order, for bbox / segm (12) or keypoints (10)."""
    return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES


PER_INSTANCE_KEYS = ("boxes", "labels", "masks", "keypoints", "area", "iscrowd")


def to_device(target, device):
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def readable(images, targets):
    """Drop the samples SkipBadImages marked unreadable (None); returns (images, targets, number dropped)."""
    keep = [i for i, target in enumerate(targets) if target is not None]
    return [images[i] for i in keep], [targets[i] for i in keep], len(targets) - len(keep)


def without_crowd(target):
    # Crowd / ignored regions are ground truth for evaluation only: torchvision's R-CNN losses have no "ignore"
    # label, so training on them would teach the model that a crowd is one object.
    if "iscrowd" not in target or not target["iscrowd"].any():
        return target
    keep = target["iscrowd"] == 0
    return {k: v[keep] if k in PER_INSTANCE_KEYS else v for k, v in target.items()}


def warm_up(optimizer, epoch, step, warmup_iters):
    """The first epoch's lr warm-up: lr/1000 at step 0, rising linearly to lr at step warmup_iters."""
    if epoch != 0 or step > warmup_iters:
        return
    for group in optimizer.param_groups:
        if step < warmup_iters:
            group["lr"] = group["initial_lr"] * (1e-3 + (1 - 1e-3) * step / warmup_iters)
        else:
            group["lr"] = group["initial_lr"]


def log_step(log_file, epoch, step, loss, loss_dict, lr):
    """One JSON line of the step's losses and lr in `log_file` (log.jsonl), between the epochs' lines."""
    record = {"epoch": epoch, "iter": step, "loss": loss, "lr": lr, **{k: v.item() for k, v in loss_dict.items()}}
    with open(log_file, "a") as f:
        f.write(json.dumps(record) + "\n")


def nonfinite(loss_value, loss_dict, epoch, step, targets, skipped, max_nonfinite):
    """A NaN/inf loss at `step`: FloatingPointError naming the images and every loss, unless it is one of the
    `max_nonfinite` steps --skip-nonfinite allows (`skipped` counts this one), which is reported and not applied."""
    losses = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())
    problem = f"loss is {loss_value} at epoch {epoch} on images {[t['image_id'] for t in targets]} ({losses})"
    if skipped > max_nonfinite:
        raise FloatingPointError(f"{problem}.\n  Check those images' boxes, lower --lr, or --skip-nonfinite N.")
    print(f"Skipped step {step}: {problem} ({skipped} of {max_nonfinite} allowed)")


def sync_gradients(model, sync):
    """DDP's no_sync() on the batches that do not step (--accumulate): gradients add up locally, all-reduced once."""
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def optimizer_step(optimizer, scaler=None):
    """Apply the gradients; with fp16 on CUDA the scaler unscales them and skips a step with inf/NaN in them."""
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def usable_batch(images, targets, model):
    """The batch's readable samples (--skip-bad-images marks the others None) -> (images, targets, blank, dropped).
    images is None when no rank has any: every rank skips the batch. When only this rank has none, it gets a `blank`
    sample to step on with a zero loss, joining DDP's gradient all-reduce like the others."""
    images, targets, dropped = readable(images, targets)
    if not utils.any_rank(images):
        return None, None, True, dropped
    if images:
        return images, targets, False, dropped
    from extras.skip_bad_images import blank_sample

    return *blank_sample(model), True, dropped


def train_one_epoch(model, optimizer, data_loader, device, epoch, print_freq, scaler=None, amp_dtype=None,
                    log_file=None, first_step=0, should_stop=None, max_nonfinite=0, accumulate=1,
                    after_step=None):  # fmt: skip
    """One pass over `data_loader`; the first epoch warms the lr up linearly from lr/1000 over <= 1000 steps.
    Returns the mean of each loss (and lr) and "steps", the batches of this epoch done; every `print_freq` steps the
    values also go to the JSON-lines `log_file`. first_step: batches done before a resume (the loader skips them).
    accumulate: batches per optimizer step; after_step() runs after each step (--ema), should_stop() ends the epoch
    there when true (a signal). A non-finite loss raises FloatingPointError naming the images and every loss, after
    `max_nonfinite` such batches have been skipped (each reported)."""
    model.train()
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    total = first_step + len(data_loader)
    # Fresh heads on pretrained features give large early gradients: ramp the lr up over the first epoch.
    warmup_iters = min(1000, math.ceil(total / accumulate) - 1) if epoch == 0 else 0
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    step, skipped, unreadable = first_step, 0, 0
    for images, targets in metric_logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]"):
        images, targets, blank, dropped = usable_batch(images, targets, model)
        unreadable, step = unreadable + dropped, step + 1
        stepping = step % accumulate == 0 or step == total  # the last batch of an accumulation window
        window = max(1, min(accumulate, total - (step - 1) // accumulate * accumulate))  # batches in this step
        if (step - 1) % accumulate == 0:  # a window starts (one whose last batch was skipped is dropped here)
            optimizer.zero_grad(set_to_none=True)
        if images is None:
            continue
        warm_up(optimizer, epoch, (step - 1) // accumulate, warmup_iters)
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [without_crowd(to_device(t, device)) for t in targets]
        with sync_gradients(model, stepping):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss_dict = model(images, targets)
            loss_dict = {k: v * 0.0 for k, v in loss_dict.items()} if blank else loss_dict
            loss_dict_reduced = utils.reduce_dict(loss_dict)  # averaged over ranks: every rank decides alike
            loss_value = sum(loss_dict_reduced.values()).item()
            if not math.isfinite(loss_value):
                skipped += 1
                nonfinite(loss_value, loss_dict_reduced, epoch, step - 1, targets, skipped, max_nonfinite)
                continue
            loss = sum(loss_dict.values()) / window  # the mean over the window's images, as one big batch would
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if stepping:
            optimizer_step(optimizer, scaler)
            if after_step is not None:
                after_step()
        metric_logger.update(loss=loss_value, **loss_dict_reduced, lr=optimizer.param_groups[0]["lr"])
        if log_file and (step - 1) % print_freq == 0 and utils.is_main_process():
            log_step(log_file, epoch, step - 1, loss_value, loss_dict_reduced, optimizer.param_groups[0]["lr"])
        if stepping and should_stop is not None and should_stop():
            break
    metric_logger.synchronize_between_processes()
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    return {**stats, "steps": step, "nonfinite_skipped": skipped, "unreadable_skipped": unreadable}


# ------------------------------------------------------------------------------------------------ evaluation
def encode_masks(masks):
    """uint8/bool [N, H, W] -> COCO RLEs with str counts (json-ready)."""
    masks = masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)  # a view: no copy
    rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy()))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def xywh(boxes):
    boxes = boxes.float().cpu()
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()


def ground_truth(target, height, width):
    """One image's COCO 'image' entry and annotations (ids are assigned later)."""
    anns = []
    masks = encode_masks(target["masks"]) if "masks" in target else None
    for i, (box, label) in enumerate(zip(xywh(target["boxes"]), target["labels"].tolist())):
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
    boxes, scores, labels = xywh(output["boxes"]), output["scores"].tolist(), output["labels"].tolist()
    masks = [None] * len(scores)
    if "masks" in output:  # probabilities [N, 1, H, W], or already cut by paste_masks
        masks = encode_masks(
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
    """AP (IoU .50:.95) and AP50 per category, from COCOeval's precision array [T, R, K, areas, max_dets]; printed."""
    precision = coco_eval.eval["precision"][..., 0, -1]  # area "all", 100 detections: [T, R, K], -1 where no objects
    table = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        ap = [p[p > -1].mean() if (p > -1).any() else float("nan") for p in (precision[:, :, k], precision[0, :, k])]
        table[class_names[cat_id - 1]] = {"AP": float(ap[0]), "AP50": float(ap[1])}
    print(f"{coco_eval.params.iouType} AP per class:\n  {'class':<24} {'AP':>6} {'AP50':>6}")
    print("\n".join(f"  {name:<24} {v['AP'] * 100:6.1f} {v['AP50'] * 100:6.1f}" for name, v in table.items()))
    return table


def gather_records(per_image, flags=()):
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


def share(results, detections=True):
    """Rank 0's metrics on every rank (without the detections, which only rank 0 writes out)."""
    summary = utils.broadcast_from_main(results and {k: v for k, v in results.items() if k != "detections"})
    return results if results is not None else {**summary, **({"detections": []} if detections else {})}


def load_results(coco_gt, images, results, class_names):
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes writes ids and areas into the dicts it gets (copies keep ours clean) and cannot take an empty
        # list: an untrained model still gets its (zero) table
        if not results:
            return coco_from_records(images, [], class_names)
        return coco_gt.loadRes([dict(r) for r in results])


@torch.inference_mode()
def evaluate(model, data_loader, device, class_names=None, amp_dtype=None, print_freq=50, scorers=(), on_image=None):
    """Run the model over `data_loader` and score it with pycocotools (bbox, plus segm / keypoints when predicted).
    Ground truth comes from the loader's targets, so any dataset that follows the contract works. Each rank evaluates
    its share; the sampler's padded duplicates are dropped, so the numbers equal one process's. `scorers`:
    f(annotations, detections, class_names) -> more metrics, on rank 0. `on_image(image, target, output)` sees every
    image. Returns {"bbox": {"AP": .., ...}, "bbox_per_class": {name: {"AP": .., "AP50": ..}}, .., "detections": []}
    """
    model.eval()
    metric_logger = utils.MetricLogger()
    per_image = {}  # image_id -> (image entry, ground-truth annotations, detections)
    # segm / keypoints are scored when the model predicts them and the dataset has them
    score_masks = score_keypoints = True
    for images, targets in metric_logger.log_every(data_loader, print_freq, "Test:"):
        images, targets, _ = readable(images, targets)
        if not images:
            continue
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images)
        for image, target, output in zip(images, targets, outputs):
            output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
            score_masks = score_masks and "masks" in output and "masks" in target
            score_keypoints = score_keypoints and "keypoints" in output and "keypoints" in target
            image_entry, anns = ground_truth(target, *image.shape[-2:])
            per_image[target["image_id"]] = (image_entry, anns, _detections(output, target["image_id"]))
            if on_image is not None:
                on_image(image, target, output)

    gathered = gather_records(per_image, (score_masks, score_keypoints))
    return share(_score(*gathered, class_names, scorers) if gathered is not None else None)


def _score(images, annotations, detections, flags, class_names, scorers):
    """evaluate's COCO scoring (and `scorers`') of the gathered detections, on rank 0."""
    score_masks, score_keypoints = flags
    if class_names is None:
        class_names = [str(k) for k in range(1, max([a["category_id"] for a in annotations], default=0) + 1)]
    iou_types = ["bbox"] + ["segm"] * score_masks + ["keypoints"] * score_keypoints
    coco_gt = coco_from_records(images, annotations, class_names)
    results = {"detections": detections}
    for iou_type in iou_types:
        coco_eval = COCOeval(coco_gt, load_results(coco_gt, images, detections, class_names), iou_type)
        with contextlib.redirect_stdout(io.StringIO()):  # keep the summary, drop pycocotools' progress chatter
            coco_eval.evaluate()
            coco_eval.accumulate()
        print(f"IoU metric: {iou_type}")
        coco_eval.summarize()
        results[iou_type] = dict(zip(stat_names(iou_type), (float(s) for s in coco_eval.stats), strict=True))
        results[f"{iou_type}_per_class"] = per_class_ap(coco_eval, class_names)
    for scorer in scorers:
        results.update(scorer(annotations, detections, class_names))
    return results
