"""predict.py (load_model, predict, the script), references/plot_logs.py and references/browse_dataset.py, on a tiny
generated Penn-Fudan and one-epoch checkpoints written by train.main (CPU)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, make_pennfudan
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

import models
import predict
import train
from extras.tta import TTA

sys.path.insert(0, str(REPO / "references"))
import browse_dataset  # noqa: E402
import plot_logs  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LIME, RED = (0, 255, 0), (255, 0, 0)  # draw.draw_predictions' colours: prediction, ground truth
# --lr 0 keeps the random initial weights, whose scores all sit near 0.5: there are detections to check (a Mask
# R-CNN trained from scratch for one step at this size diverges and then detects nothing).
TINY = ["--weights", "none", "--lr", "0", "--min-size", "64", "--max-size", "96", "-j", "0", "--val-size", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "PennFudanPed"
    make_pennfudan(root, num_images=4)
    return root


def checkpoint(tmp_path_factory, data_dir, model):
    """A checkpoint of `model` after one epoch, removed when the module's tests are done (a Mask R-CNN's is ~350 MB,
    and the temp folders of module fixtures would otherwise stay until the whole suite ends)."""
    out = tmp_path_factory.mktemp(model)
    argv = ["--data-path", data_dir, "--model", model, "--epochs", 1, "--output-dir", out, *TINY]
    train.main(train.get_args_parser().parse_args([str(a) for a in [*argv, "--save-interval", 2]]))
    (out / "best.pth").unlink()  # the same weights as checkpoint.pth
    yield out / "checkpoint.pth"
    shutil.rmtree(out)


@pytest.fixture(scope="module")
def faster_rcnn(data_dir, tmp_path_factory):
    yield from checkpoint(tmp_path_factory, data_dir, "fasterrcnn_mobilenet_v3_large_320_fpn")


@pytest.fixture(scope="module")
def mask_rcnn(data_dir, tmp_path_factory):
    yield from checkpoint(tmp_path_factory, data_dir, "maskrcnn_resnet50_fpn")


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_predict_on_paths_pil_images_and_tensors(faster_rcnn, data_dir):
    model = predict.load_model(str(faster_rcnn))
    assert model.class_names == ["person"] and not model.training
    path = data_dir / "PNGImages" / "Ped00000.png"
    uint8 = pil_to_tensor(Image.open(path).convert("RGB"))
    inputs = [path, str(path), Image.open(path), uint8, to_dtype(uint8, torch.float32, scale=True)]
    results = predict.predict(model, inputs, score_thresh=0.0, batch_size=1)

    assert len(results) == len(inputs)
    first, n = results[0], len(results[0]["boxes"])
    assert n > 0 and set(first) == {"boxes", "labels", "names", "scores"}  # no masks for Faster R-CNN
    assert first["boxes"].shape == (n, 4) and first["boxes"].dtype == torch.float32
    assert first["labels"].dtype == torch.int64 and first["names"] == ["person"] * n
    height, width = uint8.shape[-2:]
    x1, y1, x2, y2 = first["boxes"].unbind(1)
    assert (0 <= x1).all() and (x1 < x2).all() and (x2 <= width).all() and (0 <= y1).all() and (y2 <= height).all()
    for other in results[1:]:  # every input type decodes to the same float image
        assert torch.equal(other["boxes"], first["boxes"]) and torch.equal(other["scores"], first["scores"])

    assert len(predict.predict(model, [path] * 3, score_thresh=0.0, batch_size=2)) == 3
    [strict] = predict.predict(model, [path], score_thresh=0.9)
    assert len(strict["boxes"]) == len(strict["names"]) == 0
    assert model.roi_heads.score_thresh == 0.05  # the model's own threshold is put back


def test_the_checkpoint_recommends_the_default_score_thresh(faster_rcnn, data_dir, tmp_path, capsys):
    state = torch.load(faster_rcnn, weights_only=True)
    assert state["score_thresh"] is None or 0 <= state["score_thresh"] <= 1  # train.py's F1-optimal one
    image = data_dir / "PNGImages" / "Ped00000.png"
    [every] = predict.predict(predict.load_model(faster_rcnn), [image], score_thresh=0.0)
    state["score_thresh"] = middle = every["scores"].median().item()  # half the detections above it
    path = tmp_path / "recommended.pth"
    torch.save(state, path)
    model = predict.load_model(path)
    [default] = predict.predict(model, [image])
    [explicit] = predict.predict(model, [image], score_thresh=middle)
    assert torch.equal(default["boxes"], explicit["boxes"]) and 0 < len(default["boxes"]) < len(every["boxes"])
    argv = ["--checkpoint", path, image, "--out", tmp_path / "out"]
    predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))
    assert f"--score-thresh {middle:.3f} (the checkpoint's F1-optimal one" in capsys.readouterr().out
    path.unlink()


def test_predict_masks(mask_rcnn, data_dir):
    model = predict.load_model(str(mask_rcnn))
    [result] = predict.predict(model, [data_dir / "PNGImages" / "Ped00001.png"], score_thresh=0.0)
    n = len(result["boxes"])
    assert n > 0 and result["masks"].dtype == torch.bool
    assert result["masks"].shape == (n, 112, 80)  # the input image's size, not the model's 64 px
    assert result["masks"].any()


def test_coco_weights_by_name(monkeypatch, tmp_path, data_dir):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    # Stand-ins for the COCO download: random weights of the COCO shape (91 classes)
    coco_state = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91).state_dict()
    monkeypatch.setattr(models, "fetch_weights", lambda weights: None)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *args, **kwargs: coco_state)
    model = predict.load_model(f"{name}:DEFAULT")
    categories = torchvision.models.get_model_weights(name).DEFAULT.meta["categories"]
    assert model.class_names == categories[1:] and model.class_names[0] == "person"
    [result] = predict.predict(model, [data_dir / "PNGImages" / "Ped00000.png"], score_thresh=0.0)
    assert result["names"] == [categories[label] for label in result["labels"].tolist()]

    with pytest.raises(predict.utils.SetupError, match="unknown weights 'NOPE'"):
        predict.load_model(f"{name}:NOPE")
    monkeypatch.undo()

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(predict.utils.SetupError, match="could not download"):
        predict.load_model(f"{name}:DEFAULT")


def test_script_writes_drawings_results_and_images(faster_rcnn, data_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("Ped00001.png", "Ped00000.png"):
        shutil.copy(data_dir / "PNGImages" / name, folder / name)
    (folder / "notes.txt").write_text("not an image")  # folders are scanned for image extensions only
    single = data_dir / "PNGImages" / "Ped00002.png"
    out = tmp_path / "out"
    argv = ["--checkpoint", faster_rcnn, folder, single, "--out", out, "--score-thresh", 0, "--batch-size", 2]
    predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))

    inputs = [folder / "Ped00000.png", folder / "Ped00001.png", single]  # folder sorted, then the file
    assert sorted(p.name for p in out.glob("*.png")) == ["Ped00000.png", "Ped00001.png", "Ped00002.png"]
    images = json.loads((out / "images.json").read_text())
    assert [(i["id"], i["file_name"]) for i in images] == [(k, str(p)) for k, p in enumerate(inputs)]
    for image, path in zip(images, inputs):
        drawn = Image.open(out / f"{path.stem}.png")
        assert drawn.size == Image.open(path).size == (image["width"], image["height"])

    results = json.loads((out / "results.json").read_text())
    assert results and {r["image_id"] for r in results} == {0, 1, 2}
    for r in results:
        assert r["file_name"] == images[r["image_id"]]["file_name"] and r["category_id"] == 1
        assert len(r["bbox"]) == 4 and 0.0 <= r["score"] <= 1.0
    drawn = rgb(out / "Ped00000.png")
    for r in results:
        if r["image_id"] == 0:  # every box's top-left corner lies on its drawn border
            x, y = (int(v) for v in r["bbox"][:2])
            assert tuple(drawn[y, x]) == LIME, r["bbox"]
    captured = capsys.readouterr()
    assert "[3/3] Ped00002.png" in captured.err and "images/s" in captured.out


def test_script_errors_name_the_file(faster_rcnn, tmp_path):
    command = [sys.executable, str(REPO / "predict.py"), "--checkpoint", str(faster_rcnn), "--out", str(tmp_path)]
    done = subprocess.run([*command, str(tmp_path / "missing.png")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: no such image:") and "missing.png" in done.stderr

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    args = predict.get_args_parser().parse_args(["--checkpoint", str(faster_rcnn), str(broken), "--out", "x"])
    with pytest.raises(predict.utils.SetupError, match="none of the 1 images could be read"):
        predict.main(args)
    with pytest.raises(predict.utils.SetupError, match="cannot read image .*broken.png") as e:
        predict.predict(predict.load_model(str(faster_rcnn)), [broken])
    assert "--" not in str(e.value)  # predict.py has no --skip-bad-images: no flag is suggested


def test_script_skips_unreadable_files_and_writes_the_rest(faster_rcnn, data_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("Ped00000.png", "Ped00001.png"):
        shutil.copy(data_dir / "PNGImages" / name, folder / name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))  # a JPEG header, then nothing
    (folder / "._Ped00000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # a Mac's AppleDouble file
    (folder / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    argv = ["--checkpoint", faster_rcnn, folder, "--out", out, "--score-thresh", 0, "--batch-size", 2]
    predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))
    assert sorted(p.name for p in out.glob("*.png")) == ["Ped00000.png", "Ped00001.png"]
    images = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in images] == ["Ped00000.png", "Ped00001.png"]
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {i["id"] for i in images}
    captured = capsys.readouterr()
    assert captured.err.count("warning: skipped cannot read image") == 3
    assert "Skipped 3 unreadable files" in captured.out and "--" not in captured.err.replace("--checkpoint", "")


def write_log(run, epochs=3):
    run.mkdir()
    with open(run / "log.jsonl", "w") as f:
        for epoch in range(epochs):
            for step in (0, 10, 20):
                f.write(json.dumps({"epoch": epoch, "iter": step, "loss": 2 - epoch - step / 30, "lr": 0.01}) + "\n")
            train_stats = {"loss": 1.5 - epoch / 2, "loss_classifier": 0.5, "loss_mask": 0.4, "lr": 0.01}
            record = {"epoch": epoch, "train": train_stats, "bbox": {"AP": 0.1 * epoch}, "segm": {"AP": 0.05}}
            f.write(json.dumps({**record, "something_new": [1, 2]}) + "\n")  # unknown keys are ignored


def test_plot_logs_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plot_logs needs matplotlib (pip install matplotlib)")
    write_log(tmp_path / "a")
    write_log(tmp_path / "b", epochs=2)
    out = tmp_path / "curves.png"
    plot_logs.main(
        plot_logs.get_args_parser().parse_args(
            [str(tmp_path / "a"), str(tmp_path / "b" / "log.jsonl"), "--out", str(out)]
        )
    )
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > len(PNG_SIGNATURE)


def test_plot_logs_without_matplotlib(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit) as exit_:
        plot_logs.main(plot_logs.get_args_parser().parse_args([str(tmp_path / "a"), "--out", str(tmp_path / "c.png")]))
    assert exit_.value.code == 2
    assert "plot_logs needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def test_browse_dataset_draws_the_ground_truth(data_dir, tmp_path):
    def browse(*argv):
        argv = ["--data-path", data_dir, "--val-size", 1, *argv]
        browse_dataset.main(browse_dataset.get_args_parser().parse_args([str(a) for a in argv]))

    browse("--out", tmp_path / "train", "--num-images", 2)
    drawn = sorted((tmp_path / "train").iterdir())
    assert len(drawn) == 2
    for path in drawn:  # named by image_id, the index in the sorted file list; hflip keeps the size
        source = data_dir / "PNGImages" / f"Ped{int(path.stem):05d}.png"
        assert Image.open(path).size == Image.open(source).size

    browse("--out", tmp_path / "val", "--split", "val")  # no random transform: boxes where the masks say
    [path] = list((tmp_path / "val").iterdir())  # the val split holds one image (--num-images 20 is a maximum)
    ids = rgb(data_dir / "PedMasks" / f"Ped{int(path.stem):05d}_mask.png")[..., 0]
    drawn = rgb(path)
    for obj in range(1, ids.max() + 1):
        ys, xs = np.nonzero(ids == obj)
        if len(xs):
            assert tuple(drawn[ys.min(), xs.min()]) == RED


def test_tta_predictions_mirror_with_the_image(faster_rcnn, data_dir, tmp_path):
    """hflip TTA sees the same two views of an image and of its mirror image: mirrored, the same detections."""
    tta = TTA(predict.load_model(faster_rcnn), hflip=True, scales=[64, 80]).eval()
    tta.class_names = tta.model.class_names
    image = to_dtype(pil_to_tensor(Image.open(data_dir / "PNGImages" / "Ped00000.png")), torch.float32, scale=True)
    plain, mirrored = predict.predict(tta, [image, image.flip(-1)], score_thresh=0.0)
    assert len(plain["boxes"]) > 0 and len(plain["boxes"]) == len(mirrored["boxes"])
    width = image.shape[-1]
    unmirrored = mirrored["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    order = lambda r, boxes: sorted(zip(r["scores"].tolist(), boxes.tolist()))  # noqa: E731 - ties may swap
    for (s1, b1), (s2, b2) in zip(order(plain, plain["boxes"]), order(mirrored, unmirrored)):
        assert s1 == pytest.approx(s2, abs=1e-4) and b1 == pytest.approx(b2, abs=1e-2)

    out = tmp_path / "out"  # the script's --tta path
    argv = ["--checkpoint", faster_rcnn, data_dir / "PNGImages" / "Ped00000.png", "--out", out, "--score-thresh", 0]
    predict.main(
        predict.get_args_parser().parse_args([str(a) for a in [*argv, "--tta", "hflip", "--tta-scales", "64,80"]])
    )
    results = json.loads((out / "results.json").read_text())
    assert len(results) == len(plain["boxes"])
