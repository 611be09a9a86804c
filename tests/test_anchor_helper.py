"""references/anchor_helper.py: shape IoU, the model's resize, boxes read without decoding images, suggestions that
fit elongated boxes better than the default grid, the command line, and the real BCCD when present."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, make_pennfudan
from PIL import Image
from test_convert_dataset import make_voc
from test_datasets_formats import write_coco, write_middle

import datasets
import models
from extras import formats, skip_bad_images
from extras.formats import custom, voc

sys.path.insert(0, str(REPO / "references"))
import anchor_helper  # noqa: E402

DEFAULT_SIZES, DEFAULT_RATIOS = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)  # torchvision's R-CNN anchors


def run(capsys, *argv):
    """anchor_helper.main on command-line arguments -> (suggested (sizes, ratios), stdout)."""
    args = anchor_helper.get_args_parser().parse_args([str(a) for a in argv])
    grid = anchor_helper.main(args)
    return grid, capsys.readouterr().out


def suggested_flags(out):
    """The printed '--anchor-sizes A,B --anchor-ratios C,D' line -> ([A, B], [C, D])."""
    line = next(line for line in out.splitlines() if line.strip().startswith("--anchor-sizes"))
    sizes, ratios = line.split()[1], line.split()[3]
    return [int(s) for s in sizes.split(",")], [float(r) for r in ratios.split(",")]


def write_elongated_coco(root, num_images=12, seed=0):
    """COCO json of 200x160 images holding tall thin boxes (h/w 4-6), far from the default ratios 0.5-2."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        Image.new("RGB", (200, 160), (30, 30, 30)).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 200, "height": 160})
        for _ in range(3):
            w = float(rng.uniform(5, 12))
            h = w * float(rng.uniform(4, 6))
            x, y = float(rng.uniform(0, 200 - w)), float(rng.uniform(0, 160 - h))
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1, "bbox": [x, y, w, h]})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "pole"}]}
    (root / "train.json").write_text(json.dumps(data))
    return root


def test_coverage_is_one_for_anchor_shapes_and_near_zero_for_elongated_boxes():
    anchors = anchor_helper.anchor_shapes(DEFAULT_SIZES, DEFAULT_RATIOS)  # (w, h) [15, 2]
    assert anchors.shape == (15, 2)
    assert torch.allclose(anchor_helper.best_iou(anchors, anchors), torch.ones(15, dtype=torch.float64))
    # h = s * sqrt(r): ratio 2 is tall (torchvision's aspect_ratio is h / w)
    tall = anchor_helper.anchor_shapes([64], [2.0])[0]
    assert tall[1] > tall[0]
    squares = anchor_helper.anchor_shapes(DEFAULT_SIZES, [1.0])
    lines = torch.tensor([[400.0, 4.0], [3.0, 300.0]], dtype=torch.float64)  # 100:1 lines, any size
    assert anchor_helper.best_iou(lines, squares).max() < 0.1
    # a box between two octave-spaced sizes: IoU (s_small / s_big)^2 at best, 0.5 halfway in log space
    halfway = torch.tensor([[64 * 2**0.5, 64 * 2**0.5]], dtype=torch.float64)
    assert anchor_helper.best_iou(halfway, squares).item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn"])
def test_scale_matches_the_model_transform(name):
    transform = models.get_model(name, num_classes=2, weights="none").transform.eval()
    for height, width in [(480, 640), (581, 253), (311, 1017), (100, 3000), (333, 333)]:
        box = torch.tensor([[3.0, 5.0, 3.0 + width / 3, 5.0 + height / 7]])
        images, targets = transform([torch.rand(3, height, width)], [{"boxes": box, "labels": torch.tensor([1])}])
        expected = anchor_helper.resized_size(height, width, transform.min_size[-1], transform.max_size)
        assert tuple(images.image_sizes[0]) == expected, (height, width)
        shapes, *_ = anchor_helper.box_shapes(
            [(box, torch.tensor([1]), height, width)], transform.min_size[-1], transform.max_size
        )
        model_box = targets[0]["boxes"][0]
        assert shapes[0].tolist() == pytest.approx((model_box[2:] - model_box[:2]).tolist(), rel=1e-5)


