"""The shared image reader (datasets/images.py): EXIF orientation, high-bit-depth images, decompression bombs, and
the files VOC xmls name. Cases are generated from a real Penn-Fudan image when ../shared/data has one."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, make_pennfudan
from PIL import Image

from datasets import coco, images, pennfudan
from extras import skip_bad_images
from extras.formats import voc
from utils import SetupError


def photo(tmp_path):
    """An upright RGB PIL image: a Penn-Fudan photo (cropped small) when present, else a generated one."""
    real = SHARED_DATA / "PennFudanPed" / "PNGImages" / "FudanPed00001.png"
    if real.is_file():
        with Image.open(real) as im:
            return im.convert("RGB").crop((0, 0, 120, 80))
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))


def save_rotated_like_a_phone(upright, path):
    """Store `upright` as a phone does: pixels turned 90 degrees, plus EXIF orientation 6 ("rotate to show")."""
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=98, exif=exif)


def test_exif_orientation_is_applied_and_sizes_are_upright(tmp_path):
    upright = photo(tmp_path)  # 120 wide, 80 high
    path = tmp_path / "phone.jpg"
    save_rotated_like_a_phone(upright, path)
    with Image.open(path) as im:
        assert im.size == (80, 120)  # what is stored: sideways
    image = images.read_image(path, "RGB")
    assert image.shape == (3, 80, 120)
    assert images.image_size(path) == (80, 120)
    expected = torch.from_numpy(np.array(upright)).permute(2, 0, 1).float()
    assert (image.float() - expected).abs().mean() < 6  # the same picture, up to JPEG's loss


def test_a_coco_json_drawn_on_the_upright_photo_loads_with_its_boxes_on_the_right_pixels(tmp_path):
    upright = np.zeros((80, 120, 3), dtype=np.uint8)
    upright[10:30, 70:110] = 255  # a white object in the top right, as the annotation tool showed it
    save_rotated_like_a_phone(Image.fromarray(upright), tmp_path / "phone.jpg")
    ann = {
        "images": [{"id": 1, "file_name": "phone.jpg", "width": 120, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [70, 10, 40, 20], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = coco.CocoDetection(tmp_path, tmp_path / "ann.json")
    image, target = ds[0]
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert image.shape == (3, 80, 120) and ds.get_height_and_width(0) == (80, 120)
    assert image[:, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].float().mean() > 240  # the box sits on the object
    assert image.float().mean() < 40


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_scaled_by_their_range(tmp_path, mode):
    ramp = np.tile(np.linspace(0, 65535, 256), (16, 1))  # a 0-65535 gradient, 256 columns
    if mode == "I;16":
        im, path = Image.fromarray(ramp.astype(np.uint16)), tmp_path / "ramp.png"
    elif mode == "I":
        im, path = Image.fromarray(ramp.astype(np.int32), "I"), tmp_path / "ramp.tif"
    else:
        im, path = Image.fromarray(ramp.astype(np.float32), "F"), tmp_path / "ramp.tif"
    im.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith(mode[0])
    image = images.read_image(path, "RGB")
    assert image.shape == (3, 16, 256) and image.dtype == torch.uint8
    row = image[0, 0].int()
    assert row[0] == 0 and row[-1] == 255 and (row.diff() >= 0).all()
    assert (image == 255).float().mean() < 0.01  # clipping at 255 made 98% of it white
    assert abs(image.float().mean().item() - 127.5) < 2


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_other_modes_still_read_as_rgb(tmp_path, mode):
    im = photo(tmp_path).convert(mode)
    path = tmp_path / ("im.jpg" if mode == "CMYK" else "im.png")
    im.save(path)
    image = images.read_image(path, "RGB")
    assert image.shape == (3, 80, 120) and image.dtype == torch.uint8 and image.float().std() > 5


def test_a_decompression_bomb_is_an_unreadable_image_skipped_under_skip_bad_images(tmp_path, monkeypatch):
    root = tmp_path / "pf"
    make_pennfudan(root, num_images=3)
    # PIL refuses images above twice MAX_IMAGE_PIXELS; lower the limit instead of writing a huge file
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # errors above 10,000 pixels
    with pytest.raises(images.UnreadableImage, match=r"(?s)Ped00000\.png.*MAX_IMAGE_PIXELS=<pixels>"):
        images.read_image(root / "PNGImages" / "Ped00000.png")
    skipping = skip_bad_images.SkipBadImages(pennfudan.PennFudanDataset(root))
    assert skipping[0] == (None, None)  # 96 x 128 = 12,288 pixels
    assert skipping.get_height_and_width(0) == (1, 1)  # batching still gets a size
    with pytest.warns(Image.DecompressionBombWarning):
        assert skipping[1][1] is not None  # 112 x 80 = 8,960: PIL only warns


def test_max_image_pixels_environment_variable_raises_the_limit():
    code = "import datasets.images, PIL.Image; print(PIL.Image.MAX_IMAGE_PIXELS)"
    for value, expected in (("0", "None"), ("400000000", "400000000")):
        env = {"MAX_IMAGE_PIXELS": value, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
        assert out.stdout.strip() == expected, out.stderr


def write_voc(root, stem, filename, suffix, size=(40, 30)):
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 20, 200)).save(root / "JPEGImages" / f"{filename or stem}{suffix}")
    name = f"<filename>{filename}{suffix}</filename>" if filename else ""
    (root / "Annotations" / f"{stem}.xml").write_text(
        f"<annotation>{name}<object><name>cell</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
        f"<ymax>25</ymax></bndbox></object></annotation>"
    )


def test_voc_finds_the_image_its_xml_names_or_any_common_extension(tmp_path):
    root = tmp_path / "voc"
    write_voc(root, "a", "photo_a", ".png")  # <filename> differs from the xml's stem
    write_voc(root, "b", None, ".JPG")
    write_voc(root, "c", None, ".jpeg")
    ds = voc.VOCDetection(root, classes=["cell"], split_ids=["a", "b", "c"])
    assert [item["path"].name for item in ds.items] == ["photo_a.png", "b.JPG", "c.jpeg"]
    assert all(ds[i][0].shape == (3, 30, 40) for i in range(3))
    (root / "JPEGImages" / "c.jpeg").unlink()
    with pytest.raises(SetupError, match=r"image not found for .*c\.xml; tried .*JPEGImages/c\.jpg, "):
        voc.VOCDetection(root, classes=["cell"], split_ids=["c"])


def test_voc_without_classes_suggests_the_names_in_the_files(tmp_path):
    root = tmp_path / "voc"
    write_voc(root, "a", None, ".jpg")
    with pytest.raises(SetupError, match=r"e\.g\. --classes cell \("):
        voc.VOCDetection(root, split_ids=["a"])  # the default: the 20 VOC names
    with pytest.raises(SetupError, match=r"e\.g\. --classes dog,cell \("):
        voc.VOCDetection(root, classes=["dog"], split_ids=["a"])


def test_cache_images_serves_decoded_copies(pennfudan_dir):
    from datasets import PennFudanDataset, images
    from extras import cache_images

    dataset = PennFudanDataset(pennfudan_dir)
    try:
        megabytes = cache_images.cache_images(dataset)
        first = dataset[0][0].clone()
        for png in (pennfudan_dir / "PNGImages").glob("*.png"):
            png.write_bytes(b"")  # the files are gone: the cache alone serves them now
        assert megabytes > 0 and torch.equal(dataset[0][0], first)
    finally:
        images.decoded = None
