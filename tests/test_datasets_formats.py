"""COCO json, Pascal VOC xml and mmdetection middle-format datasets: small generated files, and the real BCCD and
tiny_coco from ../shared/data when present."""

import json
import os
import pickle
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from torchvision import tv_tensors

from datasets import coco, common
from extras import formats
from extras.formats import custom, voc
from utils import SetupError


# ------------------------------------------------------------------------------------------------ helpers
def write_image(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (200, 40, 90)).save(path)  # JPEG or PNG, from the suffix


def assert_contract(ds, idx, num_classes, masks=False):
    image, target = ds[idx]
    height, width = image.shape[-2:]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape[0] == 3
    assert ds.get_height_and_width(idx) == (height, width)
    boxes = target["boxes"]
    n = len(boxes)
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32 and boxes.shape == (n, 4)
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and tuple(boxes.canvas_size) == (height, width)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
    assert target["labels"].dtype == torch.int64 and target["labels"].shape == (n,)
    assert ((target["labels"] >= 1) & (target["labels"] <= num_classes)).all()
    assert isinstance(target["image_id"], int)
    assert target["area"].dtype == torch.float32 and target["area"].shape == (n,) and (target["area"] > 0).all()
    assert target["iscrowd"].dtype == torch.int64 and set(target["iscrowd"].tolist()) <= {0, 1}
    if masks:
        assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
        assert target["masks"].shape == (n, height, width)
    return image, target


def uncompressed_rle(mask):
    """COCO's uncompressed RLE of a [H, W] 0/1 mask: run lengths in column-major order, starting with a 0-run."""
    counts, value, run = [], 0, 0
    for pixel in mask.T.reshape(-1).tolist():
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    return {"size": list(mask.shape), "counts": counts + [run]}


def catch_warnings(build):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = build()
    return result, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------------ COCO
CROWD = np.zeros((30, 40), dtype=np.uint8)
CROWD[20:30, 0:10] = 1  # a 10 x 10 crowd region in the bottom-left corner of a.jpg
SQUARE = np.zeros((30, 40), dtype=np.uint8)
SQUARE[0:5, 30:40] = 1  # 5 x 10, stored as a compressed (string) RLE


def write_coco(tmp_path):
    """Three images (one in a sub-folder, one without annotations); category ids 90, 0, 5, listed out of order."""
    write_image(tmp_path / "images" / "a.jpg", 40, 30)
    write_image(tmp_path / "images" / "sub" / "dir" / "b.png", 50, 40)
    write_image(tmp_path / "images" / "empty.jpg", 20, 20)
    square_rle = mask_util.encode(np.asfortranarray(SQUARE))
    square_rle["counts"] = square_rle["counts"].decode("ascii")
    two_parts = [[2, 3, 12, 3, 12, 11, 2, 11], [20, 5, 30, 5, 30, 15, 20, 15]]  # 10 x 8 and 10 x 10 px
    data = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 3, "file_name": "sub/dir/b.png", "width": 50, "height": 40},
            {"id": 11, "file_name": "empty.jpg", "width": 20, "height": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 90, "bbox": [2, 3, 28, 12], "area": 180, "iscrowd": 0}
            | {"segmentation": two_parts},
            {"id": 2, "image_id": 7, "category_id": 0, "bbox": [0, 20, 10, 10], "area": 100, "iscrowd": 1}
            | {"segmentation": uncompressed_rle(CROWD)},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [30, 0, 10, 5], "area": 50, "iscrowd": 0}
            | {"segmentation": square_rle},
            {"id": 4, "image_id": 3, "category_id": 5, "bbox": [5, 6, 10, 20], "area": 200, "iscrowd": 0}
            | {"segmentation": [[5, 6, 15, 6, 15, 26, 5, 26]]},
        ],
        "categories": [{"id": 90, "name": "ninety"}, {"id": 0, "name": "zero"}, {"id": 5, "name": "five"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data, indent=1))
    return tmp_path / "images", ann_file


def test_coco_labels_are_contiguous_in_sorted_category_id_order(tmp_path):
    ds = coco.CocoDetection(*write_coco(tmp_path))
    assert ds.classes == ["zero", "five", "ninety"]
    assert ds.label_to_category_id == {1: 0, 2: 5, 3: 90}
    assert ds.category_id_to_label == {0: 1, 5: 2, 90: 3}
    assert [ds[i][1]["image_id"] for i in range(len(ds))] == [3, 7, 11]  # the COCO ids, in id order
    _, target = assert_contract(ds, 1, num_classes=3)
    assert target["labels"].tolist() == [3, 1, 2]
    assert target["boxes"].tolist() == [[2, 3, 30, 15], [0, 20, 10, 30], [30, 0, 40, 5]]  # XYWH -> XYXY
    assert target["iscrowd"].tolist() == [0, 1, 0] and target["area"].tolist() == [180, 100, 50]
    assert "masks" not in target and ds.has_masks


