"""Reading image files as people have them: one reader for every dataset class and for predict.py.

- EXIF orientation is applied (phone photos store pixels sideways plus a tag; every viewer and annotation tool shows
  them upright, so the boxes drawn on them fit the upright pixels). `image_size` reads the upright size from the
  header without decoding.
- 16-bit and other high-bit-depth images (modes I;16, I, F: microscopy, medical, thermal) are scaled to 8 bits by
  their own range (darkest pixel 0, brightest 255), not clipped at 255.
- A file PIL refuses as a decompression bomb is unreadable like a corrupt one: a SetupError naming it. A legitimate
  huge image passes once the environment variable MAX_IMAGE_PIXELS raises PIL's limit (0 removes it).
"""

import os

import numpy as np
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import pil_to_tensor

from utils import SetupError

if "MAX_IMAGE_PIXELS" in os.environ:  # PIL's documented setting; it refuses images above twice this many pixels
    Image.MAX_IMAGE_PIXELS = int(os.environ["MAX_IMAGE_PIXELS"]) or None

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# EXIF orientations 5-8 are rotations by 90 or 270 degrees (with or without a mirror): width and height swap
SWAPS_SIDES = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112
DATASET_HINT = (
    "Replace or remove it (references/check_dataset.py lists every such file), or pass --skip-bad-images to skip "
    "such samples"
)


class UnreadableImage(SetupError):
    """An image file that cannot be decoded: missing, truncated, corrupt, not an image, or over PIL's pixel limit."""


def _open(path, hint):
    """PIL's Image.open, with every way it fails turned into one UnreadableImage naming the file."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise UnreadableImage(
            f"cannot read image {path}: {e}\n  If the image is legitimate, raise PIL's limit with the environment "
            f"variable MAX_IMAGE_PIXELS=<pixels> (0 for no limit)" + (f". {hint}" if hint else "")
        ) from None
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for unreadable, truncated and corrupt files
        raise UnreadableImage(f"cannot read image {path}: {e}." + (f"\n  {hint}" if hint else "")) from None


def image_size(path, hint=DATASET_HINT):
    """(height, width) of the upright image, from the file's header (no decoding)."""
    with _open(path, hint) as im:
        width, height = im.size
        if orientation(im) in SWAPS_SIDES:
            width, height = height, width
    return height, width


def orientation(im):
    """The EXIF orientation tag of an opened image (None without one), read without decoding the pixels."""
    if im.format == "PNG" and "exif" not in im.info:  # PIL would decode the whole PNG to look for a late eXIf chunk
        return None
    try:
        return im.getexif().get(EXIF_ORIENTATION)
    except (OSError, SyntaxError, ValueError):  # a damaged file: read_image names it when the sample is read
        return None


def to_8_bit(im):
    """A high-bit-depth PIL image as mode L, its darkest pixel 0 and its brightest 255 (a flat image becomes 0)."""
    values = np.asarray(im, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", im.size)
    low, high = values[finite].min(), values[finite].max()
    scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low) if high > low else 0.0)
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


def decode(im, mode=None):
    """An opened PIL image -> uint8 tensor [C, H, W], upright, 8 bits per channel, converted to `mode` if given."""
    im = ImageOps.exif_transpose(im)
    if im.mode in HIGH_BIT_MODES:
        im = to_8_bit(im)
    return pil_to_tensor(im.convert(mode) if mode and im.mode != mode else im)


# Decoded images by (path, mode) when extras/cache_images.py fills it (--cache-images); None: every read decodes
decoded = None


def read_image(path, mode=None, hint=DATASET_HINT):
    """Decode an image file to an upright uint8 [C, H, W] tensor (PIL: torchvision.io's decoders are deprecated in
    0.29). A file that cannot be read raises UnreadableImage naming it, followed by `hint` (what to do about it)."""
    if decoded is not None and (str(path), mode) in decoded:
        return decoded[str(path), mode].clone()  # a copy: transforms may work in place
    with _open(path, hint) as im:
        try:
            image = decode(im, mode)
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt pixel data, found while decoding
            raise UnreadableImage(f"cannot read image {path}: {e}." + (f"\n  {hint}" if hint else "")) from None
    if decoded is not None:
        decoded[str(path), mode] = image.clone()
    return image
