"""report.md and training curves: what a finished run shows at a glance (train.py writes it at the end).

    python references/plot_logs.py work_dirs/a work_dirs/b --out curves.png   # the curves of several runs

matplotlib is optional (requirements-extras.txt): without it report.md has no curves. Delete this file and its call
in train.py and a run still writes log.jsonl and its checkpoints.
"""

import datetime
import json
import os

import torch


def read_log(path):
    """log.jsonl -> (per-epoch records, per-iteration records); a half-written last line (a killed run) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if "iter" not in r], [r for r in records if "iter" in r]


def plot_curves(log_files, out_file, names=None):
    """One PNG of every run's training losses, lr and validation AP over epochs. Returns False without matplotlib
    (an optional dependency)."""
    try:  # a Figure drawn on an Agg canvas: no display needed, and pyplot's global backend is left alone
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    runs = [(name, *read_log(path)) for name, path in zip(names or map(str, log_files), log_files)]
    loss_names = sorted(
        {k for _, epochs, _ in runs for r in epochs for k in r.get("train", {}) if k.startswith("loss")}
    )
    panels = [*loss_names, "lr", "AP"]
    cols, rows = 3, (len(panels) + 2) // 3
    fig = Figure(figsize=(5 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for run, (name, epochs, iters) in enumerate(runs):
            color = f"C{run}"  # one colour per run in every panel
            if panel == "AP":
                for iou_type in ("bbox", "segm"):
                    points = [(r["epoch"] + 1, r[iou_type]["AP"]) for r in epochs if iou_type in r]
                    if points:
                        ax.plot(
                            *zip(*points),
                            marker="o" if iou_type == "bbox" else "s",
                            color=color,
                            label=f"{name} {iou_type}",
                        )
                continue
            steps = [r for r in iters if panel in r]
            if steps:  # x in epochs: iteration i of epoch e sits at e + i / iterations per epoch
                per_epoch = max(r["iter"] for r in steps) + 1
                x = [r["epoch"] + r["iter"] / per_epoch for r in steps]
                ax.plot(x, [r[panel] for r in steps], alpha=0.35, color=color)
            points = [(r["epoch"] + 1, r["train"][panel]) for r in epochs if panel in r.get("train", {})]
            if points:
                ax.plot(*zip(*points), marker="o", color=color, label=f"{name} train")
            val = [(r["epoch"] + 1, r["val_loss"][panel]) for r in epochs if panel in (r.get("val_loss") or {})]
            if val:
                ax.plot(*zip(*val), marker="s", linestyle="--", color=color, label=f"{name} val")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_file, dpi=80)
    return True


def peak_memory_mb(device):
    """Peak memory of this process on `device`, in MiB: CUDA memory allocated on a GPU, resident set size on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_report(args, metrics, log_file, train_images_per_s, total_seconds, stopped=None, sampling=None):
    """output-dir/report.md: the final metrics, per-class AP, curves, a few drawn validation images, timing, args;
    `stopped` says why training ended before --epochs (--patience), `sampling` is a section of markdown lines on how
    training images were drawn (--repeat-factor-thr)."""
    out = args.output_dir
    lines = [f"# {args.model} on {args.dataset}", ""]
    if stopped:
        lines += [f"Training {stopped}. The metrics below are the last evaluation's; best.pth holds the best.", ""]
    for iou_type in ("bbox", "segm", "keypoints"):
        if iou_type in metrics:
            lines += [f"## {iou_type} (COCO)", "", "| " + " | ".join(metrics[iou_type]) + " |"]
            lines += [
                "|" + "---|" * len(metrics[iou_type]),
                "| " + " | ".join(f"{v * 100:.1f}" for v in metrics[iou_type].values()) + " |",
                "",
            ]
            lines += ["| class | AP | AP50 |", "|---|---|---|"]
            lines += [
                f"| {n} | {v['AP'] * 100:.1f} | {v['AP50'] * 100:.1f} |"
                for n, v in metrics[f"{iou_type}_per_class"].items()
            ]
            lines.append("")
    if "voc_mAP50" in metrics:
        lines += [f"VOC mAP@0.5: {metrics['voc_mAP50'] * 100:.1f}", ""]
    if "errors" in metrics:  # extras/error_analysis.py: recommended threshold, per-class P/R/F1, confusion, PR curves
        from extras import error_analysis

        lines += error_analysis.markdown(metrics["errors"], out)
    lines += sampling or []
    if plot_curves([log_file], os.path.join(out, "curves.png"), names=[args.model]):
        lines += ["## Curves", "", "![curves](curves.png)", ""]
    drawn = (
        sorted(os.listdir(os.path.join(out, "val_images"))) if os.path.isdir(os.path.join(out, "val_images")) else []
    )
    if drawn:
        lines += ["## Validation images (prediction green, ground truth red)", ""]
        lines += [f"![{name}](val_images/{name})" for name in drawn] + [""]
    memory, on_gpu = peak_memory_mb(args.device), args.device.startswith("cuda")
    lines += [
        "## Run",
        "",
        f"- training: {train_images_per_s:.2f} images/s; total time {datetime.timedelta(seconds=int(total_seconds))}",
    ]
    lines += [f"- peak memory: {memory:.0f} MB ({'GPU allocated' if on_gpu else 'process RSS'})", ""]
    lines += ["```json", json.dumps(vars(args), indent=2), "```", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"Wrote {os.path.join(out, 'report.md')}")