def test_coco_polygons_and_rles_decode_to_their_area(tmp_path):
    ds = coco.CocoDetection(*write_coco(tmp_path), masks=True)
    _, target = assert_contract(ds, 1, num_classes=3, masks=True)
    pixels = target["masks"].sum(dim=(1, 2)).float()
    # pycocotools rasterises a polygon's edges at pixel centres: counts land within a few % of the polygon area
    assert torch.allclose(pixels[0], torch.tensor(180.0), rtol=0.15)
    left, right = target["masks"][0, :, :16].sum(), target["masks"][0, :, 16:].sum()
    assert 70 <= left <= 90 and 90 <= right <= 110  # both parts (10 x 8 and 10 x 10 px) are in the one mask
    assert torch.equal(target["masks"][1], torch.from_numpy(CROWD))  # uncompressed crowd RLE, exactly
    assert torch.equal(target["masks"][2], torch.from_numpy(SQUARE))  # compressed RLE, exactly
    _, empty = assert_contract(ds, 2, num_classes=3, masks=True)
    assert empty["masks"].shape == (0, 20, 20)


def test_coco_empty_images_kept_or_dropped(tmp_path):
    img_folder, ann_file = write_coco(tmp_path)
    kept = coco.CocoDetection(img_folder, ann_file)
    assert len(kept) == 3 and len(kept[2][1]["boxes"]) == 0 and kept[2][1]["boxes"].shape == (0, 4)
    dropped = coco.CocoDetection(img_folder, ann_file, keep_empty=False)
    assert len(dropped) == 2 and 11 not in [dropped[i][1]["image_id"] for i in range(2)]


def test_coco_file_name_in_sub_folder(tmp_path):
    ds = coco.CocoDetection(*write_coco(tmp_path))
    image, target = assert_contract(ds, 0, num_classes=3)
    assert image.shape == (3, 40, 50) and target["boxes"].tolist() == [[5, 6, 15, 26]]


