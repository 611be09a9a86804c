"""The validation loss (--val-loss, on by default): the training losses on the validation set, at every evaluation.

A validation loss that rises while the training loss falls is the usual sign of overfitting, which COCO AP shows
later and more noisily on a few hundred images. train.py logs it in log.jsonl ("val_loss"); report.md plots it.
"""

from collections import defaultdict

import torch

import utils
from engine import readable, to_device, without_crowd


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
        images, targets, _ = readable(images, targets)
        if not images:  # no collective inside this loop: ranks may see different numbers of batches
            continue
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [without_crowd(to_device(t, device)) for t in targets]
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
