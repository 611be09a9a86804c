"""references/convert_dataset.py on small generated datasets: an exact VOC -> COCO -> list of dicts -> VOC round trip,
the same evaluation numbers from all three formats, the command line, and BCCD from ../shared/data when present."""

import json
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA
from PIL import Image
from test_datasets_formats import write_coco
from test_engine import FixedModel

import engine
import transforms
import utils
from datasets.coco import CocoDetection
from extras.formats.custom import CustomDataset
from extras.formats.voc import VOCDetection, parse_annotation
from utils import SetupError

sys.path.insert(0, str(REPO / "references"))
import convert_dataset  # noqa: E402

CLASSES = ["cat", "dog"]
# VOC id -> ((width, height), [(name, [xmin, ymin, xmax, ymax] 1-based inclusive, difficult)]). Fractions of
# powers of two keep float coordinates exact in float32 too, so every format must give identical numbers.
VOC = {
    "img0": ((64, 48), [("cat", [1, 1, 20, 30], 0), ("dog", [30.5, 10.25, 60, 47], 0)]),
    "img1": ((48, 64), [("dog", [5, 5, 40, 60], 1), ("cat", [10, 12, 30.75, 33], 0), ("dog", [2, 40, 22, 64], 0)]),
    "img2": ((64, 48), []),  # no objects: a negative, kept by every format
    "img3": ((40, 40), [("cat", [2, 3, 39, 40], 0), ("cat", [12.5, 12, 25, 20], 1)]),  # xml without <size>
}