def test_coco_truncated_or_missing_json_is_named(tmp_path):
    img_folder, ann_file = write_coco(tmp_path)
    text = ann_file.read_text()
    ann_file.write_text(text[: len(text) // 2])
    with pytest.raises(SetupError, match=r"instances\.json is not valid JSON: .* line \d+, column \d+"):
        coco.CocoDetection(img_folder, ann_file)
    with pytest.raises(SetupError, match="nothere.json not found"):
        coco.CocoDetection(img_folder, tmp_path / "nothere.json")


def test_coco_keypoints_are_n_by_j_by_3(tmp_path):
    write_image(tmp_path / "p.jpg", 20, 20)
    data = {
        "images": [{"id": 1, "file_name": "p.jpg", "width": 20, "height": 20}],
        "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "keypoints": [2, 3, 2] * 17}],
        "categories": [{"id": 1, "name": "person"}],
    }
    (tmp_path / "kp.json").write_text(json.dumps(data))
    _, target = coco.CocoDetection(tmp_path, tmp_path / "kp.json")[0]
    assert target["keypoints"].dtype == torch.float32 and target["keypoints"].shape == (1, 17, 3)
    assert target["keypoints"][0, 16].tolist() == [2, 3, 2]


# ------------------------------------------------------------------------------------------------ VOC
def write_voc(root, stem, objects, size=(40, 30)):
    """objects: (name, (xmin, ymin, xmax, ymax) as written, difficult as written or None for no tag).

    size=None writes no <size> and no image: the caller writes one of the size it wants."""
    parts = ["<annotation>", f"<filename>{stem}.jpg</filename>"]
    if size:
        write_image(root / "JPEGImages" / f"{stem}.jpg", *size)
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        tag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(voc.BOX_TAGS, box))
        parts.append(f"<object><name>{name}</name>{tag}<bndbox>{coords}</bndbox></object>")
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{stem}.xml").write_text("\n".join(parts + ["</annotation>"]))


def write_split(root, split, stems):
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")


def test_voc_one_based_float_coords_and_difficult(tmp_path):
    objects = [
        ("dog", (1, 2, 10, 20), 0),  # the first ten columns: [0, 10]
        ("cat", ("5.5", "6.25", "20.5", "25.75"), 1),  # float coordinates, and difficult -> iscrowd
        ("cat", (11, 11, 40, 30), None),  # no <difficult> tag; right up to the bottom-right corner
        ("dog", (3, 3, 4, 4), ""),  # empty <difficult></difficult>
    ]
    write_voc(tmp_path, "img1", objects)
    write_split(tmp_path, "train", ["img1"])
    ds = voc.VOCDetection(tmp_path, "train", classes=["cat", "dog"])
    _, target = assert_contract(ds, 0, num_classes=2)
    assert target["boxes"].tolist() == [[0, 1, 10, 20], [4.5, 5.25, 20.5, 25.75], [10, 10, 40, 30], [2, 2, 4, 4]]
    assert target["labels"].tolist() == [2, 1, 1, 2]
    assert target["iscrowd"].tolist() == [0, 1, 0, 0]
    assert target["area"].tolist() == [190, 16 * 20.5, 600, 4] and target["image_id"] == 0


def test_voc_unknown_class_names_file_and_fix(tmp_path):
    write_voc(tmp_path, "img1", [("cat", (1, 1, 5, 5), 0), ("zebra", (1, 1, 5, 5), 0)])
    with pytest.raises(SetupError, match=r"(?s)img1\.xml: class 'zebra' .*--classes cat,zebra"):
        voc.VOCDetection(tmp_path, classes=["cat"], split_ids=["img1"])


def test_voc_broken_xml_and_missing_field_are_named(tmp_path):
    write_voc(tmp_path, "img1", [("cat", (1, 1, 5, 5), 0)])
    (tmp_path / "Annotations" / "img1.xml").write_text("<annotation>\n<object><name>cat</name>\n</annotation>")
    with pytest.raises(SetupError, match=r"img1\.xml: invalid XML at line 3, column \d+"):
        voc.VOCDetection(tmp_path, classes=["cat"], split_ids=["img1"])
    (tmp_path / "Annotations" / "img1.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    with pytest.raises(SetupError, match=r"img1\.xml: <object> number 1 lacks <name> or <bndbox>"):
        voc.VOCDetection(tmp_path, classes=["cat"], split_ids=["img1"])


def test_voc_without_split_file_takes_split_ids(tmp_path):
    for stem in ("b", "a", "c"):
        write_voc(tmp_path, stem, [("cat", (1, 1, 5, 5), 0)])
    with pytest.raises(SetupError, match=r"ImageSets/Main/train\.txt not found.*split_ids"):
        voc.VOCDetection(tmp_path, classes=["cat"])
    assert voc.list_annotation_ids(tmp_path) == ["a", "b", "c"]
    ds = voc.VOCDetection(tmp_path, classes=["cat"], split_ids=voc.list_annotation_ids(tmp_path)[1:])
    assert len(ds) == 2 and ds[1][1]["image_id"] == 1


def test_read_classes(tmp_path):
    assert common.read_classes("RBC, WBC,Platelets") == ["RBC", "WBC", "Platelets"]
    (tmp_path / "classes.txt").write_text("cat\n\ndog\n")
    assert common.read_classes(str(tmp_path / "classes.txt")) == ["cat", "dog"]
    with pytest.raises(SetupError, match="once"):
        common.read_classes("cat,cat")
    with pytest.raises(SetupError, match="missing.txt not found"):
        common.read_classes(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------------------ middle format
MIDDLE = [
    {
        "filename": "x/a.jpg",
        "width": 40,
        "height": 30,
        "ann": {
            "bboxes": [[1, 2, 11, 12], [20.5, 3, 30, 29]],
            "labels": [1, 0],
            "bboxes_ignore": [[0, 0, 5, 5]],
            "labels_ignore": [2],
        },
    },
    {"filename": "b.png", "width": 20, "height": 20, "ann": {"bboxes": [], "labels": []}},
]


ANN_DTYPES = {"bboxes": np.float32, "labels": np.int64, "bboxes_ignore": np.float32, "labels_ignore": np.int64}


def write_middle(tmp_path, suffix, entries=MIDDLE, protocol=2):
    write_image(tmp_path / "img" / "x" / "a.jpg", 40, 30)
    write_image(tmp_path / "img" / "b.png", 20, 20)
    path = tmp_path / f"ann{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(entries))
    else:  # numpy arrays, as mmcv.dump writes them
        arrays = [e | {"ann": {k: np.asarray(v, dtype=ANN_DTYPES[k]) for k, v in e["ann"].items()}} for e in entries]
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 5])
def test_custom_json_and_pkl_give_the_same_targets(tmp_path, protocol):
    classes = ["cat", "dog", "bird"]
    from_json = custom.CustomDataset(write_middle(tmp_path, ".json"), tmp_path / "img", classes)
    from_pkl = custom.CustomDataset(write_middle(tmp_path, ".pkl", protocol=protocol), tmp_path / "img", classes)
    _, target = assert_contract(from_json, 0, num_classes=3)
    assert target["boxes"].tolist() == [[1, 2, 11, 12], [20.5, 3, 30, 29], [0, 0, 5, 5]]
    assert target["labels"].tolist() == [2, 1, 3] and target["iscrowd"].tolist() == [0, 0, 1]
    for idx in range(2):
        json_target, pkl_target = from_json[idx][1], from_pkl[idx][1]
        assert json_target.keys() == pkl_target.keys()
        for key, value in json_target.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(pkl_target[key])), key


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_custom_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    entries = [{"filename": "b.png", "width": 20, "height": 20, "ann": RunsACommand(f"touch {marker}")}]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(entries))
    with pytest.raises(SetupError, match=r"(?s)evil\.pkl asks to load \w+\.system.*\.json"):
        custom.CustomDataset(path, tmp_path, ["cat"])
    assert not marker.exists()


