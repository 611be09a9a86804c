"""references/check_dataset.py: faults injected into small generated datasets of every format are reported with their
file names and the right exit code, --fix writes annotations that check clean, and BCCD's real problems are found."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
from conftest import REPO, SHARED_DATA, make_pennfudan
from PIL import Image
from test_convert_dataset import make_voc

from extras.formats.voc import VOCDetection, parse_annotation
from utils import SetupError

sys.path.insert(0, str(REPO / "references"))
import check_dataset  # noqa: E402

CLASSES = "cat,dog"
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]


def write_image(path, width, height, cut=False):
    """Noise (so pixel data is most of the file) as PNG or JPEG; cut=True keeps the first half of the bytes: the
    header is intact and the file opens, only decoding fails, as after an interrupted copy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    if cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def run(capsys, *argv, workers=1):
    """check_dataset.main on command-line arguments -> (exit code, {problem name: its report block}, stdout).

    One worker by default: a process pool costs more than it saves on a few tiny images."""
    args = check_dataset.get_args_parser().parse_args([str(a) for a in argv] + ["--workers", str(workers)])
    code = check_dataset.main(args)
    out = capsys.readouterr().out
    blocks = [block.strip() for block in out.split("\n\n")]  # "ERROR: zero-size boxes: 2 (why)\n  example\n..."
    return code, {b.split(": ")[1]: b for b in blocks if b.startswith(("ERROR: ", "WARNING: "))}, out


