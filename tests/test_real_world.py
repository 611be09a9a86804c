"""Annotation files as tools write them, and flags and files that used to end in a traceback or a wrong number."""

import json
import re
import warnings

import pytest
import torch
from PIL import Image

import checkpoints
import datasets
import models
import train
from extras import multiscale
from extras.formats import custom
from utils import SetupError


def write_coco(folder, name, categories, objects, num_images=2):
    """A COCO json with `num_images` 40x30 images; objects: category ids, one box each, spread over the images."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(num_images):
        Image.new("RGB", (40, 30), (20, 90, 200)).save(folder / f"{name}{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{name}{i}.jpg", "width": 40, "height": 30})
    annotations = [
        {"id": k + 1, "image_id": k % num_images + 1, "category_id": cid, "bbox": [2, 3, 20, 15], "iscrowd": 0}
        for k, cid in enumerate(objects)
    ]
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def coco_args(tmp_path, categories, train_objects, val_objects, *extra):
    train_ann = write_coco(tmp_path / "tr", "train", categories, train_objects)
    val_ann = write_coco(tmp_path / "va", "val", categories, val_objects)
    flags = ["--dataset", "coco", "--train-ann", train_ann, "--val-ann", val_ann]
    flags += ["--train-images", tmp_path / "tr", "--val-images", tmp_path / "va", "--model", "fasterrcnn_resnet50_fpn"]
    return train.get_args_parser().parse_args([str(a) for a in flags + list(extra)])


def test_coco_with_its_four_files_needs_no_data_path(tmp_path):
    args = coco_args(tmp_path, [{"id": 1, "name": "a"}], [1, 1], [1])
    train_set, val_set, classes = train.get_datasets(args)
    assert len(train_set) == 2 and len(val_set) == 2 and classes == ["a"]
    args.val_images = None
    with pytest.raises(SetupError, match="needs --data-path DIR.*or all of --train-ann"):
        train.get_datasets(args)


def test_labelme_background_category_is_not_a_class(tmp_path, capsys):
    categories = [{"id": 0, "name": "_background_"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    args = coco_args(tmp_path, categories, [1, 2, 1], [2])
    train_set, val_set, classes = train.get_datasets(args)
    assert classes == ["cat", "dog"]
    assert train_set.label_to_category_id == {1: 1, 2: 2} and val_set.label_to_category_id == {1: 1, 2: 2}
    assert sorted(train_set[0][1]["labels"].tolist() + train_set[1][1]["labels"].tolist()) == [1, 1, 2]
    assert "Note: not a class, left out: '_background_' (id 0, a background placeholder)" in capsys.readouterr().out


def test_roboflow_supercategory_without_objects_is_not_a_class(tmp_path, capsys):
    categories = [
        {"id": 0, "name": "cells", "supercategory": "none"},
        {"id": 1, "name": "RBC", "supercategory": "cells"},
        {"id": 2, "name": "WBC", "supercategory": "cells"},
    ]
    args = coco_args(tmp_path, categories, [1, 2, 2], [1])
    _, val_set, classes = train.get_datasets(args)
    assert classes == ["RBC", "WBC"] and val_set[0][1]["labels"].tolist() == [1]
    assert "'cells' (id 0, the supercategory of the others, with no objects)" in capsys.readouterr().out


def test_a_real_class_without_training_objects_is_kept_with_one_warning(tmp_path):
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    args = coco_args(tmp_path, categories, [1, 1], [3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, classes = train.get_datasets(args)
    assert classes == ["cat", "dog", "bird"]
    messages = [str(w.message) for w in caught if "can never learn" in str(w.message)]
    assert len(messages) == 1 and "2 categories" in messages[0] and "dog, bird" in messages[0]


def test_custom_labels_ignore_is_optional_and_ignores_every_class(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    entry = {"filename": "a.jpg", "width": 40, "height": 30}
    entry["ann"] = {"bboxes": [[1, 1, 20, 20]], "labels": [1], "bboxes_ignore": [[25, 5, 35, 25]]}
    (tmp_path / "ann.json").write_text(json.dumps([entry]))
    ds = custom.CustomDataset(tmp_path / "ann.json", tmp_path, ["cat", "dog", "bird"])
    target = ds[0][1]
    assert target["labels"].tolist() == [2, 1, 2, 3]  # the box, then the region once per class
    assert target["iscrowd"].tolist() == [0, 1, 1, 1]
    assert target["boxes"][1:].tolist() == [[25, 5, 35, 25]] * 3


@pytest.mark.parametrize(
    "num_images, val_size, expected",
    [(170, None, 50), (101, None, 50), (100, None, 20), (40, None, 8), (3, None, 1), (40, 10, 10)],
)
def test_default_val_size_fits_the_dataset(num_images, val_size, expected, capsys):
    assert datasets.choose_val_size(num_images, val_size) == expected
    if val_size is None:
        assert f"holding out {expected} of the {num_images} images" in capsys.readouterr().out


@pytest.mark.parametrize("val_size", [0, 40, 41, -1])
def test_impossible_val_size_is_one_clear_error(val_size):
    with pytest.raises(SetupError, match=rf"--val-size {val_size}: .* 40 images .* between 1 and 39"):
        datasets.choose_val_size(40, val_size)


def test_small_pennfudan_trains_with_the_default_val_size(tmp_path, capsys):
    from conftest import make_pennfudan

    make_pennfudan(tmp_path / "pf", num_images=10)
    args = train.get_args_parser().parse_args(["--data-path", str(tmp_path / "pf")])
    train_set, val_set, _ = train.get_datasets(args)
    assert (len(train_set), len(val_set)) == (8, 2)


@pytest.mark.parametrize(
    "content, says",
    [
        ("state_dict", "holds a bare state dict (weights only)"),
        ("list", "holds a list, not a train.py checkpoint"),
        ("text", "is not a PyTorch file"),
    ],
)
def test_resume_from_a_file_that_is_not_a_checkpoint(tmp_path, content, says):
    path = tmp_path / "file.pth"
    if content == "state_dict":
        torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    elif content == "list":
        torch.save([1, 2, 3], path)
    else:
        path.write_text("not a checkpoint\n")
    fix = f"--load-from {path}" if content != "text" else "pass a checkpoint.pth written by train.py"
    with pytest.raises(SetupError, match=re.escape(says) + ".*" + re.escape(fix)) as e:
        checkpoints.load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_keypoint_metrics_use_cocoeval_keypoint_names():
    from engine import stat_names

    assert stat_names("keypoints") == ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
    assert stat_names("bbox")[3:6] == ("APs", "APm", "APl") and len(stat_names("segm")) == 12


@pytest.mark.parametrize(
    "name, min_size, max_size", [("fasterrcnn_mobilenet_v3_large_320_fpn", 320, 640), (None, 200, 300)]
)
def test_multiscale_scales_around_the_model_size_and_evaluates_at_it(name, min_size, max_size):

    flags = ["--data-augmentation", "multiscale", "--weights", "none"]
    flags += (
        ["--model", name] if name else ["--model", "fasterrcnn_resnet50_fpn", "--min-size", "200", "--max-size", "300"]
    )
    args = train.get_args_parser().parse_args(flags)
    model = models.prepare_model(train.get_model(args, 2, "none"), torch.device("cpu"), multiscale=True)
    assert isinstance(model.transform, multiscale.MultiScaleResize)
    image = torch.rand(3, 100, 400)  # wide: the max-size cap decides its size
    model.train()
    torch.manual_seed(0)
    widths = {model.transform([image])[0].image_sizes[0][1] for _ in range(60)}  # long side: the scaled cap
    allowed = [max_size * f for f in multiscale.MULTISCALE_FACTORS]
    assert len(widths) >= 6 and all(min(abs(w - a) for a in allowed) <= 1.5 for w in widths)
    assert max(widths) == max_size and abs(min(widths) - 0.6 * max_size) <= 1.5
    model.eval()
    assert tuple(model.transform([image])[0].image_sizes[0]) == (max_size // 4, max_size)
