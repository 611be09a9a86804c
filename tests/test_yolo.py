"""YOLO txt labels (extras/formats/yolo.py): small generated datasets on a few real BCCD images (generated ones when
../shared/data is absent), references/convert_dataset.py to and from yolo, references/check_dataset.py on yolo,
and a one-epoch train.py run."""

import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, make_pennfudan
from PIL import Image
from test_check_dataset import run as check
from test_convert_dataset import convert, make_voc
from test_datasets_formats import assert_contract

import train
from datasets import get_dataset
from extras.formats.voc import parse_annotation
from utils import SetupError

sys.path.insert(0, str(REPO / "references"))

BCCD = SHARED_DATA / "BCCD"
NAMES = ["RBC", "WBC", "Platelets"]


def write_images(folder, names, size=(640, 480)):
    """BCCD images (640x480) under the given names when ../shared/data has them, else generated 640x480 JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    real = sorted((BCCD / "JPEGImages").glob("*.jpg"))[: len(names)]
    for i, name in enumerate(names):
        if len(real) == len(names):
            shutil.copy(real[i], folder / name)
        else:
            Image.new("RGB", size, (200, 120, 160)).save(folder / name)


def make_yolo(root, labels, yaml="train: images/train\nval: images/val\nnames: [RBC, WBC, Platelets]\n"):
    """root/data.yaml and, per "split/name.jpg": its image and, unless the text is None, labels/split/name.txt."""
    for path, text in labels.items():
        split, name = path.split("/")
        write_images(root / "images" / split, [name])
        if text is not None:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / name).with_suffix(".txt").write_text(text)
    (root / "data.yaml").write_text(yaml)
    return root


def build(root, **options):
    return get_dataset("yolo", root, None, None, **options)


def test_boxes_in_pixels_negatives_and_the_contract(tmp_path):
    root = make_yolo(
        tmp_path / "y",
        {
            "train/a.jpg": "0 0.5 0.5 0.25 0.5\n\n2 0.1 0.2 0.05 0.1\n",  # a blank line is no row
            "train/b.jpg": "",  # an empty txt: a negative
            "train/c.jpg": None,  # no txt: a negative
            "val/d.jpg": "1 0.5 0.5 1 1\n",
        },
    )
    train_set, val_set, classes = build(root)
    assert classes == NAMES and len(train_set) == 3 and len(val_set) == 1
    image, target = assert_contract(train_set, 0, 3)
    assert image.shape[-2:] == (480, 640) and target["image_id"] == 0
    # cx 0.5 w 0.25 of 640 px: x 240..400; cy 0.5 h 0.5 of 480 px: y 120..360. Class 2 -> label 3.
    assert target["boxes"].tolist() == [[240, 120, 400, 360], [48, 72, 80, 120]]
    assert target["labels"].tolist() == [1, 3] and target["area"].tolist() == [160 * 240, 32 * 48]
    assert target["iscrowd"].tolist() == [0, 0] and "masks" not in target
    for idx in (1, 2):
        _, target = assert_contract(train_set, idx, 3)
        assert target["boxes"].shape == (0, 4) and target["image_id"] == idx
    assert val_set[0][1]["boxes"].tolist() == [[0, 0, 640, 480]] and val_set[0][1]["labels"].tolist() == [2]
    assert not train_set.has_masks


def test_exif_rotated_image_uses_its_upright_size(tmp_path):
    root = make_yolo(tmp_path / "y", {"train/a.jpg": "0 0.25 0.5 0.5 0.5\n", "val/b.jpg": ""})
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48 wide and 64 high, shown rotated by 90 degrees: 64 wide, 48 high
    Image.new("RGB", (48, 64)).save(root / "images" / "train" / "a.jpg", exif=exif)
    train_set, _, _ = build(root)
    assert train_set.get_height_and_width(0) == (48, 64)
    image, target = assert_contract(train_set, 0, 3)
    assert image.shape[-2:] == (48, 64) and target["boxes"].tolist() == [[0, 12, 32, 36]]


def test_polygons_become_masks_and_boxes_their_rectangle(tmp_path):
    root = make_yolo(
        tmp_path / "y",
        {
            "train/a.jpg": "1 0.25 0.25 0.75 0.25 0.75 0.75 0.25 0.75\n0 0.1 0.1 0.3 0.1 0.1 0.3\n2 0.5 0.5 0.1 0.1\n",
            "val/b.jpg": "0 0.5 0.5 0.5 0.5\n",  # box rows only: masks too, as the train split has polygons
        },
    )
    train_set, val_set, _ = build(root)
    assert train_set.has_masks and val_set.has_masks
    _, target = assert_contract(train_set, 0, 3, masks=True)
    # the polygons' bounds; the box row's own box
    assert target["boxes"].tolist() == [[160, 120, 480, 360], [64, 48, 192, 144], [288, 216, 352, 264]]
    masks = target["masks"]
    assert masks[0].sum() == 320 * 240 and masks[0, 120:360, 160:480].all()  # a rectangle polygon fills its box
    assert 0.45 < masks[1].sum() / (128 * 96) < 0.55 and masks[1, 50, 66] == 1 and masks[1, 140, 188] == 0
    assert masks[2].sum() == 64 * 48 and masks[2, 216:264, 288:352].all()  # the box row: its rectangle
    assert target["area"].tolist() == masks.sum(dim=(1, 2)).float().tolist()  # the mask's area
    _, target = assert_contract(val_set, 0, 3, masks=True)
    assert target["masks"].sum() == 320 * 240


def test_names_as_a_dict_nc_and_the_yaml_itself(tmp_path):
    labels = {"train/a.jpg": "2 0.5 0.5 0.2 0.2\n", "val/b.jpg": ""}
    yaml = "train: images/train\nval: images/val\nnc: 3\nnames:\n  0: RBC\n  1: WBC\n  2: Platelets\n"
    root = make_yolo(tmp_path / "y", labels, yaml)
    assert build(root / "data.yaml")[2] == NAMES  # --data-path may be the yaml file
    (root / "data.yaml").write_text(yaml.replace("nc: 3", "nc: 4"))
    with pytest.raises(SetupError, match="nc is 4 but names lists 3 classes"):
        build(root)
    (root / "data.yaml").write_text("train: images/train\nnames:\n  0: a\n  2: b\n")
    with pytest.raises(SetupError, match=r"names must be numbered 0\.\.1"):
        build(root)
    (root / "data.yaml").write_text("train: images/nowhere\nnames: [a]\n")
    with pytest.raises(SetupError, match="train 'images/nowhere' not found"):
        build(root)


def test_roboflow_layout_and_no_val_split(tmp_path, capsys):
    # Roboflow: DIR/data.yaml beside DIR/train/images, with paths written from one folder further down
    root = tmp_path / "rf"
    write_images(root / "train" / "images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])
    write_images(root / "valid" / "images", ["f.jpg"])
    (root / "train" / "labels").mkdir()
    (root / "train" / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    yaml = "train: ../train/images\nval: ../valid/images\nnc: 3\nnames: ['RBC', 'WBC', 'Platelets']\n"
    (root / "data.yaml").write_text(yaml)
    train_set, val_set, _ = build(root)
    assert (len(train_set), len(val_set)) == (5, 1) and train_set[0][1]["labels"].tolist() == [2]

    (root / "data.yaml").write_text("path: train\ntrain: images\nnames: [RBC, WBC, Platelets]\n")  # no val
    train_set, val_set, _ = build(root, val_size=2, split_seed=1)
    assert "has no val split: holding out train images" in capsys.readouterr().out
    assert (len(train_set), len(val_set)) == (3, 2) and set(train_set.indices).isdisjoint(val_set.indices)
    assert val_set.dataset.transforms is None and val_set.dataset.items is train_set.dataset.items


def test_malformed_rows_are_dropped_with_file_and_line_or_refused_under_strict(tmp_path):
    bad = "0 0.5 0.5 0.2\n0 0.5 0.5 0.2 abc\n0 1.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n"  # lines 1-4: malformed
    bad += "1 0.5 0.5 0.2 0.2\n0 .1 .1 .2 .2 .3\n"  # line 5 fine, line 6 malformed
    ok = "2 1.0000001 0.5 0.2 -0.0000001\n"  # exporters' rounding at the border: clamped to 0-1, not refused
    root = make_yolo(tmp_path / "y", {"train/a.jpg": bad, "train/b.jpg": ok, "val/c.jpg": ""})
    label = root / "labels" / "train" / "a.txt"
    counts = "2 wrong column count, 1 not numbers, 1 outside 0-1, 1 unknown class id"
    with pytest.warns(UserWarning, match=f"dropped 5 malformed label rows \\({counts}\\), first: ") as caught:
        train_set, _, _ = build(root)
    message = str(caught[0].message)
    assert f"{label}:1: wrong column count: 4 (expected 5" in message and f"{label}:2: not numbers" in message
    assert f"{label}:3: outside 0-1" in message and f"{label}:4: unknown class id: 7, not one of 0..2" in message
    assert f"{label}:6: wrong column count: 6" in message
    assert train_set[0][1]["labels"].tolist() == [2]  # line 5 kept
    assert train_set[1][1]["boxes"].shape == (0, 4)  # zero height (clamped to 0): dropped with the box warning
    with pytest.raises(SetupError, match=rf"5 malformed label rows \(2 wrong .*first: {label}:1: wrong.*--strict"):
        build(root, strict=True)


def test_missing_pyyaml_names_the_pip_command(tmp_path, monkeypatch):
    root = make_yolo(tmp_path / "y", {"train/a.jpg": "", "val/b.jpg": ""})
    monkeypatch.setitem(sys.modules, "yaml", None)  # what `import yaml` meets without PyYAML installed
    with pytest.raises(SetupError, match="pip install pyyaml"):
        build(root)


def test_voc_to_yolo_to_voc_drops_difficult_and_keeps_the_rest_exactly(tmp_path, capsys):
    root = make_voc(tmp_path / "voc")  # fractional coordinates, difficult objects, a negative, an xml without size
    out, back = tmp_path / "yolo", tmp_path / "back"
    convert("--from", "voc", "--data-path", root, "--classes", "cat,dog", "--to", "yolo", "--out", out)
    printed = capsys.readouterr().out
    assert "dropped 2 ignored boxes (VOC difficult" in printed and "4 images, 5 boxes, of which 0 ignored" in printed
    assert (out / "data.yaml").read_text().endswith('train: images/train\nnc: 2\nnames: ["cat", "dog"]\n')
    assert (out / "images" / "train" / "img0.jpg").is_symlink() and (out / "labels" / "train" / "img2.txt").is_file()
    # img0's cat: xmin 1..xmax 20 (VOC, 1-based) are the pixel edges 0..20 of a 64 px wide image
    assert (out / "labels" / "train" / "img0.txt").read_text().startswith("0 0.1562500000 0.3125000000 0.3125000000")
    with pytest.raises(SetupError, match="exists already"):
        convert("--from", "voc", "--data-path", root, "--classes", "cat,dog", "--to", "yolo", "--out", out)

    convert("--from", "yolo", "--data-path", out, "--to", "voc", "--out", back, "--split", "train")
    for image_id in ("img0", "img1", "img2", "img3"):
        original = parse_annotation(root / "Annotations" / f"{image_id}.xml")[2]
        width, height, found = parse_annotation(back / "Annotations" / f"{image_id}.xml")
        assert found == [(name, [float(v) for v in box], 0) for name, box, difficult in original if not difficult]


def test_yolo_polygons_to_coco_and_splits(tmp_path, capsys):
    labels = {"train/a.jpg": "1 0.25 0.25 0.75 0.25 0.5 0.75\n", "val/b.jpg": "0 .5 .5 .5 .5\n"}
    root = make_yolo(tmp_path / "y", labels)
    convert("--from", "yolo", "--data-path", root, "--split", "val", "--to", "coco", "--out", tmp_path / "v.json")
    assert "1 images, 1 boxes" in capsys.readouterr().out
    convert("--from", "yolo", "--data-path", root, "--to", "coco", "--out", tmp_path / "t.json")
    printed = capsys.readouterr().out
    assert "note: 1 polygon rows are converted to their bounding boxes" in printed
    assert "  WBC             1       0\n" in printed
    with pytest.raises(SetupError, match="--split trainval: a YOLO data.yaml has the splits train, val, test"):
        convert("--from", "yolo", "--data-path", root, "--split", "trainval", "--to", "coco", "--out", "x.json")
    with pytest.raises(SetupError, match="has no test split; pass --split train or val"):
        convert("--from", "yolo", "--data-path", root, "--split", "test", "--to", "coco", "--out", "x.json")


def test_check_dataset_reports_rows_negatives_and_orphans(tmp_path, capsys):
    labels = {
        "train/a.jpg": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n",  # line 2: 4 columns
        "train/b.jpg": None,  # no txt: a negative
        "train/c.jpg": "1 0.95 0.5 0.2 0.2\n",  # crosses the right border
        "val/d.jpg": "2 0.5 0.5 0.1 0.1\n",
    }
    root = make_yolo(tmp_path / "y", labels)
    (root / "labels" / "val" / "gone.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    code, blocks, out = check(capsys, "--dataset", "yolo", "--data-path", root)
    assert code == 1 and "\n2 errors" in out and "summary of 4 images" in out
    assert "labels/train/a.txt:2: wrong column count: 4" in blocks["malformed label rows"]
    assert "images/train/b.jpg (no label file)" in blocks["images without objects"]
    assert "labels/val/gone.txt" in blocks["labels without images"]
    crossing = "labels/train/c.txt: line 1 class 1 [0.95, 0.5, 0.2, 0.2], image 640x480"
    assert crossing in blocks["boxes crossing the border"]
    with pytest.raises(SetupError, match="--fix does not rewrite YOLO labels"):
        check(capsys, "--dataset", "yolo", "--data-path", root, "--fix", tmp_path / "fixed")


def test_real_bccd_round_trip_within_a_hundredth_of_a_pixel(tmp_path, capsys):
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"real BCCD not found at {BCCD} (set DETECTION_DATA to the folder holding BCCD/)")
    out = tmp_path / "yolo"
    worst, boxes = 0.0, 0
    for split in ("train", "val"):
        with pytest.warns(UserWarning, match="dropped 1 boxes"):  # BCCD's clicks without a drag (00343, 00338)
            convert("--from", "voc", "--data-path", BCCD, "--split", split, "--classes", ",".join(NAMES), "--to",
                    "yolo", "--out", out, "--workers", 2)  # fmt: skip
        convert("--from", "yolo", "--data-path", out, "--split", split, "--to", "voc", "--out", tmp_path / split)
        for image_id in (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
            original = parse_annotation(BCCD / "Annotations" / f"{image_id}.xml")[2]
            original = [o for o in original if o[1][2] > o[1][0] and not o[2]]  # BCCD has no difficult objects
            found = parse_annotation(tmp_path / split / "Annotations" / f"{image_id}.xml")[2]
            assert [name for name, _, _ in found] == [name for name, _, _ in original], image_id
            for (_, a, _), (_, b, _) in zip(original, found):
                worst = max(worst, *(abs(x - y) for x, y in zip(a, b)))
            boxes += len(found)
    assert boxes == 3941 and worst < 0.01  # measured: every box back exactly (worst 0.0 px)
    assert "205 images, 2804 boxes" in capsys.readouterr().out


def test_train_one_epoch_on_yolo(tmp_path, capsys):
    images = tmp_path / "ped"
    all_boxes = make_pennfudan(images, num_images=6)  # PNGs with bright rectangles, and their pixel boxes
    root = tmp_path / "y"
    for i, boxes in enumerate(all_boxes):
        split = "val" if i >= 4 else "train"
        image = Image.open(images / "PNGImages" / f"Ped{i:05d}.png")
        width, height = image.size
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / split / f"{i}.png")
        b = np.asarray(boxes, dtype=np.float64) / [width, height, width, height]
        rows = [f"0 {(x1 + x2) / 2} {(y1 + y2) / 2} {x2 - x1} {y2 - y1}\n" for x1, y1, x2, y2 in b]
        (root / "labels" / split / f"{i}.txt").write_text("".join(rows))
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [person]\n")
    argv = ["--dataset", "yolo", "--data-path", root, "--model", "fasterrcnn_mobilenet_v3_large_320_fpn"]
    argv += ["--weights", "none", "--epochs", 1, "-b", 2, "--min-size", 64, "--max-size", 96, "-j", 0]
    argv += ["--save-interval", 100, "--output-dir", tmp_path / "run"]
    metrics = train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    assert "yolo: 4 train / 2 val images, classes ['person']" in capsys.readouterr().out
    assert 0 <= metrics["bbox"]["AP"] <= 1 and torch.load(tmp_path / "run" / "checkpoint.pth")["epoch"] == 0