def test_voc_faults_are_reported_and_fix_checks_clean(tmp_path, capsys):
    voc = {
        "good": ((64, 48), [("cat", [1, 1, 20, 30], 0), ("dog", [30, 10, 60, 47], 1)]),
        "cut": ((64, 48), [("cat", [1, 1, 20, 30], 0)]),
        "noise": ((64, 48), [("cat", [1, 1, 20, 30], 0)]),
        "click": ((64, 48), [("cat", [5, 5, 5, 5], 0), ("dog", [2, 2, 30, 30], 0)]),  # xmin == xmax: zero size
        "out": ((64, 48), [("cat", [0, 10, 80, 40], 0), ("dog", [100, 1, 120, 20], 0)]),  # crossing; outside
        "resized": ((100, 100), [("dog", [10, 10, 40, 40], 0)]),  # <size> says 100x100, the image will be 64x48
        "negative": ((64, 48), []),
    }
    root = make_voc(tmp_path / "voc", voc, without_size=())
    images = root / "JPEGImages"
    write_image(images / "cut.jpg", 64, 48, cut=True)
    (images / "noise.jpg").write_bytes(b"\xff\xd8 not a JPEG at all " * 20)
    write_image(images / "resized.jpg", 64, 48)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("good\ncut\nnoise\nclick\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("out\nresized\nnegative\n")

    fixed = tmp_path / "fixed"
    code, blocks, out = run(capsys, "--dataset", "voc", "--data-path", root, "--classes", CLASSES, "--fix", fixed)
    assert code == 1 and "\n6 errors" in out
    assert "cut.jpg: OSError: image file is truncated" in blocks["unreadable images"]
    assert "noise.jpg: UnidentifiedImageError" in blocks["unreadable images"]
    assert blocks["zero-size boxes"].startswith("ERROR: zero-size boxes: 1 (")
    assert blocks["zero-size boxes"].endswith("\n  click.xml: cat [5, 5, 5, 5]")
    assert "out.xml: dog [100, 1, 120, 20], image 64x48" in blocks["boxes outside the image"]
    assert "out.xml: cat [0, 10, 80, 40], image 64x48" in blocks["boxes crossing the border"]
    assert "resized.xml: annotated 100x100, the image is 64x48" in blocks["size mismatches"]
    assert "images without objects: 1 of 7 images (14.3%)" in out and "negative.xml" in out
    assert "  cat          5        0       5\n  dog          4        1       4\n" in out  # objects, ignored, images
    assert f"  unreadable images: 2 dropped, first: {images / 'cut.jpg'}: OSError: image file is truncated" in out
    assert "  boxes crossing the border: 1 clipped, first: out.xml: cat [0, 10, 80, 40], image 64x48\n" in out

    assert (fixed / "JPEGImages").resolve() == images.resolve()  # linked, not copied
    assert not (fixed / "Annotations" / "cut.xml").exists()
    assert (fixed / "ImageSets" / "Main" / "train.txt").read_text() == "good\nclick\n"
    assert parse_annotation(fixed / "Annotations" / "out.xml") == (64, 48, [("cat", [1, 10, 64, 40], 0)])
    assert parse_annotation(fixed / "Annotations" / "resized.xml")[:2] == (64, 48)
    code, blocks, out = run(capsys, "--dataset", "voc", "--data-path", fixed, "--classes", CLASSES)
    assert code == 0 and list(blocks) == ["images without objects"] and "\n0 errors\n" in out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the dataset class finds nothing left to drop or clip
        assert len(VOCDetection(fixed, "train", ["cat", "dog"])) == 2


def test_voc_problems_only_a_human_can_fix(tmp_path, capsys):
    root = make_voc(
        tmp_path / "voc", {"a": ((64, 48), [("cat", [1, 1, 9, 9], 0)]), "b": ((64, 48), [("cow", [1, 1, 9, 9], 0)])}
    )
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nb\n../../etc/a\nlost\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    argv = ["--dataset", "voc", "--classes", CLASSES]
    code, blocks, out = run(capsys, *argv, "--data-path", root, "--fix", tmp_path / "fixed")
    assert code == 1
    assert "b.xml: cow [1, 1, 9, 9]" in blocks["bad labels"]  # a class name not in --classes
    assert "b is listed 2 times in train.txt" in blocks["duplicate image ids"]
    assert "a is in both train.txt and val.txt" in blocks["duplicate image ids"]
    assert "train.txt: ../../etc/a" in blocks["escaping paths"]
    assert "train.txt: lost (no Annotations/lost.xml)" in blocks["missing files"]
    assert "  missing files: 1 dropped, first: train.txt: lost" in out
    assert "  bad labels: 1 left as they are: a human must decide\n  duplicate image ids: 2 left as" in out
    # --fix drops the split entries without an xml, and leaves labels, duplicates and paths to a human
    code, blocks, _ = run(capsys, *argv, "--data-path", tmp_path / "fixed")
    assert code == 1 and sorted(blocks) == ["bad labels", "duplicate image ids", "escaping paths"]


def test_coco_faults_are_reported_and_fixed(tmp_path, capsys):
    images = tmp_path / "images"
    write_image(images / "cut.png", 40, 30, cut=True)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_image(images / name, 40, 30)
    rle = mask_util.encode(np.asfortranarray(np.ones((20, 20), dtype=np.uint8)))  # a 20x20 mask, on a 40x30 image
    rle["counts"] = rle["counts"].decode("ascii")
    train = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 1, "file_name": "b.jpg", "width": 40, "height": 30},  # the id of a.jpg again
            {"id": 2, "file_name": "c.jpg", "width": 64, "height": 30},  # c.jpg is 40 px wide
            {"id": 3, "file_name": "cut.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [5, 5, 10, 10]},  # no category 7
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [30, 5, 30, 10]},  # crosses x = 40
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5]},  # no image 9
            {"id": 5, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 6, "image_id": 2, "category_id": 1, "bbox": [2, 2, 9, 9], "segmentation": rle, "iscrowd": 1},
        ],
        "categories": CATEGORIES,
    }
    val = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}], "categories": CATEGORIES}
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val.json").write_text(json.dumps(val))
    argv = ["--dataset", "coco", "--data-path", tmp_path, "--train-images", images, "--val-images", images]
    fixed = tmp_path / "fixed"
    files = ["--train-ann", tmp_path / "train.json", "--val-ann", tmp_path / "val.json"]
    code, blocks, out = run(capsys, *argv, *files, "--fix", fixed)
    assert code == 1
    assert f"{images / 'cut.png'}: OSError: image file is truncated" in blocks["unreadable images"]
    assert "train.json: id 1 is a.jpg and b.jpg" in blocks["duplicate image ids"]
    assert "a.jpg is listed 2 times (a.jpg, a.jpg)" in blocks["duplicate images"]  # in train and in val
    assert "a.jpg: category_id 7 [5, 5, 10, 10]" in blocks["bad labels"]
    assert "train.json: annotation 4 has unknown image_id 9" in blocks["bad labels"]
    assert "a.jpg: category_id 1 [5, 5, 0, 10]" in blocks["zero-size boxes"]
    assert "c.jpg: annotated 64x30, the image is 40x30" in blocks["size mismatches"]
    assert "c.jpg: category_id 3 [30, 5, 30, 10], image 40x30" in blocks["boxes crossing the border"]
    assert "c.jpg: category_id 1 [2, 2, 9, 9]: its RLE is 20x20, the image 40x30" in blocks["mask size mismatches"]
    assert "  cat          3        1       3\n" in out  # the crowd region counts as ignored
    assert "  size mismatches: 1 set to the image's, first: c.jpg: annotated 64x30" in out
    assert "  mask size mismatches: 1 left as they are: a human must decide\n" in out

    written = json.loads((fixed / "train.json").read_text())
    assert [im["file_name"] for im in written["images"]] == ["a.jpg", "b.jpg", "c.jpg"]  # cut.png dropped
    assert written["images"][2]["width"] == 40 and written["categories"] == CATEGORIES
    boxes = [(ann["id"], ann["bbox"]) for ann in written["annotations"]]
    assert boxes == [(2, [5, 5, 10, 10]), (3, [30, 5, 10, 10]), (4, [1, 1, 5, 5]), (6, [2, 2, 9, 9])]
    code, blocks, _ = run(capsys, *argv, "--train-ann", fixed / "train.json", "--val-ann", fixed / "val.json")
    unfixed = [
        "bad labels",
        "duplicate image ids",
        "duplicate images",
        "images without objects",
        "mask size mismatches",
    ]
    assert code == 1 and sorted(blocks) == unfixed


