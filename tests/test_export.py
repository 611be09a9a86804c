"""references/export.py and extras/export.py: TorchScript and ONNX files that reproduce the eager model (boxes, scores,
masks, keypoints) at sizes they were not traced at, their metadata, the parity check's verdict, and the message when
onnx is missing. Small random models (128-160 px) on a generated Penn-Fudan, CPU."""

import copy
import json
import sys

import pytest
import torch
from conftest import REPO, make_pennfudan

import models
import train
import utils
from datasets.images import read_image
from extras import export

sys.path.insert(0, str(REPO / "references"))
import export as export_script  # noqa: E402 - references/export.py

SMALL = dict(min_size=128, max_size=160, box_score_thresh=0.0)  # every detection kept: there is something to compare
RESNET18 = dict(backbone="resnet18")  # the composed detectors' smallest backbone


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "PennFudanPed"
    make_pennfudan(root, num_images=6)
    return root


@torch.no_grad()
def lively(model):
    """Random weights whose detections differ from one another, as trained ones do. Fresh BatchNorm statistics (mean
    0, variance 1) make every RoI's features, so every score, the same: ties that NMS breaks either way. Measured
    statistics, neck outputs of unit spread and predictors 10x smaller give distinct scores and boxes of real size."""
    model.backbone.train()
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # a plain average over the batches below
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        features = model.backbone(torch.rand(2, 3, 128, 160, generator=generator))
    spread = torch.cat([f.flatten() for f in features.values()]).std()
    for param in model.backbone.fpn.layer_blocks.parameters():
        param.div_(spread)
    for name, param in model.named_parameters():
        if name.rsplit(".", 2)[-2] in ("cls_score", "bbox_pred", "cls_logits", "bbox_reg"):
            param.mul_(0.1)
    return model.eval()


def write_checkpoint(path, data_dir, name, **options):
    """A checkpoint as train.py writes it (the keys export reads: model, epoch, class_names, args, model_args)."""
    torch.manual_seed(0)
    detections = "detections_per_img" if name in ("retinanet", "fcos") else "box_detections_per_img"
    model = lively(models.build(name, num_classes=2, **SMALL, **options, **{detections: 10}))
    args = train.get_args_parser().parse_args(["--data-path", str(data_dir), "--model", name, "--val-size", "2"])
    state = {"model": model.state_dict(), "epoch": 0, "class_names": ["person"], "args": vars(args)}
    torch.save({**state, "model_args": model.model_args}, path)
    return model


def run_script(*argv):
    return export_script.main(export_script.get_args_parser().parse_args([str(a) for a in argv]))


def tall_image(data_dir):
    """A Penn-Fudan image stretched to 400 x 200: not the traced size, and its long side sets the scale (160 / 400),
    the case torchvision's traced resize gets 1 px short (159 x 79)."""
    image = read_image(data_dir / "PNGImages" / "Ped00000.png", "RGB")
    return torch.nn.functional.interpolate(image[None].float(), size=(400, 200), mode="bilinear")[0].round().byte()


CASES = [  # (model, options, format, flags): every head, both formats, both ONNX inputs, both kinds of check images
    ("fasterrcnn", RESNET18, "onnx", []),
    ("fasterrcnn_mobilenet_v3_large_fpn", {}, "torchscript", []),
    ("maskrcnn", RESNET18, "onnx", ["--verify", "2"]),
    ("maskrcnn", RESNET18, "torchscript", ["--verify", "2"]),
    ("retinanet", RESNET18, "onnx", ["--input-dtype", "float32", "--verify-images", "{data}/PNGImages"]),
    ("keypointrcnn_resnet50_fpn", {}, "onnx", ["--verify", "1"]),
]


