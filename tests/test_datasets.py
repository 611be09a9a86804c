import pytest
import torch
from conftest import make_pennfudan
from torchvision import tv_tensors

import datasets
from datasets import pennfudan
from utils import SetupError


def test_contract_on_generated_data(tmp_path):
    expected = make_pennfudan(tmp_path / "pf", num_images=5)
    ds = pennfudan.PennFudanDataset(tmp_path / "pf")
    assert len(ds) == 5
    for idx in range(len(ds)):
        image, target = ds[idx]
        n = len(expected[idx])
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape[0] == 3
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
        assert target["boxes"].tolist() == [[float(c) for c in box] for box in expected[idx]]
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [1] * n
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, *image.shape[-2:])
        assert target["area"].dtype == torch.float32
        assert target["area"].tolist() == target["masks"].sum(dim=(1, 2)).float().tolist()
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0] * n
        assert target["image_id"] == idx
        assert ds.get_height_and_width(idx) == tuple(image.shape[-2:])


def test_get_height_and_width_does_not_decode(tmp_path, monkeypatch):
    make_pennfudan(tmp_path / "pf", num_images=2)
    ds = pennfudan.PennFudanDataset(tmp_path / "pf")

    def fail(*args, **kwargs):
        raise AssertionError("decoded an image")

    monkeypatch.setattr(pennfudan, "read_image", fail)
    assert ds.get_height_and_width(0) == (96, 128)
    assert ds.get_height_and_width(1) == (112, 80)


def test_split_is_seeded_deterministic_and_disjoint():
    train, val = datasets.random_split(170, 50, seed=0)
    assert len(train) == 120 and len(val) == 50 and not set(train) & set(val)
    assert datasets.random_split(170, 50, seed=0) == (train, val)
    assert datasets.random_split(170, 50, seed=1) != (train, val)
    with pytest.raises(ValueError, match="val_size"):
        datasets.random_split(10, 10)


def test_builder_returns_subsets_with_sizes(tmp_path):
    make_pennfudan(tmp_path / "pf", num_images=8)
    train, val, classes = datasets.get_dataset("pennfudan", tmp_path / "pf", None, None, val_size=3, download=False)
    assert classes == ["person"] and len(train) == 5 and len(val) == 3
    assert {val[i][1]["image_id"] for i in range(3)}.isdisjoint({train[i][1]["image_id"] for i in range(5)})
    assert val.get_height_and_width(0) == tuple(val[0][0].shape[-2:])
    with pytest.raises(ValueError, match="pennfudan"):
        datasets.get_dataset("nope", tmp_path, None, None)


def test_missing_data_names_the_fix(tmp_path):
    with pytest.raises(SetupError, match="--data-path"):
        pennfudan.PennFudanDataset(tmp_path / "empty")


def test_missing_mask_is_named(tmp_path):
    make_pennfudan(tmp_path / "pf", num_images=2)
    (tmp_path / "pf" / "PedMasks" / "Ped00001_mask.png").unlink()
    with pytest.raises(SetupError, match="Ped00001_mask.png"):
        pennfudan.PennFudanDataset(tmp_path / "pf")


def test_offline_download_says_what_to_pass(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(SetupError, match="--data-path DIR"):
        pennfudan.PennFudanDataset(tmp_path / "PennFudanPed", download=True)


def test_real_pennfudan(real_pennfudan):
    ds = pennfudan.PennFudanDataset(real_pennfudan)
    assert len(ds) == 170
    assert pennfudan.content_digest(real_pennfudan) == pennfudan.CONTENT_SHA256
    instances = 0
    for idx in range(len(ds)):
        h, w = ds.get_height_and_width(idx)
        assert 311 <= h <= 581 and 253 <= w <= 1017
        id_map = pennfudan.read_image(ds.masks[idx])[0]
        instances += len(id_map.unique()) - 1
    assert instances == 423
    image, target = ds[0]
    boxes = target["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= image.shape[-1]).all()