def test_custom_paths_labels_and_boxes(tmp_path, capsys):
    images = tmp_path / "images"
    elsewhere = write_image(tmp_path / "elsewhere" / "x.jpg", 40, 30)
    for name in ("a.jpg", "b.jpg"):
        write_image(images / name, 40, 30)
    size = {"width": 40, "height": 30}
    entries = [
        {"filename": "a.jpg", **size, "ann": {"bboxes": [[1, 1, 10, 10], [5, 5, 5, 20]], "labels": [0, 2]}},
        {"filename": "b.jpg", **size, "ann": {"bboxes": [[-5, 2, 10, 10]], "labels": [1]}
         | {"bboxes_ignore": [[20, 20, 30, 29]], "labels_ignore": [0]}},
        {"filename": str(elsewhere), **size, "ann": {"bboxes": [[1, 1, 9, 9]], "labels": [1]}},  # absolute
        {"filename": "../elsewhere/x.jpg", **size},
    ]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(entries))
    argv = ["--dataset", "custom", "--img-prefix", images, "--classes", CLASSES]
    code, blocks, out = run(capsys, *argv, "--ann-file", tmp_path / "train.json", "--fix", tmp_path / "fixed")
    assert code == 1
    assert f"train.json: {elsewhere}\n  train.json: ../elsewhere/x.jpg" in blocks["escaping paths"]
    assert "a.jpg: label 2 (0-based, expected 0..1) [5, 5, 5, 20]" in blocks["bad labels"]  # label K + 1 in 1..K
    assert "a.jpg: label 2 (0-based, expected 0..1) [5, 5, 5, 20]" in blocks["zero-size boxes"]
    assert "b.jpg: label 1 [-5, 2, 10, 10], image 40x30" in blocks["boxes crossing the border"]
    assert "  cat          2        1       2\n" in out
    written = json.loads((tmp_path / "fixed" / "train.json").read_text())
    assert written[0]["ann"] == {"bboxes": [[1, 1, 10, 10]], "labels": [0]}
    assert written[1]["ann"]["bboxes"] == [[0, 2, 10, 10]] and written[1]["ann"]["bboxes_ignore"] == [[20, 20, 30, 29]]
    code, blocks, _ = run(capsys, *argv, "--ann-file", tmp_path / "fixed" / "train.json")
    assert code == 1 and sorted(blocks) == ["duplicate images", "escaping paths", "images without objects"]