def make_voc(root, images=VOC, without_size=("img3",)):
    """Write tiny JPEGs and hand-written VOC xml; ids in `without_size` get no <size> (read from the JPEG header)."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for image_id, ((width, height), objects) in images.items():
        Image.new("RGB", (width, height), (90, 160, 40)).save(root / "JPEGImages" / f"{image_id}.jpg")
        size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        xml = f"<annotation><filename>{image_id}.jpg</filename>{'' if image_id in without_size else size}"
        for name, box, difficult in objects:
            coords = "".join(f"<{tag}>{v}</{tag}>" for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
            xml += f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"
        (root / "Annotations" / f"{image_id}.xml").write_text(xml + "</annotation>\n")
    return root


def convert(*argv):
    """convert_dataset.main on command-line arguments; one worker unless given (process start-up costs more here)."""
    argv = [str(a) for a in argv]
    if "--workers" not in argv:
        argv += ["--workers", "1"]
    return convert_dataset.main(convert_dataset.get_args_parser().parse_args(argv))


@pytest.mark.parametrize("suffix", [".json", ".pkl"])
def test_voc_coco_custom_voc_round_trip_is_exact(tmp_path, suffix):
    root, images = make_voc(tmp_path / "voc"), tmp_path / "voc" / "JPEGImages"
    coco_file, custom_file, back = tmp_path / "c.json", tmp_path / f"m{suffix}", tmp_path / "back"
    convert("--from", "voc", "--data-path", root, "--classes", "cat,dog", "--to", "coco", "--out", coco_file)
    coco = json.loads(coco_file.read_text())
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [(im["id"], im["width"], im["height"]) for im in coco["images"]][-1] == (4, 40, 40)  # from the header
    difficult = coco["annotations"][2]
    assert difficult["bbox"] == [4, 4, 36, 56] and difficult["iscrowd"] == 1 and "segmentation" not in difficult
    assert coco["annotations"][1]["bbox"] == [29.5, 9.25, 30.5, 37.75]  # xmin - 1, ymin - 1, xmax - x, ymax - y

    convert("--from", "coco", "--ann-file", coco_file, "--img-prefix", images, "--to", "custom", "--out", custom_file)
    classes_file = tmp_path / "m.classes.txt"
    assert classes_file.read_text().split() == CLASSES
    entries = pickle.loads(custom_file.read_bytes()) if suffix == ".pkl" else json.loads(custom_file.read_text())
    assert [entry["filename"] for entry in entries] == [f"{i}.jpg" for i in VOC]
    ann = {k: v.tolist() if suffix == ".pkl" else v for k, v in entries[1]["ann"].items()}
    assert ann == {
        "bboxes": [[9, 11, 30.75, 33], [1, 39, 22, 64]],
        "labels": [0, 1],
        "bboxes_ignore": [[4, 4, 40, 60]],
        "labels_ignore": [1],
    }

    source = ["--from", "custom", "--ann-file", custom_file, "--img-prefix", images, "--classes", classes_file]
    convert(*source, "--to", "voc", "--out", back)
    assert (back / "ImageSets" / "Main" / "trainval.txt").read_text().split() == list(VOC)
    assert (back / "classes.txt").read_text().split() == CLASSES
    assert (back / "JPEGImages" / "img0.jpg").is_file()  # a link to the images, not a copy
    for image_id, (size, objects) in VOC.items():
        width, height, found = parse_annotation(back / "Annotations" / f"{image_id}.xml")
        assert (width, height) == size
        # sorted: the list of dicts keeps ignored boxes apart, so they come back after the others in each image
        assert sorted(found) == sorted((name, [float(v) for v in box], difficult) for name, box, difficult in objects)


def test_all_formats_give_the_same_evaluation(tmp_path):
    root, images = make_voc(tmp_path / "voc"), tmp_path / "voc" / "JPEGImages"
    source = ["--from", "voc", "--data-path", root, "--classes", "cat,dog"]
    convert(*source, "--to", "coco", "--out", tmp_path / "c.json")
    convert(*source, "--to", "custom", "--out", tmp_path / "m.json")
    tf = transforms.get_transform(train=False)
    formats = {
        "voc": VOCDetection(root, classes=CLASSES, transforms=tf, split_ids=list(VOC)),
        "coco": CocoDetection(images, tmp_path / "c.json", transforms=tf),
        "custom": CustomDataset(tmp_path / "m.json", images, CLASSES, transforms=tf),
    }
    # Fixed predictions from the VOC ground truth (difficult boxes included): growing shifts for partial credit,
    # falling scores, and one false positive per image
    outputs = []
    for idx, item in enumerate(formats["voc"].items):
        boxes = item["boxes"] + torch.tensor([1.0, -1.0, 2.0, 1.5]) * idx
        outputs.append(
            {
                "boxes": torch.cat([boxes, torch.tensor([[0.0, 0.0, 12.0, 12.0]])]),
                "labels": torch.cat([item["labels"], torch.tensor([2])]),
                "scores": torch.linspace(0.9, 0.3, len(boxes) + 1),
            }
        )
    metrics = {}
    for name, ds in formats.items():
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=utils.collate_fn)
        metrics[name] = engine.evaluate(FixedModel(outputs), loader, torch.device("cpu"), class_names=CLASSES)
    assert 0.1 < metrics["voc"]["bbox"]["AP"] < 0.9
    for name in ("coco", "custom"):
        assert metrics[name]["bbox"] == metrics["voc"]["bbox"], name
        assert metrics[name]["bbox_per_class"] == metrics["voc"]["bbox_per_class"], name


def test_coco_category_ids_crowd_and_empty_images_to_custom(tmp_path, capsys):
    images, ann_file = write_coco(tmp_path)  # category ids 90, 0, 5; a crowd region; an image without objects
    with pytest.raises(SetupError, match=r"3 of the 3 images are not in .*pass --img-prefix"):  # default: beside json
        convert("--from", "coco", "--ann-file", ann_file, "--to", "custom", "--out", tmp_path / "m.json")
    source = ["--from", "coco", "--ann-file", ann_file, "--img-prefix", images]
    convert(*source, "--to", "custom", "--out", tmp_path / "m.json")
    assert "segmentations; they are not converted" in capsys.readouterr().out
    assert (tmp_path / "m.classes.txt").read_text().split() == ["zero", "five", "ninety"]  # sorted-id order
    entries = json.loads((tmp_path / "m.json").read_text())
    assert [e["filename"] for e in entries] == ["sub/dir/b.png", "a.jpg", "empty.jpg"]  # image-id order
    assert entries[1]["ann"] == {
        "bboxes": [[2, 3, 30, 15], [30, 0, 40, 5]],
        "labels": [2, 1],
        "bboxes_ignore": [[0, 20, 10, 30]],  # iscrowd=1
        "labels_ignore": [0],
    }
    assert entries[2]["ann"]["bboxes"] == [] and entries[2]["width"] == 20
    with pytest.raises(SetupError, match=r"JPEGImages/<id>\.jpg only.*sub/dir/b\.png"):
        convert(*source, "--to", "voc", "--out", tmp_path / "v")


def test_box_voc_cannot_hold_fails_validation(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 1, 10], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thin"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    # 1 px wide is xmin == xmax in VOC, which VOCDetection reads as a click without a drag and drops
    with pytest.raises(SetupError, match=r"loads back as 1 images .*thin \[1, 0\] -> \[0, 0\].*VOC drops"):
        convert("--from", "coco", "--ann-file", tmp_path / "c.json", "--to", "voc", "--out", tmp_path / "v")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--from", "voc", "--to", "voc", "--data-path", "x", "--out", "y"], "nothing to convert"),
        (["--from", "voc", "--to", "coco", "--out", "y.json"], "needs --data-path"),
        (["--from", "custom", "--ann-file", "m.json", "--to", "coco", "--out", "y.json"], "needs --classes"),
        (["--from", "coco", "--ann-file", "c.json", "--classes", "a", "--to", "voc", "--out", "y"], "drop --classes"),
        (["--from", "coco", "--ann-file", "c.json", "--to", "custom", "--out", "y.txt"], r"\.json or \.pkl file"),
    ],
)
def test_bad_flags_name_the_fix(argv, message):
    with pytest.raises(SetupError, match=message):
        convert(*argv)


def test_command_line(tmp_path):
    # a box with xmin == xmax: dropped with the dataset classes' warning, and counted as they count it
    root = make_voc(tmp_path / "voc", VOC | {"img4": ((32, 32), [("dog", [7, 7, 7, 20], 0)])})
    script = str(REPO / "references" / "convert_dataset.py")
    argv = [sys.executable, script, "--from", "voc", "--data-path", str(root), "--to", "coco"]
    done = subprocess.run(argv + ["--out", str(tmp_path / "c.json"), "--workers", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[5/5] xml files read" in done.stderr and "dropped 1 boxes" in done.stderr
    assert "5 images, 7 boxes, of which 2 ignored" in done.stdout  # classes: the names found, sorted
    assert "  cat         4       1\n  dog         3       1\n" in done.stdout
    assert len(json.loads((tmp_path / "c.json").read_text())["annotations"]) == 7

    failed = subprocess.run(argv + ["--out", str(tmp_path / "c.txt")], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr == "error: --to coco writes a .json file; got --out " + str(tmp_path / "c.txt") + "\n"


def test_real_bccd_trainval_to_coco(tmp_path):
    root = SHARED_DATA / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"real BCCD not found at {root} (set DETECTION_DATA to the folder holding BCCD/)")
    # BCCD's 2 zero-size boxes (BloodImage_00338 in val, 00343 in train) are both in trainval
    with pytest.warns(UserWarning, match=r"dropped 2 boxes .*BloodImage_00338"):
        voc_args = ["--from", "voc", "--data-path", root, "--split", "trainval", "--classes", "RBC,WBC,Platelets"]
        convert(*voc_args, "--to", "coco", "--out", tmp_path / "bccd.json", "--workers", "2")
    coco = json.loads((tmp_path / "bccd.json").read_text())
    with pytest.warns(UserWarning, match="dropped 2 boxes"):
        voc = VOCDetection(root, "trainval", classes=["RBC", "WBC", "Platelets"])
    assert len(coco["images"]) == len(voc) == 292
    assert len(coco["annotations"]) == sum(len(item["boxes"]) for item in voc.items) == 3941