@pytest.mark.parametrize("filename", ["../outside.jpg", "/etc/passwd", "x/../../y.jpg"])
def test_custom_filename_must_stay_inside_img_prefix(tmp_path, filename):
    entries = [{"filename": filename, "width": 20, "height": 20, "ann": {"bboxes": [], "labels": []}}]
    with pytest.raises(SetupError, match="must be a relative path inside"):
        custom.CustomDataset(write_middle(tmp_path, ".json", entries), tmp_path / "img", ["cat"])


def test_custom_label_out_of_range_names_the_fix(tmp_path):
    with pytest.raises(SetupError, match=r"entry 0: labels must be 0\.\.1"):
        custom.CustomDataset(write_middle(tmp_path, ".json"), tmp_path / "img", ["cat", "dog"])


# ------------------------------------------------------------------------------------------------ all formats
def degenerate_coco(tmp_path):
    images, annotations = [], []
    for i, bbox in enumerate([[0, 0, 0, 5], [10, 10, 40, 5], [50, 50, 5, 5], [1, 1, 5, -1]]):
        write_image(tmp_path / f"d{i}.jpg", 30, 20)
        images.append({"id": i, "file_name": f"d{i}.jpg", "width": 30, "height": 20})
        annotations += [{"image_id": i, "category_id": 1, "bbox": b} for b in ([2, 2, 4, 4], bbox)]
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    return lambda: coco.CocoDetection(tmp_path, tmp_path / "d.json")


def degenerate_voc(tmp_path):
    for i, box in enumerate([(1, 1, 1, 5), (11, 11, 50, 15), (51, 51, 55, 55), (2, 2, 6, 2)]):
        write_voc(tmp_path, f"d{i}", [("cat", (3, 3, 6, 6), 0), ("cat", box, 0)], size=(30, 20))
    return lambda: voc.VOCDetection(tmp_path, classes=["cat"], split_ids=[f"d{i}" for i in range(4)])


def degenerate_custom(tmp_path):
    entries = []
    for i, box in enumerate([[0, 0, 0, 5], [10, 10, 50, 15], [50, 50, 55, 55], [1, 1, 6, 0]]):
        write_image(tmp_path / f"d{i}.jpg", 30, 20)
        ann = {"bboxes": [[2, 2, 6, 6], box], "labels": [0, 0]}
        entries.append({"filename": f"d{i}.jpg", "width": 30, "height": 20, "ann": ann})
    (tmp_path / "d.json").write_text(json.dumps(entries))
    return lambda: custom.CustomDataset(tmp_path / "d.json", tmp_path, ["cat"])


@pytest.mark.parametrize("make", [degenerate_coco, degenerate_voc, degenerate_custom])
def test_degenerate_boxes_dropped_outside_clipped_one_warning(tmp_path, make):
    # per image: a good box, plus one of: zero width, past the right edge, wholly outside, zero height
    ds, messages = catch_warnings(make(tmp_path))
    assert len(messages) == 1
    assert "dropped 3 boxes" in messages[0] and "clipped 1 boxes" in messages[0] and "in 4 files" in messages[0]
    assert "d0." in messages[0] and "d2." in messages[0] and "d3." not in messages[0]  # the first 3 files only
    assert [len(ds[i][1]["boxes"]) for i in range(4)] == [1, 2, 1, 1]
    assert ds[1][1]["boxes"][1].tolist() == [10, 10, 30, 15]
    for i in range(4):
        assert_contract(ds, i, num_classes=1)


