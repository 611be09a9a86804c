"""predict.py for real workloads: batches equal to single images, the progress line, --max-det and --agnostic-nms, a
video in and out (PyAV), and --save-annotations read back by references/check_dataset.py and trained on by train.py;
on a tiny generated Penn-Fudan and a one-epoch Faster R-CNN checkpoint (CPU)."""

import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, make_pennfudan
from PIL import Image

import predict
import train
from datasets.coco import CocoDetection
from extras import video
from utils import SetupError

sys.path.insert(0, str(REPO / "references"))
import check_dataset  # noqa: E402

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
# --lr 0 keeps the random initial weights, whose scores all sit near 0.5: there are detections to check
TINY = ["--weights", "none", "--lr", "0", "--min-size", "64", "--max-size", "96", "-j", "0"]
SIZES = ((96, 128), (112, 80), (150, 100))  # (height, width): three sizes, each twice in six images


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "PennFudanPed"
    make_pennfudan(root, num_images=6, sizes=SIZES)
    return root


@pytest.fixture(scope="module")
def faster_rcnn(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(MODEL)
    argv = ["--data-path", data_dir, "--model", MODEL, "--epochs", 1, "--output-dir", out, "--val-size", 1, *TINY]
    train.main(train.get_args_parser().parse_args([str(a) for a in [*argv, "--save-interval", 2]]))
    (out / "best.pth").unlink()  # the same weights as checkpoint.pth
    yield out / "checkpoint.pth"
    shutil.rmtree(out)


def run(*argv):
    predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def test_batches_give_the_detections_of_single_images(faster_rcnn, data_dir):
    """Batch 4 of six images in three sizes (runs of mixed sizes) against batch 1. predict.detect runs one forward
    pass per image size in a batch: torchvision pads a batch to its largest image, and on this model one mixed batch
    of all six keeps only 37-58% of the batch-1 boxes (IoU > 0.99) and finds 29-31 instead of 19. Same-size images
    batched agree to float rounding (measured: boxes 4e-6 px, scores 6e-8), so 1e-4 leaves room."""
    model = predict.load_model(faster_rcnn)
    paths = sorted((data_dir / "PNGImages").glob("*.png"))
    assert len({Image.open(p).size for p in paths}) == 3
    single = predict.predict(model, paths, score_thresh=0.0, batch_size=1)
    batched = predict.predict(model, paths, score_thresh=0.0, batch_size=4)
    for one, many in zip(single, batched):
        assert len(one["boxes"]) > 0 and one["labels"].tolist() == many["labels"].tolist()
        torch.testing.assert_close(many["boxes"], one["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(many["scores"], one["scores"], atol=1e-4, rtol=0)


class FixedDetector(torch.nn.Module):
    """Three detections on any image: two overlapping boxes with different labels (one object, two names) and a
    distant one; at most `detections_per_img` of them above `score_thresh`, as torchvision's detectors."""

    def __init__(self):
        super().__init__()
        self.score_thresh, self.detections_per_img, self.class_names = 0.05, 100, ["cat", "dog"]
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # predict reads the device from the parameters

    def forward(self, images):
        boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]])
        scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 2, 2])
        keep = (scores > self.score_thresh).nonzero().flatten()[: self.detections_per_img]
        return [{"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]} for _ in images]


def test_max_det_and_agnostic_nms():
    model, image = FixedDetector(), torch.zeros((3, 40, 40))
    [plain] = predict.predict(model, [image], score_thresh=0.0)
    assert plain["names"] == ["cat", "dog", "dog"]  # per-class NMS keeps the cat and the dog on one object
    [agnostic] = predict.predict(model, [image], score_thresh=0.0, agnostic_iou=0.5)
    assert agnostic["names"] == ["cat", "dog"] and agnostic["boxes"][1].tolist() == [20, 20, 30, 30]
    [capped] = predict.predict(model, [image], score_thresh=0.0, max_det=1)
    assert capped["scores"].tolist() == pytest.approx([0.9])
    assert model.detections_per_img == 100 and model.score_thresh == 0.05  # put back


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line(monkeypatch, capsys):
    progress = predict.Progress(50)
    for _ in range(50):
        progress.update(1, "x.jpg")
    progress.close()
    lines = capsys.readouterr().err.splitlines()  # not a terminal: a line every tenth of the way
    assert len(lines) == 10 and lines[-1].startswith("[50/50] x.jpg  ") and "images/s  eta 0:00:00" in lines[-1]

    monkeypatch.setattr(sys, "stderr", Terminal())
    progress = predict.Progress(3, "frames")
    for _ in range(3):
        progress.update(1, "clip.mp4")
    progress.warn("warning: something")
    progress.close()
    written = sys.stderr.getvalue()  # a terminal: one line rewritten in place (\r, then clear to its end)
    assert written.count("\r[") == 3 and written.count("\n") == 2 and "frames/s" in written


def test_script_batches_workers_and_max_det(faster_rcnn, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run("--checkpoint", faster_rcnn, data_dir / "PNGImages", "--out", out, "--score-thresh", 0, "--batch-size", 4,
        "-j", 2, "--max-det", 5)  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    per_image = [sum(r["image_id"] == i for r in results) for i in range(6)]
    assert per_image == [5] * 6 and len(list(out.glob("*.png"))) == 6
    err = capsys.readouterr().err
    assert "[6/6] Ped00005.png" in err and "images/s" in err


def write_video(path, count=6, size=(64, 96), rate=10):
    """An H.264 mp4 of `count` frames (height, width) at `rate` frames/s: a bright square moving right."""
    av = video.import_av()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        stream.height, stream.width, stream.pix_fmt = *size, "yuv420p"
        for k in range(count):
            pixels = np.full((*size, 3), 30, dtype=np.uint8)
            pixels[20:44, 8 * k : 8 * k + 24] = 220
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode(None))


def test_video_gives_a_drawn_video_and_per_frame_detections(faster_rcnn, tmp_path, capsys):
    av = pytest.importorskip("av", reason="videos need PyAV (pip install av)")
    clip, out = tmp_path / "in" / "clip.mp4", tmp_path / "out"
    clip.parent.mkdir()
    write_video(clip)
    run("--checkpoint", faster_rcnn, clip, "--out", out, "--score-thresh", 0, "--batch-size", 4)  # batches of 4, 2

    record = json.loads((out / "clip.json").read_text())
    assert (record["width"], record["height"], record["fps"]) == (96, 64, 10.0)
    assert record["categories"] == [{"id": 1, "name": "person"}]
    frames = record["frames"]
    assert [f["frame"] for f in frames] == list(range(6))
    assert [f["time"] for f in frames] == pytest.approx([k / 10 for k in range(6)], abs=1e-3)
    for detection in frames[0]["detections"]:
        assert detection["category_id"] == 1 and len(detection["bbox"]) == 4 and 0 <= detection["score"] <= 1
    assert any(f["detections"] for f in frames)
    with av.open(str(out / "clip.mp4")) as drawn:
        decoded = [frame.to_ndarray(format="rgb24") for frame in drawn.decode(video=0)]
    assert len(decoded) == 6 and decoded[0].shape == (64, 96, 3)
    assert "Wrote" in capsys.readouterr().out and not (out / "results.json").exists()  # no images given


def test_video_without_pyav_names_the_install(faster_rcnn, tmp_path, monkeypatch):
    clip = tmp_path / "clip.mkv"
    clip.write_bytes(b"")  # never opened: the import fails first
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(SetupError, match="pip install av"):
        run("--checkpoint", faster_rcnn, clip, "--out", tmp_path / "out")


def test_save_annotations_round_trip(faster_rcnn, data_dir, tmp_path, capsys):
    """Pre-labelling: predictions saved as COCO annotations, checked by check_dataset.py, trained on by train.py."""
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    for folder, names in ((train_dir, range(5)), (val_dir, [5])):
        folder.mkdir()
        for k in names:
            shutil.copy(data_dir / "PNGImages" / f"Ped{k:05d}.png", folder)
    for folder in (train_dir, val_dir):
        run("--checkpoint", faster_rcnn, folder, "--out", tmp_path / "out" / folder.name,
            "--save-annotations", tmp_path / f"{folder.name}.json", "--score-thresh", 0.3)  # fmt: skip
    assert "file names are relative to" in capsys.readouterr().out

    data = json.loads((tmp_path / "train.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "person"}]
    assert [im["file_name"] for im in data["images"]] == [f"Ped{k:05d}.png" for k in range(5)]
    assert data["annotations"] and all(a["score"] > 0.3 and a["iscrowd"] == 0 for a in data["annotations"])
    for ann in data["annotations"]:
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])

    check = ["--dataset", "coco", "--data-path", tmp_path, "--train-ann", tmp_path / "train.json"]
    check += ["--val-ann", tmp_path / "val.json", "--train-images", train_dir, "--val-images", val_dir, "-j", 1]
    assert check_dataset.main(check_dataset.get_args_parser().parse_args([str(a) for a in check])) == 0
    assert "\n0 errors" in capsys.readouterr().out

    argv = check[:-2] + ["--model", MODEL, "--epochs", 1, "--output-dir", tmp_path / "run", "--save-interval", 2]
    metrics = train.main(train.get_args_parser().parse_args([str(a) for a in [*argv, *TINY]]))
    assert 0 <= metrics["bbox"]["AP"] <= 1


def test_save_annotations_writes_masks_as_rle(tmp_path):
    """A Mask R-CNN's prediction -> annotations whose RLE decodes to the predicted mask (CocoDetection, masks=True)."""
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(image)
    masks = torch.zeros((1, 30, 40), dtype=torch.bool)
    masks[0, 5:15, 10:30] = True
    prediction = {
        "boxes": torch.tensor([[10.0, 5, 30, 15]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.8]),
    }
    detections = predict.coco_results(prediction | {"masks": masks}, 0, str(image))
    images = [{"id": 0, "file_name": str(image), "width": 40, "height": 30}]
    data, folder = predict.coco_annotations(images, detections, ["cat", "dog"])
    assert folder == tmp_path and data["annotations"][0]["area"] == 200 and data["annotations"][0]["category_id"] == 2
    (tmp_path / "pre.json").write_text(json.dumps(data))
    _, target = CocoDetection(folder, tmp_path / "pre.json", masks=True)[0]
    assert torch.equal(target["masks"].bool(), masks) and target["labels"].tolist() == [2]
