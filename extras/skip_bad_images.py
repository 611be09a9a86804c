"""--skip-bad-images: a run that meets an unreadable image (truncated, corrupt, a decompression bomb) goes on.

    train_set, val_set = skip_bad_images.wrap(train_set, val_set)

The wrapped dataset returns (None, None) for such a sample; engine.py's loops leave those out and count them, and a
rank whose whole batch was unreadable still joins the step on `blank_sample` (engine.train_one_epoch). Delete this
file and its call in train.py and an unreadable image stops the run with its file name, as without the flag.
"""

import torch

from utils import SetupError


class SkipBadImages(torch.utils.data.Dataset):
    """Wraps a dataset: a sample whose image cannot be read becomes (None, None), which the training and evaluation
    loops leave out and count, instead of stopping the run (--skip-bad-images). Each skip is reported once."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # get_height_and_width, label_to_category_id, ... of the wrapped dataset
        if name.startswith("__"):  # not __getitems__: the DataLoader would fetch batches around this wrapper
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)

    def get_height_and_width(self, idx):
        try:
            return self.dataset.get_height_and_width(idx)
        except SetupError:  # any size will do for batching: reading the sample skips it
            return 1, 1

    def __getitem__(self, idx):
        try:
            return self.dataset[idx]
        except SetupError as e:
            print(f"Skipping sample {idx}: {str(e).splitlines()[0]}", flush=True)
            return None, None


def wrap(*datasets):
    """Each dataset wrapped in SkipBadImages."""
    return tuple(SkipBadImages(dataset) for dataset in datasets)


def blank_sample(model):
    """A 64x64 black image without objects, and its target with every field the model's heads read."""
    heads = getattr(getattr(model, "module", model), "roi_heads", None)
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "image_id": -1}
    if heads is not None and heads.has_mask():
        target["masks"] = torch.zeros((0, 64, 64), dtype=torch.uint8)
    if heads is not None and heads.has_keypoint():
        target["keypoints"] = torch.zeros((0, heads.keypoint_predictor.kps_score_lowres.out_channels, 3))
    return [torch.zeros(3, 64, 64)], [target]
