"""Penn-Fudan pedestrians (Wang, Shi, Song, Shen, ACCV 2007): 170 images, 423 instance masks, one class.

Release layout (what the official zip unpacks to):
    PennFudanPed/PNGImages/FudanPed00001.png        RGB image
    PennFudanPed/PedMasks/FudanPed00001_mask.png    uint8, 0 = background, 1..N = pedestrian id
"""

import hashlib
import shutil
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

from utils import SetupError

from .images import image_size, read_image

URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
# The release publishes no checksum for its zip, so we check what matters: a SHA-256 over the names and bytes of
# the 170 images and 170 masks, computed from the unmodified release.
CONTENT_SHA256 = "7fa007bbda49ba0b221dc87d9ecac07ef555c75adc53fc7741b1ba2c1be8ebc1"
CLASSES = ("person",)


def content_digest(root):
    h = hashlib.sha256()
    for sub in ("PNGImages", "PedMasks"):
        for path in sorted((Path(root) / sub).glob("*.png")):
            h.update(f"{sub}/{path.name}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def download_pennfudan(root):
    """Fetch the official zip (with a progress bar), unpack it to `root` and verify the unpacked files."""
    from torchvision.datasets.utils import download_and_extract_archive

    root, parent = Path(root), Path(root).parent
    parent.mkdir(parents=True, exist_ok=True)
    try:
        download_and_extract_archive(URL, download_root=parent, remove_finished=True)
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        raise SetupError(
            f"could not download Penn-Fudan from {URL} ({e}).\n"
            f"  Download and unzip it yourself, then pass --data-path DIR (the folder holding PNGImages/)."
        ) from e
    if root.name != "PennFudanPed":
        shutil.move(parent / "PennFudanPed", root)
    if content_digest(root) != CONTENT_SHA256:
        raise SetupError(
            f"the Penn-Fudan files unpacked to {root} do not match the official release; delete it and retry"
        )


class PennFudanDataset(torch.utils.data.Dataset):
    """Items are (image, target) following the contract in datasets/__init__.py; every object is class 1, person.
    `transforms(image, target)` runs last; `image_id` is the index in the sorted file list, stable across runs."""

    def __init__(self, root, transforms=None, download=False):
        self.root = Path(root)
        self.transforms = transforms
        if download and not (self.root / "PNGImages").is_dir():
            download_pennfudan(self.root)
        self.images = sorted((self.root / "PNGImages").glob("*.png"))
        if not self.images:
            raise SetupError(
                f"no Penn-Fudan images in {self.root}: expected the release layout PNGImages/*.png and "
                f"PedMasks/*_mask.png.\n  Pass --data-path DIR pointing at the unzipped PennFudanPed folder, "
                f"or leave --data-path out to download it ({URL})."
            )
        self.masks = [self.root / "PedMasks" / f"{p.stem}_mask.png" for p in self.images]
        missing = [str(m) for m in self.masks if not m.is_file()]
        if missing:
            raise SetupError(f"{len(missing)} Penn-Fudan masks are missing, first: {missing[0]}; re-extract the zip")

    def __len__(self):
        return len(self.images)

    def get_height_and_width(self, idx):
        return image_size(self.images[idx])  # from the header, no decoding

    def __getitem__(self, idx):
        image = read_image(self.images[idx], "RGB")  # uint8 [3, H, W]
        id_map = read_image(self.masks[idx])[0]  # uint8 [H, W]: 0 = background, k = pedestrian k
        ids = id_map.unique()
        ids = ids[ids != 0]
        masks = (id_map[None] == ids[:, None, None]).to(torch.uint8)  # [N, H, W]
        # masks_to_boxes gives the last covered pixel as x2/y2; +1 turns that into the pixel-extent box
        # (a 1-pixel-wide mask is 1 pixel wide, not 0), the convention COCO and torchvision's models use.
        boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        height, width = image.shape[-2:]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.ones(len(ids), dtype=torch.int64),
            "masks": tv_tensors.Mask(masks),
            "image_id": idx,
            "area": masks.sum(dim=(1, 2)).to(torch.float32),  # segment area, as COCO uses for small/medium/large
            "iscrowd": torch.zeros(len(ids), dtype=torch.int64),
        }
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self):
        return f"PennFudanDataset(root={str(self.root)!r}, {len(self)} images)"