@pytest.mark.parametrize("name,options,fmt,flags", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_exported_file_reproduces_the_eager_model(tmp_path, data_dir, capsys, name, options, fmt, flags):
    model = write_checkpoint(tmp_path / "checkpoint.pth", data_dir, name, **options)
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    flags = [f.format(data=data_dir) for f in flags]
    # no data flag: the parity check reads the validation images of the checkpoint's own dataset
    assert run_script("--checkpoint", tmp_path / "checkpoint.pth", "--format", fmt, "--out", out, *flags) == 0
    printed = capsys.readouterr().out
    assert "largest box difference" in printed and f"OK: {out}" in printed
    assert ("COCO bbox AP" in printed) == ("--verify-images" not in flags)
    assert ("mean mask IoU" in printed) == (name == "maskrcnn")

    metadata = export.read_metadata(str(out))
    assert json.loads(metadata["class_names"]) == ["person"] and metadata["model"] == name
    assert json.loads(metadata["model_args"])["min_size"] == 128 and "one image per call" in metadata["input"]

    image = tall_image(data_dir)
    with torch.inference_mode():
        eager, exported = export.Deployable(model)(image), export.Runner(str(out))(image)
    assert set(exported) == set(eager) and len(eager["boxes"]) > 0
    pairs = export.match(eager, exported)
    assert len(pairs) >= 0.9 * len(eager["boxes"])
    i, j = (torch.tensor(index) for index in zip(*pairs))
    torch.testing.assert_close(exported["boxes"][j], eager["boxes"][i], atol=0.05, rtol=0)  # px
    torch.testing.assert_close(exported["scores"][j], eager["scores"][i], atol=1e-3, rtol=0)
    assert exported["boxes"][:, 2:].max(0).values.tolist() <= [200, 400]  # in the input's pixels, not the model's
    if "masks" in eager:
        assert exported["masks"].shape[-2:] == (400, 200)  # pasted at the input's size
        same = ((exported["masks"][j] > 0.5) == (eager["masks"][i] > 0.5)).float().mean()
        assert same > 0.999
    if "keypoints" in eager:
        torch.testing.assert_close(exported["keypoints"][j, :, :2], eager["keypoints"][i, :, :2], atol=0.05, rtol=0)


def test_parity_check_fails_when_the_file_differs(tmp_path, data_dir, capsys, monkeypatch):
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    other = copy.deepcopy(write_checkpoint(tmp_path / "checkpoint.pth", data_dir, name))
    with torch.no_grad():
        other.roi_heads.box_predictor.bbox_pred.weight.mul_(3)  # the same detections, their boxes moved
    write = export.export_torchscript
    monkeypatch.setattr(export, "export_torchscript", lambda model, path, metadata: write(other, path, metadata))

    argv = ["--checkpoint", tmp_path / "checkpoint.pth", "--format", "torchscript", "--out", tmp_path / "m.pt"]
    assert run_script(*argv, "--verify", "2") == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "boxes differ by up to" in printed
    assert run_script(*argv, "--verify", "0") == 0  # no check, no verdict


def test_onnx_without_onnxruntime_names_the_pip_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    argv = ["export.py", "--checkpoint", str(tmp_path / "missing.pth"), "--format", "onnx", "--out", "m.onnx"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        utils.cli(export_script.main, export_script.get_args_parser())
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pip install onnx onnxruntime" in error


def test_benchmark_predict_measures_every_runtime(data_dir, tmp_path, capsys):
    import benchmark_predict  # references/benchmark_predict.py

    path = tmp_path / "checkpoint.pth"
    write_checkpoint(path, data_dir, "fasterrcnn", **RESNET18)
    argv = ["--checkpoint", path, "--images", data_dir / "PNGImages", "--num-images", 4, "--batch-size", 2]
    rows = benchmark_predict.main(
        benchmark_predict.get_args_parser().parse_args([str(a) for a in [*argv, "--warmup", 1]])
    )
    names = [name for name, _, _ in rows]
    assert names == ["eager, batch 1", "eager, batch 2", "TorchScript, batch 1", "ONNX Runtime, batch 1"]
    assert all(images_per_s > 0 and median_ms > 0 for _, images_per_s, median_ms in rows)
    assert "| ONNX Runtime, batch 1 |" in capsys.readouterr().out