def test_get_height_and_width_does_not_decode(tmp_path, monkeypatch):
    coco_ds = coco.CocoDetection(*write_coco(tmp_path / "coco"))
    write_voc(tmp_path / "voc", "sized", [], size=(40, 30))
    write_voc(tmp_path / "voc", "unsized", [], size=None)  # no <size>: the JPEG header gives it
    write_image(tmp_path / "voc" / "JPEGImages" / "unsized.jpg", 24, 16)
    voc_ds = voc.VOCDetection(tmp_path / "voc", classes=["cat"], split_ids=["sized", "unsized"])
    custom_ds = custom.CustomDataset(write_middle(tmp_path, ".json"), tmp_path / "img", ["a", "b", "c"])

    def fail(*args, **kwargs):
        raise AssertionError("decoded an image")

    monkeypatch.setattr(formats, "read_image", fail)  # voc and custom decode through formats.BoxRecords
    assert [coco_ds.get_height_and_width(i) for i in range(3)] == [(40, 50), (30, 40), (20, 20)]
    assert [voc_ds.get_height_and_width(i) for i in range(2)] == [(30, 40), (16, 24)]
    assert [custom_ds.get_height_and_width(i) for i in range(2)] == [(30, 40), (20, 20)]


# ------------------------------------------------------------------------------------------------ real data
@pytest.fixture
def real_bccd():
    root = SHARED_DATA / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"real BCCD not found at {root} (set DETECTION_DATA to the folder holding BCCD/)")
    return root


@pytest.fixture
def real_tiny_coco():
    root = SHARED_DATA / "tiny_coco"
    if not (root / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"real tiny_coco not found at {root} (set DETECTION_DATA to the folder holding tiny_coco/)")
    return root


def test_real_bccd_train_split(real_bccd):
    # BCCD's BloodImage_00343 has an RBC box with xmin == xmax and ymin == ymax: a click without a drag
    with pytest.warns(UserWarning, match=r"dropped 1 boxes .*BloodImage_00343\.xml"):
        ds = voc.VOCDetection(real_bccd, "train", classes=common.read_classes("RBC,WBC,Platelets"))
    assert len(ds) == 205
    counts = torch.zeros(4, dtype=torch.int64)
    for idx in range(len(ds)):
        _, target = assert_contract(ds, idx, num_classes=3)
        assert target["image_id"] == idx and target["iscrowd"].sum() == 0  # BCCD marks nothing difficult
        counts += torch.bincount(target["labels"], minlength=4)
    assert counts[0] == 0 and (counts[1:] > 0).all()  # every class present, no background label


def test_real_tiny_coco_val_with_masks(real_tiny_coco):
    ds = coco.CocoDetection(
        real_tiny_coco / "val2017", real_tiny_coco / "annotations" / "instances_val2017.json", masks=True
    )
    assert len(ds) == 50 and len(ds.classes) == 80 and ds.has_masks
    assert max(ds.label_to_category_id.values()) == 90  # COCO's ids have gaps; labels do not
    assert all(ds.category_id_to_label[ds.label_to_category_id[k]] == k for k in range(1, 81))
    num_crowd, mask_pixels, areas = 0, 0.0, 0.0
    for idx in range(len(ds)):
        _, target = assert_contract(ds, idx, num_classes=80, masks=True)
        num_crowd += int(target["iscrowd"].sum())
        mask_pixels += float(target["masks"].sum())
        areas += float(target["area"].sum())
    assert num_crowd > 0
    assert abs(mask_pixels / areas - 1) < 0.02  # decoded masks cover the area COCO recorded for them


def test_real_tiny_coco_keypoints(real_tiny_coco):
    ann_file = real_tiny_coco / "annotations" / "person_keypoints_val2017.json"
    ds = coco.CocoDetection(real_tiny_coco / "val2017", ann_file)
    assert ds.num_keypoints == 17 and ds.classes == ["person"]
    for idx in range(0, len(ds), 10):
        _, target = assert_contract(ds, idx, num_classes=1)
        assert target["keypoints"].shape == (len(target["boxes"]), 17, 3)
