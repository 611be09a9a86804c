"""Error analysis at every evaluation: which mistakes the detector makes, and which score threshold to deploy it with.

    engine.evaluate(model, loader, device, class_names=names, scorers=[error_analysis.scorer(score_thresh=0.25)])

adds metrics["errors"] (plain lists, dicts, floats: it goes into log.jsonl and the checkpoint as it is) and prints it:
- "confusion": a (K+1) x (K+1) matrix of the detections scoring above `score_thresh`, matched at IoU 0.5 whatever
  their class (so a class swap is an off-diagonal count). Rows: ground truth class, then "background" (false
  detections: a detection matching no object, or a duplicate of one already matched). Columns: predicted class, then
  "background" (objects no detection matched). "confusion_normalized": each row divided by its sum.
- "per_class": precision, recall and F1 at the class's F1-optimal score threshold, that threshold, AP50 and the
  precision-recall curve at IoU 0.5, matched as COCOeval matches (same class, best score first, each image's 100 best
  detections of the class), sampled at COCOeval's 101 recall points: "curve"'s precision is COCOeval's
  precision[0, :, k, 0, -1], and AP50 its mean.
- "recommended": the F1-optimal threshold of all classes pooled, with its precision, recall and F1: the default
  --score-thresh for predict.py.
Crowd (iscrowd) ground truth is "don't care", as in COCOeval: a detection that matches no other object but covers a
crowd (intersection over the detection's area >= IoU) counts neither way, and a crowd is never missed.
A threshold keeps the detections scoring above it, as torchvision's box_score_thresh and predict.py do.

Delete this file and its scorer in train.py and evaluation reports COCO's metrics only.
"""

import functools
import os

import numpy as np

RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs
MAX_DETS = 100  # COCOeval's largest maxDets: the PR curve keeps each image's 100 best detections of each class
PAIRS_PER_CHUNK = 1 << 21  # detection x ground-truth overlaps computed at once: ~16 MB of float64, whatever the size
PRINTED_MATRIX_CLASSES = 15  # above this, a terminal line is too narrow for the matrix: the largest errors instead


# ------------------------------------------------------------------------------------------------------ matching
def _columns(records, image_ids, keys):
    """COCO dicts -> numpy columns: "image" (index into the sorted `image_ids`), "label", "box" [N, 4] xywh, keys."""
    columns = {
        "image": np.searchsorted(image_ids, np.array([r["image_id"] for r in records])),
        "label": np.array([r["category_id"] for r in records], dtype=np.int64),
        "box": np.array([r["bbox"] for r in records], dtype=np.float64).reshape(-1, 4),
    }
    for key, dtype in keys.items():
        columns[key] = np.array([r[key] for r in records], dtype=dtype)
    return columns


