"""The README's code runs as written: its dataset example trains through train.main."""

import re

import numpy as np
import torch
from conftest import REPO
from PIL import Image

import datasets
import train
from extras import compose


def readme_block(name):
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- readme-example: {name} .*?-->\n```python\n(.*?)```", text, re.S)
    assert match, f"README example {name} not found"
    return match.group(1)


def test_csv_dataset_example_follows_the_contract_and_trains(tmp_path, monkeypatch):
    namespace = {}
    exec(readme_block("csv-dataset"), namespace)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        rows.append(f"{i}.jpg,10,12,40,50,{'cat' if i % 2 else 'dog'}")
        rows.append(f"{i}.jpg,50,20,90,70,dog")
    (tmp_path / "train.csv").write_text("\n".join(rows[:8]) + "\n")
    (tmp_path / "val.csv").write_text("\n".join(rows[8:]) + "\n")

    train_set, val_set, classes = namespace["get_csv"](
        tmp_path, None, None, tmp_path / "train.csv", tmp_path / "val.csv", "cat,dog"
    )
    image, target = train_set[1]
    assert classes == ["cat", "dog"] and len(train_set) == 4 and len(val_set) == 2
    assert target["boxes"].tolist() == [[10, 12, 40, 50], [50, 20, 90, 70]] and target["labels"].tolist() == [1, 2]
    assert train_set.get_height_and_width(0) == tuple(image.shape[-2:]) == (80, 100)

    monkeypatch.setitem(datasets.DATASETS, "csv", namespace["get_csv"])
    argv = [
        "--dataset",
        "csv",
        "--data-path",
        tmp_path,
        "--train-ann",
        tmp_path / "train.csv",
        "--val-ann",
        tmp_path / "val.csv",
        "--classes",
        "cat,dog",
        "--epochs",
        1,
        "--output-dir",
        tmp_path / "run",
        "--weights",
        "none",
        "--model",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--min-size",
        64,
        "--max-size",
        96,
        "-j",
        0,
    ]
    metrics = train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    assert set(metrics["bbox_per_class"]) == {"cat", "dog"} and (tmp_path / "run" / "checkpoint.pth").is_file()


def _paste_into_compose(monkeypatch, name, new_names):
    """Run a README block as if pasted at the end of extras/compose.py; undone after the test."""
    for table in ("STAGES", "BACKBONES", "NECKS"):
        monkeypatch.setattr(compose, table, dict(getattr(compose, table)))
    for new in new_names:
        monkeypatch.setattr(compose, new, None, raising=False)  # deleted again after the test
    exec(readme_block(name), vars(compose))


def _one_training_step(**parts):
    model = compose.get_model(**parts, num_classes=3, weights="none", min_size=64, max_size=96)
    model.train()
    target = {"boxes": torch.tensor([[8.0, 10, 50, 60]]), "labels": torch.tensor([1])}
    losses = model([torch.rand(3, 72, 96)], [target])
    sum(losses.values()).backward()
    return model, losses


def test_own_backbone_example_becomes_selectable(monkeypatch):
    _paste_into_compose(monkeypatch, "backbone", ["regnet"])
    args = train.get_args_parser().parse_args(["--model", "fasterrcnn", "--backbone", "regnet_y_400mf"])
    model, losses = _one_training_step(name=args.model, backbone=args.backbone, neck="pafpn")
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.body["4"][0].proj[0].out_channels == 440  # the last stage, as STAGES says


def test_own_neck_example_becomes_selectable(monkeypatch):
    _paste_into_compose(monkeypatch, "neck", ["ChannelMapper"])
    args = train.get_args_parser().parse_args(["--model", "fasterrcnn", "--backbone", "resnet18", "--neck", "mapper"])
    model, losses = _one_training_step(name=args.model, backbone=args.backbone, neck=args.neck)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,))  # 4 maps: 4 sizes
    assert list(model.backbone.strides.values()) == [4, 8, 16, 32]
