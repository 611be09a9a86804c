"""Batches of images with similar aspect ratios, so a batch pads little when the model stacks it into one tensor.

A batch of a portrait and a landscape image is padded to max height x max width: up to twice the pixels. Grouping
by aspect ratio avoids that. Ratios come from `get_height_and_width`, so no image is decoded.
"""

import bisect
from collections import defaultdict

import torch


def aspect_ratio_groups(dataset, factor=3):
    """Group id per image: width/height binned on a log scale, 2 * factor + 1 bins between 1/2 and 2 (+ 2 outer)."""
    bins = (2 ** torch.linspace(-1, 1, 2 * factor + 1)).tolist()
    groups = []
    for idx in range(len(dataset)):
        height, width = dataset.get_height_and_width(idx)
        groups.append(bisect.bisect_right(bins, width / height))
    return groups


class GroupedBatchSampler(torch.utils.data.BatchSampler):
    """Wraps a sampler: yields batches whose images share a group, in the sampler's order as far as possible.
    Indices left in half-full groups at the end are batched together (mixed groups), so every image is used once per
    epoch; the last incomplete batch is dropped: len(sampler) // batch_size batches, the same on every rank."""

    def __init__(self, sampler, group_ids, batch_size):
        super().__init__(sampler, batch_size, drop_last=True)
        self.group_ids = group_ids

    def __iter__(self):
        buckets = defaultdict(list)
        for idx in self.sampler:
            bucket = buckets[self.group_ids[idx]]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        leftovers = [idx for bucket in buckets.values() for idx in bucket]
        for start in range(0, len(leftovers) - self.batch_size + 1, self.batch_size):
            yield leftovers[start : start + self.batch_size]

    def __len__(self):
        return len(self.sampler) // self.batch_size