def test_pennfudan_mask_size_and_truncated_png(tmp_path, capsys):
    root = tmp_path / "PennFudanPed"
    make_pennfudan(root, num_images=4)
    Image.new("L", (50, 40)).save(root / "PedMasks" / "Ped00001_mask.png")  # its image is 80x112
    write_image(root / "PNGImages" / "Ped00002.png", 128, 96, cut=True)
    code, blocks, out = run(capsys, "--dataset", "pennfudan", "--data-path", root)
    assert code == 1 and sorted(blocks) == ["images without objects", "mask size mismatches", "unreadable images"]
    assert "Ped00001_mask.png is 50x40, its image 80x112" in blocks["mask size mismatches"]
    assert "Ped00002.png: OSError: image file is truncated" in blocks["unreadable images"]
    assert "Ped00001.png" in blocks["images without objects"]  # an all-zero mask holds no pedestrian
    with pytest.raises(SetupError, match="Penn-Fudan's annotations are its masks"):
        run(capsys, "--dataset", "pennfudan", "--data-path", root, "--fix", tmp_path / "fixed")


def test_broken_or_missing_inputs_stop_with_one_line(tmp_path, capsys):
    with pytest.raises(SetupError, match="Annotations not found"):
        run(capsys, "--dataset", "voc", "--data-path", tmp_path / "nowhere")
    root = make_voc(
        tmp_path / "voc", {"a": ((64, 48), []), "b": ((64, 48), [("cat", [3, 3, 3, 9], 0)]), "c": ((64, 48), [])}
    )
    (root / "Annotations" / "a.xml").write_text("<annotation><size>")
    with pytest.raises(SetupError, match=r"a\.xml: invalid XML"):
        run(capsys, "--dataset", "voc", "--data-path", root, "--classes", CLASSES)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(SetupError, match=r"broken\.json is not valid JSON"):
        run(capsys, "--dataset", "coco", "--data-path", tmp_path, "--train-ann", tmp_path / "broken.json")

    # the command line: exit 2 with one "error:" line; exit 1 with the report, and the progress line on stderr
    argv = [sys.executable, REPO / "references" / "check_dataset.py", "--dataset", "voc", "--data-path", root]
    failed = subprocess.run([*argv, "--classes", CLASSES], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stdout == "" and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith(f"error: {root / 'Annotations' / 'a.xml'}: invalid XML")
    (root / "Annotations" / "a.xml").unlink()
    done = subprocess.run([*argv, "--classes", CLASSES, "--workers", "2"], capture_output=True, text=True)
    assert done.returncode == 1 and "b.xml: cat [3, 3, 3, 9]" in done.stdout and "[2/2] images decoded" in done.stderr


def test_real_bccd(tmp_path, capsys):
    root = SHARED_DATA / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"real BCCD not found at {root} (set DETECTION_DATA to the folder holding BCCD/)")
    argv = ["--dataset", "voc", "--classes", "RBC,WBC,Platelets"]
    code, blocks, out = run(capsys, *argv, "--data-path", root, "--fix", tmp_path / "fixed", workers=2)
    # BCCD's only errors: two clicks without a drag (xmin == xmax and ymin == ymax), in 364 images
    assert code == 1 and "\n2 errors\n" in out and "summary of 364 images" in out
    assert blocks["zero-size boxes"].endswith(
        "  BloodImage_00338.xml: RBC [504, 337, 504, 337]\n  BloodImage_00343.xml: RBC [181, 329, 181, 329]"
    )
    # and 8 cells drawn twice, 2-6 px apart: a warning, as two cells may overlap that much
    twice = "BloodImage_00020.xml: RBC [144, 366, 251, 473] and [142, 364, 249, 471], IoU 0.93"
    assert twice in blocks["boxes drawn twice?"]
    assert sorted(blocks) == ["boxes drawn twice?", "zero-size boxes"] and "drawn twice?: 8 " in out
    assert "  RBC           4155        0     349\n  WBC            372        0     358\n" in out
    assert "  Platelets      361        0     201\n" in out
    code, blocks, out = run(capsys, *argv, "--data-path", tmp_path / "fixed", workers=2)
    assert code == 0 and list(blocks) == ["boxes drawn twice?"] and "\n0 errors\n" in out
