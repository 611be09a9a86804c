"""The README's code runs as written: its dataset example trains through train.main."""

import re

import numpy as np
from conftest import REPO
from PIL import Image

import datasets
import train


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