def test_dataset_boxes_match_the_samples_without_decoding_images(tmp_path, monkeypatch, capsys):
    img_folder, ann_file = write_coco(tmp_path / "coco")
    (tmp_path / "mid").mkdir()
    make_pennfudan(tmp_path / "ped", num_images=4)
    built = {
        "coco": datasets.CocoDetection(img_folder, ann_file),  # has an iscrowd region
        "custom": custom.CustomDataset(write_middle(tmp_path / "mid", ".json"), tmp_path / "mid" / "img", "abc"),
        "pennfudan": datasets.Subset(datasets.PennFudanDataset(tmp_path / "ped"), [3, 1]),
    }
    voc_root = make_voc(tmp_path / "voc")  # difficult objects, and an xml without <size>
    ids = ["img0", "img1", "img2", "img3"]
    built["voc"] = voc.VOCDetection(voc_root, classes=["cat", "dog"], split_ids=ids)
    built["skip"] = skip_bad_images.SkipBadImages(built["custom"])
    expected = {}
    for name, ds in built.items():
        targets = [ds[i][1] for i in range(len(ds))]
        expected[name] = [(t["boxes"][t["iscrowd"] == 0], t["labels"][t["iscrowd"] == 0]) for t in targets]
        expected[name + " sizes"] = [ds.get_height_and_width(i) for i in range(len(ds))]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(formats, "read_image", no_decoding)  # voc and custom decode through formats.BoxRecords
    for name, ds in built.items():
        records = anchor_helper.dataset_boxes(ds)
        assert [(h, w) for _, _, h, w in records] == expected[name + " sizes"], name
        for (boxes, labels, _, _), (want_boxes, want_labels) in zip(records, expected[name]):
            assert torch.equal(boxes, want_boxes.as_subclass(torch.Tensor)) and torch.equal(labels, want_labels), name
    assert sum(len(b) for b, *_ in anchor_helper.dataset_boxes(built["coco"])) == 3  # the crowd region left out

    class Plain(torch.utils.data.Dataset):  # a class the helper does not know: read through dataset[i]
        def __len__(self):
            return 2

        def __getitem__(self, idx):
            return torch.zeros(3, 20, 30), {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0]]), "labels": torch.tensor([1])}

    records = anchor_helper.dataset_boxes(Plain())
    assert "not a class this script knows" in capsys.readouterr().out
    assert records[1][0].tolist() == [[1, 2, 11, 7]] and records[1][2:] == (20, 30)


def test_suggestion_fits_elongated_boxes_better_than_the_default(tmp_path, capsys):
    root = write_elongated_coco(tmp_path / "poles")
    argv = ["--dataset", "coco", "--data-path", root, "--train-ann", root / "train.json", "--val-ann"]
    argv += [root / "train.json", "--train-images", root / "images", "--val-images", root / "images"]
    (sizes, ratios), out = run(capsys, *argv, "--model", "fasterrcnn_resnet50_fpn")
    assert suggested_flags(out) == (sizes, ratios)
    assert len(sizes) == 5 and sizes == sorted(sizes) and len(ratios) == 3  # one size per FPN level
    assert max(ratios) > 3  # the boxes are 4-6 times taller than wide
    assert "pass the flags to train.py" in out and "AnchorGenerator(sizes=((" in out
    model = models.get_model("fasterrcnn_resnet50_fpn", 2, weights="none", anchor_sizes=sizes, anchor_ratios=ratios)
    assert model.rpn.anchor_generator.sizes == tuple((s,) for s in sizes)  # train.py takes the printed flags

    ds = datasets.CocoDetection(root / "images", root / "train.json")
    shapes, *_ = anchor_helper.box_shapes(anchor_helper.dataset_boxes(ds), 800, 1333)
    now = anchor_helper.coverage(
        anchor_helper.best_iou(shapes, anchor_helper.anchor_shapes(DEFAULT_SIZES, DEFAULT_RATIOS))
    )
    new = anchor_helper.coverage(anchor_helper.best_iou(shapes, anchor_helper.anchor_shapes(sizes, ratios)))
    assert new[0] >= now[0] and new[1] > now[1] + 0.3 and new[2] > now[2] + 0.1  # shares >= 0.5, >= 0.7, mean IoU

    # the same run twice prints the same: no random draws
    assert run(capsys, *argv, "--model", "fasterrcnn_resnet50_fpn")[1] == out
    # a single-map model takes any number of sizes; FPN R-CNN only one per level
    (sizes, ratios), _ = run(capsys, *argv, "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--num-sizes", "3")
    assert len(sizes) == 3
    with pytest.raises(anchor_helper.utils.SetupError, match="one anchor size per FPN level"):
        run(capsys, *argv, "--model", "fasterrcnn_resnet50_fpn", "--num-sizes", "3")


def test_command_line_on_generated_pennfudan(tmp_path):
    make_pennfudan(tmp_path / "PennFudanPed", num_images=8)
    cmd = [sys.executable, "references/anchor_helper.py", "--data-path", tmp_path / "PennFudanPed", "--val-size", "2"]
    cmd += ["--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--anchor-sizes", "16,32,64", "--num-ratios", "2"]
    result = subprocess.run([str(c) for c in cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "current anchors (given): sizes [16, 32, 64]" in result.stdout
    sizes, ratios = suggested_flags(result.stdout)
    assert len(sizes) == 3 and len(ratios) == 2


def test_real_bccd(capsys):
    root = SHARED_DATA / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"real BCCD not found at {root} (set DETECTION_DATA to the folder holding BCCD/)")
    argv = [
        "--dataset",
        "voc",
        "--data-path",
        root,
        "--classes",
        "RBC,WBC,Platelets",
        "--model",
        "fasterrcnn_resnet50_fpn",
    ]
    with pytest.warns(UserWarning, match="dropped 1 boxes"):  # BCCD's two zero-size boxes (one per split)
        (sizes, ratios), out = run(capsys, *argv)
    assert "205 images, 2804 boxes" in out and "boxes scaled x1.67 to x1.67" in out  # 640x480 -> 1067x800
    for row in ("RBC", "WBC", "Platelets", "small (<32^2)", "medium (<96^2)", "large"):
        assert f"\n  {row} " in out
    assert suggested_flags(out) == (sizes, ratios) and len(sizes) == 5