def _overlaps(dt_box, gt_box, gt_crowd):
    """[B, D, 4] x [B, G, 4] xywh -> [B, D, G]: the IoU, or for a crowd box intersection over the detection's area.
    The arithmetic is pycocotools' (maskApi.c bbIou), so a match at exactly the threshold agrees with COCOeval."""
    dt, gt = dt_box[:, :, None], gt_box[:, None]
    w = np.minimum(dt[..., 0] + dt[..., 2], gt[..., 0] + gt[..., 2]) - np.maximum(dt[..., 0], gt[..., 0])
    h = np.minimum(dt[..., 1] + dt[..., 3], gt[..., 1] + gt[..., 3]) - np.maximum(dt[..., 1], gt[..., 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    dt_area, gt_area = dt[..., 2] * dt[..., 3], gt[..., 2] * gt[..., 3]
    union = np.where(gt_crowd[:, None], dt_area, dt_area + gt_area - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def _padded(values, image, rank, shape, fill):
    """Scatter per-record values into [images, most records of an image, ...], `fill` where an image has fewer."""
    out = np.full(shape + values.shape[1:], fill, dtype=values.dtype)
    out[image, rank] = values
    return out


def match(gt, dt, iou=0.5, same_class=True):
    """Greedy matching in each image, best-scoring detection first: a detection takes the unmatched non-crowd ground
    truth it overlaps most, if by IoU >= `iou` (and of its own class when `same_class`, as COCOeval).

    gt, dt: columns of `_columns` (dt with "score"). Returns (matched: [D] index into gt or -1, on_crowd: [D] bool,
    true for an unmatched detection covering a crowd, which counts neither way).
    Images are matched together, one detection rank at a time: [images, ground truth] arrays per step instead of a
    Python loop over 500,000 detections.
    """
    num_images = max(gt["image"].max(initial=-1), dt["image"].max(initial=-1)) + 1
    gt_order = np.argsort(gt["image"], kind="stable")  # an image's ground truth in the given order, as COCOeval
    dt_order = np.lexsort((-dt["score"], dt["image"]))  # an image's detections best first; ties keep their order
    gt_start = np.searchsorted(gt["image"][gt_order], np.arange(num_images + 1))
    dt_start = np.searchsorted(dt["image"][dt_order], np.arange(num_images + 1))
    most_gt, most_dt = max(np.diff(gt_start).max(initial=0), 1), max(np.diff(dt_start).max(initial=0), 1)
    per_chunk = max(1, PAIRS_PER_CHUNK // (most_gt * most_dt))
    matched, on_crowd = np.full(len(dt_order), -1), np.zeros(len(dt_order), dtype=bool)
    for first in range(0, num_images, per_chunk):
        last = min(first + per_chunk, num_images)
        g, d = gt_order[gt_start[first] : gt_start[last]], dt_order[dt_start[first] : dt_start[last]]
        if len(d) == 0:
            continue
        g_image, d_image = gt["image"][g] - first, dt["image"][d] - first
        g_rank = np.arange(len(g)) - (gt_start[gt["image"][g]] - gt_start[first])
        d_rank = np.arange(len(d)) - (dt_start[dt["image"][d]] - dt_start[first])
        shape_g, shape_d = (last - first, int(g_rank.max(initial=0)) + 1), (last - first, int(d_rank.max()) + 1)
        gt_index = _padded(g, g_image, g_rank, shape_g, -1)  # [B, G] index into gt, -1 = padding
        crowd = _padded(gt["crowd"][g], g_image, g_rank, shape_g, False)
        overlap = _overlaps(
            _padded(dt["box"][d], d_image, d_rank, shape_d, 0.0),
            _padded(gt["box"][g], g_image, g_rank, shape_g, 0.0),
            crowd,
        )
        overlap[np.broadcast_to((gt_index < 0)[:, None], overlap.shape)] = -1
        if same_class:
            d_label = _padded(dt["label"][d], d_image, d_rank, shape_d, 0)
            g_label = _padded(gt["label"][g], g_image, g_rank, shape_g, -1)
            overlap[d_label[:, :, None] != g_label[:, None]] = -1
        crowd_overlap = np.where(crowd[:, None], overlap, -1).max(-1, initial=-1)  # [B, D]
        overlap[np.broadcast_to(crowd[:, None], overlap.shape)] = -1
        taken = np.zeros(shape_g, dtype=bool)
        chosen = np.full(shape_d, -1)
        images = np.arange(shape_g[0])
        for rank in range(shape_d[1]):  # padded detections overlap nothing (-1): they never match
            candidates = np.where(taken, -1.0, overlap[:, rank])
            # the last of equal overlaps, as COCOeval's `>=` scan does
            best = shape_g[1] - 1 - candidates[:, ::-1].argmax(1)
            hit = candidates[images, best] >= iou
            chosen[hit, rank] = best[hit]
            taken[images[hit], best[hit]] = True
        hits = chosen[d_image, d_rank]
        matched[d] = np.where(hits >= 0, gt_index[d_image, np.maximum(hits, 0)], -1)
        on_crowd[d] = (hits < 0) & (crowd_overlap[d_image, d_rank] >= iou)
    return matched, on_crowd


def confusion_matrix(gt, dt, num_classes, iou=0.5, score_thresh=0.25):
    """[K+1, K+1] counts: rows ground truth class then background, columns predicted class then background."""
    keep = dt["score"] > score_thresh
    dt = {k: v[keep] for k, v in dt.items()}
    matched, on_crowd = match(gt, dt, iou, same_class=False)
    counts = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    hit = matched >= 0
    np.add.at(counts, (gt["label"][matched[hit]] - 1, dt["label"][hit] - 1), 1)  # right class or swapped
    false = ~hit & ~on_crowd
    np.add.at(counts, (num_classes, dt["label"][false] - 1), 1)  # nothing there, or a duplicate
    missed = np.ones(len(gt["label"]), dtype=bool)
    missed[matched[hit]] = False
    missed &= ~gt["crowd"]
    np.add.at(counts, (gt["label"][missed] - 1, num_classes), 1)
    return counts


# ---------------------------------------------------------------------------------------- precision and recall
def pr_curve(scores, true_positive, num_gt):
    """Detections (crowd-ignored ones left out) in decreasing score order -> (recall, precision) after each one."""
    tp = np.cumsum(true_positive, dtype=np.float64)
    return tp / num_gt, tp / np.arange(1, len(tp) + 1)


def interpolate(recall, precision, points=RECALL_POINTS):
    """COCOeval's precision at each recall point: the best precision at that recall or beyond, 0 past the last."""
    if len(recall) == 0:
        return np.zeros(len(points))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    index = np.searchsorted(recall, points, side="left")
    return np.where(index < len(recall), envelope[np.minimum(index, len(recall) - 1)], 0.0)


def best_f1(scores, true_positive, num_gt):
    """The F1-optimal cut of detections sorted by decreasing score -> {threshold, precision, recall, f1}.

    Only cuts between different scores count (equal scores are kept or dropped together). The threshold is halfway
    between the last score kept and the next one (0 past the lowest), so `score > threshold` keeps exactly that set.
    Nothing correct (or no detection): F1 0 and a nan threshold."""
    tp = np.cumsum(true_positive)
    if num_gt == 0 or len(tp) == 0 or tp[-1] == 0:
        nan = float("nan")
        return {
            "threshold": nan,
            "precision": nan if num_gt == 0 else 0.0,
            "recall": nan if num_gt == 0 else 0.0,
            "f1": nan if num_gt == 0 else 0.0,
        }
    kept = np.arange(1, len(tp) + 1)
    f1 = 2 * tp / (kept + num_gt)  # 2PR / (P + R) with P = tp / kept, R = tp / num_gt
    f1[:-1][scores[1:] == scores[:-1]] = -1  # not a cut: the next detection has the same score
    i = int(np.argmax(f1))  # the first best: the highest threshold among equal F1
    below = scores[i + 1] if i + 1 < len(scores) else 0.0
    return {
        "threshold": float(scores[i] + below) / 2,
        "precision": float(tp[i] / kept[i]),
        "recall": float(tp[i] / num_gt),
        "f1": float(f1[i]),
    }


def _class_summary(scores, true_positive, num_gt):
    """One class's (or all pooled) F1 optimum, AP50 and the curve at the 101 recall points."""
    summary = {"num_gt": int(num_gt), **best_f1(scores, true_positive, num_gt)}
    if num_gt == 0:  # no recall to speak of: COCOeval leaves the class out (-1)
        return {**summary, "AP50": float("nan"), "curve": {"recall": [], "precision": []}}
    precision = interpolate(*pr_curve(scores, true_positive, num_gt))
    # 6 decimals: 2 x 101 short numbers per class in log.jsonl, within 1e-6 of COCOeval's
    curve = {"recall": np.round(RECALL_POINTS, 2).tolist(), "precision": np.round(precision, 6).tolist()}
    return {**summary, "AP50": float(precision.mean()), "curve": curve}


def analyse(annotations, detections, class_names, iou=0.5, score_thresh=0.25):
    """metrics["errors"] of COCO ground-truth dicts and result dicts (category_id = label 1..K, bbox xywh)."""
    image_ids = np.unique(np.array([a["image_id"] for a in annotations] + [d["image_id"] for d in detections]))
    gt = _columns(annotations, image_ids, {})
    gt["crowd"] = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
    dt = _columns(detections, image_ids, {"score": np.float64})
    known = (dt["label"] >= 1) & (dt["label"] <= len(class_names))  # as COCOeval, which scores its categories only
    dt = {k: v[known] for k, v in dt.items()}
    counts = confusion_matrix(gt, dt, len(class_names), iou, score_thresh)

    # COCOeval keeps an image's MAX_DETS best detections per class, then matches within the class
    order = np.lexsort((-dt["score"], dt["label"], dt["image"]))
    group = np.stack([dt["image"][order], dt["label"][order]], 1)
    new_group = np.r_[True, (group[1:] != group[:-1]).any(1)]
    starts = np.flatnonzero(new_group)
    rank = np.arange(len(order)) - starts[np.cumsum(new_group) - 1]
    dt = {k: v[np.sort(order[rank < MAX_DETS])] for k, v in dt.items()}
    matched, on_crowd = match(gt, dt, iou, same_class=True)

    # decreasing score; among equal scores by image, then as given: COCOeval's order
    counted = np.flatnonzero(~on_crowd)
    counted = counted[np.lexsort((counted, dt["image"][counted], -dt["score"][counted]))]
    scores, label, true_positive = dt["score"][counted], dt["label"][counted], matched[counted] >= 0
    num_gt = np.bincount(gt["label"][~gt["crowd"]], minlength=len(class_names) + 1)
    by_class = np.argsort(label, kind="stable")  # each class's detections together, still in score order
    bounds = np.searchsorted(label[by_class], np.arange(1, len(class_names) + 2))
    per_class = {}
    for k, name in enumerate(class_names, start=1):
        mine = by_class[bounds[k - 1] : bounds[k]]
        per_class[name] = _class_summary(scores[mine], true_positive[mine], num_gt[k])
    return {
        "iou": iou,
        "score_thresh": score_thresh,
        "labels": [*class_names, "background"],
        "confusion": counts.tolist(),
        "confusion_normalized": np.round(counts / np.maximum(counts.sum(1, keepdims=True), 1), 4).tolist(),
        "per_class": per_class,
        "recommended": best_f1(scores, true_positive, int(num_gt.sum())),
    }


def score(annotations, detections, class_names, iou=0.5, score_thresh=0.25):
    """engine.evaluate's scorer: {"errors": analyse(...)}, printed."""
    errors = analyse(annotations, detections, class_names, iou, score_thresh)
    print(format_errors(errors, class_names))
    return {"errors": errors}


def scorer(score_thresh=0.25, iou=0.5):
    """The scorer for engine.evaluate(scorers=[...]), with the confusion matrix's score threshold."""
    return functools.partial(score, iou=iou, score_thresh=score_thresh)


def recommended_threshold(metrics):
    """The F1-optimal score threshold of evaluate's metrics (for checkpoint["score_thresh"]); None without one."""
    threshold = metrics.get("errors", {}).get("recommended", {}).get("threshold", float("nan"))
    return None if np.isnan(threshold) else threshold


# ------------------------------------------------------------------------------------------------------- output
def _number(value, spec=".1f", scale=100):
    """A table cell: percent by default; "-" for nan (no ground truth, or no threshold)."""
    return "-" if np.isnan(value) else format(value * scale, spec)


def format_errors(errors, class_names):
    """The confusion matrix (counts; its largest class swaps when there are many classes), the per-class table and
    the recommended threshold, for a terminal."""
    names, counts, k = [*class_names, "background"], np.array(errors["confusion"]), len(class_names)
    lines = [
        f"Confusion matrix at IoU {errors['iou']} of the detections scoring above {errors['score_thresh']} "
        "(background row: false detections, column: missed objects):"
    ]
    if k <= PRINTED_MATRIX_CLASSES:
        width, first = max(6, *(min(len(n), 12) for n in names)), 17
        lines.append(f"  {'truth / predicted':<{first}}" + "".join(f" {n[:width]:>{width}}" for n in names))
        for i, name in enumerate(names):
            cells = ["-" if i == j == k else str(c) for j, c in enumerate(counts[i])]
            lines.append(f"  {name[:first]:<{first}}" + "".join(f" {c:>{width}}" for c in cells))
    else:
        swaps = counts[:k, :k] * (1 - np.eye(k, dtype=counts.dtype))
        lines.append(f"  {counts[:k, k].sum()} objects missed, {counts[k].sum()} false detections; class swaps:")
        for cell in np.argsort(-swaps, axis=None, kind="stable")[:10]:
            i, j = np.unravel_index(cell, swaps.shape)
            if swaps[i, j]:
                lines.append(f"  {swaps[i, j]:6d}  {names[i]} detected as {names[j]}")
    lines += [
        f"Per class at its F1-optimal score threshold (IoU {errors['iou']}):",
        f"  {'class':<24} {'objects':>7} {'thresh':>6} {'prec':>5} {'recall':>6} {'F1':>5} {'AP50':>5}",
    ]
    for name, c in errors["per_class"].items():
        cells = [_number(c[key]) for key in ("precision", "recall", "f1", "AP50")]
        threshold = _number(c["threshold"], ".3f", 1)
        row = f"{cells[0]:>5} {cells[1]:>6} {cells[2]:>5} {cells[3]:>5}"
        lines.append(f"  {name[:24]:<24} {c['num_gt']:7d} {threshold:>6} {row}")
    best = errors["recommended"]
    lines.append(
        f"Recommended --score-thresh {_number(best['threshold'], '.3f', 1)} (F1-optimal, all classes pooled): "
        f"precision {_number(best['precision'])}%, recall {_number(best['recall'])}%, F1 {_number(best['f1'])}%"
    )
    return "\n".join(lines)


def save_plots(errors, class_names, out_dir):
    """out_dir/confusion_matrix.png (rows normalized, counts written in) and out_dir/pr_curve.png (one line per class,
    its F1-optimal point marked). Returns the paths written: [] without matplotlib (an optional dependency)."""
    try:  # a Figure drawn on an Agg canvas: no display needed, and pyplot's global backend is left alone
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("No confusion_matrix.png / pr_curve.png: matplotlib is missing (pip install matplotlib)")
        return []
    names, k = [*class_names, "background"], len(class_names)
    counts, normalized = np.array(errors["confusion"]), np.array(errors["confusion_normalized"])
    side = min(4 + 0.45 * len(names), 40)  # inches: ~0.45 per class keeps the counts legible
    fig = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    shown = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, label="fraction of the row", shrink=0.8)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted (background: missed)")
    ax.set_ylabel("ground truth (background: false detection)")
    ax.set_title(f"score > {errors['score_thresh']}, IoU {errors['iou']}")
    for (i, j), count in np.ndenumerate(counts):
        if not i == j == k:
            color = "white" if normalized[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "confusion_matrix.png"), os.path.join(out_dir, "pr_curve.png")]
    fig.savefig(paths[0], dpi=100)

    fig = Figure(figsize=(7, 6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, c) in enumerate(errors["per_class"].items()):
        if c["curve"]["recall"]:
            color = f"C{i % 10}"
            ax.plot(c["curve"]["recall"], c["curve"]["precision"], color=color, label=f"{name} (AP50 {c['AP50']:.3f})")
            if not np.isnan(c["threshold"]):
                ax.plot(c["recall"], c["precision"], "o", color=color)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"IoU {errors['iou']}; dot: the F1-optimal threshold")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7 if k <= 20 else 5, ncol=1 if k <= 20 else 3, loc="lower left")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    return paths


def markdown(errors, out_dir):
    """report.md's "Error analysis" lines; save_plots' PNGs are written into `out_dir`, beside report.md."""
    best, class_names = errors["recommended"], list(errors["per_class"])
    lines = ["## Error analysis", ""]
    if not np.isnan(best["threshold"]):
        lines += [
            f"Recommended `--score-thresh {best['threshold']:.3f}` for predict.py (F1-optimal, all classes "
            f"pooled, IoU {errors['iou']}): precision {best['precision'] * 100:.1f}%, recall "
            f"{best['recall'] * 100:.1f}%, F1 {best['f1'] * 100:.1f}%.",
            "",
        ]
    lines += ["| class | objects | score thresh | precision | recall | F1 | AP50 |", "|---|---|---|---|---|---|---|"]
    for name, c in errors["per_class"].items():
        cells = [_number(c["threshold"], ".3f", 1)] + [_number(c[key]) for key in ("precision", "recall", "f1", "AP50")]
        lines.append(f"| {name} | {c['num_gt']} | " + " | ".join(cells) + " |")
    names = [*class_names, "background"]
    lines += ["", f"Confusion matrix (IoU {errors['iou']}, score > {errors['score_thresh']}; rows: ground truth, "
              "columns: predicted; background: missed objects and false detections):", ""]  # fmt: skip
    lines += ["| truth \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, (name, row) in enumerate(zip(names, errors["confusion"])):
        cells = ["-" if i == j == len(class_names) else str(int(v)) for j, v in enumerate(row)]  # background x2
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for path in save_plots(errors, class_names, out_dir):
        name = os.path.basename(path)
        lines += [f"![{name[:-4]}]({name})", ""]
    return lines
