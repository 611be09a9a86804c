"""--cache-images: decode every image once and keep it in memory, for small datasets on slow disks or CPUs where
decoding a PNG costs as much as a training step. datasets.images.read_image serves the cached copies.
Delete this file and its call in train.py and every epoch decodes its images again.
"""

from datasets import images


def cache_images(*datasets):
    """Decode every image of `datasets` now and keep them (in datasets.images.decoded); prints the MB used.

    Run it in the main process before the DataLoader starts its workers: forked workers share these tensors' memory.
    """
    if images.decoded is None:
        images.decoded = {}
    for dataset in datasets:
        for i in range(len(dataset)):
            dataset[i]  # noqa: B018 - reading a sample fills the cache
    megabytes = sum(t.numel() for t in images.decoded.values()) / 2**20
    print(f"Cached the decoded images: {megabytes:.0f} MB")
    return megabytes
