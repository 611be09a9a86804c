"""--repeat-factor-thr T: rare classes seen more often, by LVIS's repeat-factor sampling (Gupta et al., 2019).

A class c found in a share f_c of the training images gets the repeat factor r_c = max(1, sqrt(T / f_c)); an image is
repeated r_i = max over its classes of r_c times per epoch (an image without objects: once). A fractional r_i is
rounded up or down at random each epoch, so that over epochs the image is drawn r_i times on average. With T = 0.1,
a class in 1% of the images is drawn about 3x as often; classes in more than 10% of the images are unchanged.

train.py's loaders use RepeatFactorSampler in place of the DistributedSampler: the epoch's list of indices depends on
(seed, epoch) only, so every rank builds the same one and takes its share, aspect-ratio grouping batches it as usual,
and a run resumed mid-epoch sees the same order. Delete this file and its call in train.py and every image is drawn
once per epoch.
"""

import math

import torch


def image_labels(dataset):
    """The set of labels in each image of `dataset`, read from the annotations where the dataset keeps them (COCO
    json, VOC and the other record formats), else from its samples (which decodes every image once)."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = image_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    inner = getattr(dataset, "__dict__", {}).get("dataset")  # a wrapper such as --skip-bad-images'
    if inner is not None:
        return image_labels(inner)
    if hasattr(dataset, "images") and hasattr(dataset, "category_id_to_label"):  # datasets.CocoDetection
        to_label = dataset.category_id_to_label
        return [{to_label[a["category_id"]] for a in r["anns"] if not a.get("iscrowd", 0)} for r in dataset.images]
    if hasattr(dataset, "items"):  # extras/formats' BoxRecords: VOC, list of dicts, YOLO
        return [set(item["labels"][item["iscrowd"] == 0].tolist()) for item in dataset.items]
    return [set(target["labels"].tolist()) for _, target in (dataset[i] for i in range(len(dataset)))]


def repeat_factors(labels_per_image, threshold):
    """(per-image repeat factors, {label: (images containing it, its repeat factor)})."""
    num_images = max(len(labels_per_image), 1)
    counts = {}
    for labels in labels_per_image:
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
    per_class = {c: (n, max(1.0, math.sqrt(threshold / (n / num_images)))) for c, n in sorted(counts.items())}
    per_image = [max((per_class[c][1] for c in labels), default=1.0) for labels in labels_per_image]
    return per_image, per_class


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Indices of an epoch with each image repeated by its repeat factor (stochastically rounded), shuffled, and
    split between `num_replicas` ranks (padded so each rank gets as many). Call set_epoch(epoch) before each epoch,
    as with torch's DistributedSampler; the epoch's indices are fixed then, so len() is that epoch's length."""

    def __init__(self, factors, num_replicas=1, rank=0, seed=0):
        self.factors = torch.tensor(factors, dtype=torch.float64)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        generator = torch.Generator().manual_seed(self.seed + epoch)
        whole = self.factors.floor()
        draws = torch.rand(len(self.factors), generator=generator, dtype=torch.float64)
        repeats = whole + (draws < self.factors - whole)  # r = 2.3: 2 or 3 repeats, 3 with probability 0.3
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), repeats.long())
        indices = indices[torch.randperm(len(indices), generator=generator)].tolist()
        indices += indices[: -len(indices) % self.num_replicas]  # every rank the same number of steps
        self.indices = indices[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def sampler(dataset, class_names, threshold, num_replicas=1, rank=0, seed=0):
    """The RepeatFactorSampler of `dataset` for --repeat-factor-thr `threshold`; prints each class's image count and
    repeat factor, which `sampler.summary` keeps as report.md's section (markdown lines)."""
    factors, per_class = repeat_factors(image_labels(dataset), threshold)
    names = {label: class_names[label - 1] if 0 < label <= len(class_names) else str(label) for label in per_class}
    total = f"an epoch draws {sum(factors):.0f} images on average, {len(factors)} without repeats"
    print(f"Repeat-factor sampling (threshold {threshold:g}): class, training images, repeat factor")
    for label, (images, factor) in per_class.items():
        print(f"  {names[label]:<24} {images:>6} {factor:6.2f}")
    print(f"  {total}")
    result = RepeatFactorSampler(factors, num_replicas, rank, seed)
    result.summary = [f"## Repeat-factor sampling (--repeat-factor-thr {threshold:g})", ""]
    result.summary += ["| class | training images | repeat factor |", "|---|---|---|"]
    result.summary += [f"| {names[label]} | {images} | {factor:.2f} |" for label, (images, factor) in per_class.items()]
    result.summary += ["", total[0].upper() + total[1:] + ".", ""]
    return result
