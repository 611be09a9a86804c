"""train.main() end to end on a tiny generated dataset and on the real Penn-Fudan (CPU, --weights none)."""

import json

import pytest
import torch

import checkpoints
import predict
import train
import utils

TINY = ["--weights", "none", "--min-size", "64", "--max-size", "96", "-j", "0", "--print-freq", "5"]
TINY += ["--save-interval", "100"]  # no model_{epoch}.pth (100-350 MB each) unless a test asks for them


def run(*argv):
    return train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


def test_train_then_test_only(pennfudan_dir, tmp_path, capsys):
    out = tmp_path / "run"
    # TINY's --save-interval: no model_0.pth, each copy of this Mask R-CNN is ~340 MB (test_resume checks model_{epoch})
    metrics = run("--data-path", pennfudan_dir, "--val-size", 3, "--epochs", 1, "--output-dir", out, *TINY)
    assert set(metrics) >= {"bbox", "segm", "detections"}  # the default model is Mask R-CNN
    for name in ("checkpoint.pth", "best.pth", "args.json", "log.txt", "log.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "model_0.pth").exists()
    (out / "best.pth").unlink()  # the same weights as checkpoint.pth
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs, steps = [r for r in log if "iter" not in r], [r for r in log if "iter" in r]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 0 and [r["iter"] for r in steps] == [0]  # 2 steps, every 5th
    assert {"loss", "loss_classifier", "loss_mask", "lr"} <= set(epochs[0]["train"]) and "AP" in epochs[0]["segm"]
    assert {"loss", "loss_mask"} <= set(epochs[0]["val_loss"]) and {"loss", "lr", "loss_mask"} <= set(steps[0])
    report = (out / "report.md").read_text()
    assert f"| {metrics['bbox']['AP'] * 100:.1f} | {metrics['bbox']['AP50'] * 100:.1f} |" in report
    assert "| person |" in report and "images/s" in report and "peak memory" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![curves](curves.png)" in report
    assert len(list((out / "val_images").glob("*.png"))) == 3 and "val_images/" in report
    assert "Epoch: [0]" in (out / "log.txt").read_text()
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)  # plain data only
    assert checkpoint["class_names"] == ["person"] and checkpoint["epoch"] == 0
    assert json.loads((out / "args.json").read_text())["model"] == "maskrcnn_resnet50_fpn"

    capsys.readouterr()
    results = tmp_path / "dets.json"
    metrics = run(
        "--data-path",
        pennfudan_dir,
        "--val-size",
        3,
        "--output-dir",
        out,
        "--test-only",
        "--resume",
        out / "checkpoint.pth",
        "--out",
        results,
        "--show-dir",
        tmp_path / "shown",
        *TINY,
    )
    printed = capsys.readouterr().out
    assert f"Testing {out / 'checkpoint.pth'} (epoch 0)" in printed and "Resumed" not in printed
    assert "IoU metric: bbox" in printed and "IoU metric: segm" in printed
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert len(json.loads(results.read_text())) == len(metrics["detections"])
    shown = sorted(p.name for p in (tmp_path / "shown").glob("*.png"))
    assert len(shown) == 3 and all(f"{d['image_id']}.png" in shown for d in metrics["detections"])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(pennfudan_dir, tmp_path):
    common = [
        "--data-path",
        pennfudan_dir,
        "--val-size",
        2,
        "--model",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--lr-step-size",
        1,
        *TINY,
    ]
    run(*common, "--epochs", 2, "--output-dir", tmp_path / "straight", "--save-interval", 1)
    for name in ("model_0.pth", "model_1.pth", "best.pth"):  # --save-interval 1 (the default): one per epoch
        (tmp_path / "straight" / name).unlink()  # ~150 MB each
    run(*common, "--epochs", 1, "--output-dir", tmp_path / "stopped")  # "killed" after epoch 0
    run(*common, "--epochs", 2, "--output-dir", tmp_path / "stopped", "--resume", "auto")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 1
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        straight["optimizer"]["param_groups"][0]["lr"]
    )


def test_offline_first_run_reports_every_missing_thing(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(train.utils.SetupError) as err:
        run("--output-dir", tmp_path / "run")
    assert "--data-path DIR" in str(err.value) and "--weights none" in str(err.value)


def test_real_pennfudan_mask_rcnn(real_pennfudan, tmp_path, capsys):
    out = tmp_path / "run"
    run(
        "--data-path",
        real_pennfudan,
        "--epochs",
        1,
        "--output-dir",
        out,
        "--weights",
        "none",
        "--min-size",
        128,
        "--max-size",
        192,
        "-j",
        2,
        "--print-freq",
        20,
        "--save-interval",
        100,
    )
    assert (out / "checkpoint.pth").is_file()
    (out / "best.pth").unlink()  # the same ~340 MB as checkpoint.pth
    printed = capsys.readouterr().out
    assert "pennfudan: 120 train / 50 val images" in printed and "[59/60]" in printed
    run(
        "--data-path",
        real_pennfudan,
        "--output-dir",
        out,
        "--test-only",
        "--resume",
        out / "checkpoint.pth",
        "--weights",
        "none",
        "--min-size",
        128,
        "--max-size",
        192,
        "-j",
        2,
    )
    printed = capsys.readouterr().out
    assert f"Testing {out / 'checkpoint.pth'} (epoch 0)" in printed and "Resumed" not in printed
    assert "IoU metric: bbox" in printed and "IoU metric: segm" in printed


def test_load_from_a_checkpoint_with_other_classes(pennfudan_dir, tmp_path, capsys):
    common = ["--data-path", pennfudan_dir, "--val-size", 2, "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", *TINY]
    run(*common, "--epochs", 1, "--output-dir", tmp_path / "first")
    first = torch.load(tmp_path / "first" / "checkpoint.pth", weights_only=True)
    (tmp_path / "first" / "best.pth").unlink()  # ~150 MB, not needed
    # Pretend the first run had 3 classes: its predictor no longer fits Penn-Fudan's 1 + background.
    first["model"]["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(4, 1024)
    first["model"]["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(4)
    first["model"]["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(16, 1024)
    first["model"]["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(16)
    first["class_names"] = ["cat", "dog", "bird"]
    torch.save(first, tmp_path / "other_classes.pth")
    capsys.readouterr()
    run(
        *common,
        "--epochs",
        1,
        "--output-dir",
        tmp_path / "second",
        "--load-from",
        tmp_path / "other_classes.pth",
        "--lr",
        0.0,
    )  # lr 0: the loaded backbone must come out unchanged
    assert "new predictors replace roi_heads.box_predictor.bbox_pred.bias" in capsys.readouterr().out
    second = torch.load(tmp_path / "second" / "checkpoint.pth", weights_only=True)
    assert second["epoch"] == 0  # a new run, not a continuation
    assert second["model"]["roi_heads.box_predictor.cls_score.weight"].shape == (2, 1024)
    key = "backbone.fpn.inner_blocks.0.0.weight"
    assert torch.equal(second["model"][key], first["model"][key])
    with pytest.raises(train.utils.SetupError, match="(?s)trained on classes.*--load-from"):
        run(*common, "--test-only", "--resume", tmp_path / "other_classes.pth", "--output-dir", tmp_path / "x")
    with pytest.raises(train.utils.SetupError, match="pass one"):
        run(*common, "--resume", tmp_path / "first" / "checkpoint.pth", "--load-from", tmp_path / "other_classes.pth")
    # --resume auto (what slurm_train.sh passes) with --load-from: a new run starts from --load-from, a requeued one
    # continues from its own checkpoint
    run(
        *common,
        "--resume",
        "auto",
        "--load-from",
        tmp_path / "other_classes.pth",
        "--epochs",
        2,
        "--output-dir",
        tmp_path / "second",
    )
    printed = capsys.readouterr().out
    assert "continuing at epoch 1, step 0" in printed and "is not used" in printed


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoints.atomic_save({"epoch": 1}, path)
    real_save = torch.save

    def disk_full(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half-written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        checkpoints.atomic_save({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left behind


def test_real_bccd_voc(tmp_path, capsys):
    from conftest import SHARED_DATA

    root = SHARED_DATA / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"BCCD not found at {root} (set DETECTION_DATA)")
    metrics = run(
        "--dataset",
        "voc",
        "--data-path",
        root,
        "--classes",
        "RBC,WBC,Platelets",
        "--epochs",
        1,
        "--model",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--output-dir",
        tmp_path,
        *TINY,
    )
    printed = capsys.readouterr().out
    assert "voc: 205 train / 87 val images, classes ['RBC', 'WBC', 'Platelets']" in printed
    assert set(metrics["bbox_per_class"]) == set(metrics["voc_ap50_per_class"]) == {"RBC", "WBC", "Platelets"}
    assert 0 <= metrics["voc_mAP50"] <= 1 and "VOC AP@0.5 per class" in printed


def test_real_tiny_coco_masks_and_original_category_ids(tmp_path, capsys):
    from conftest import SHARED_DATA

    root = SHARED_DATA / "tiny_coco"
    if not (root / "annotations").is_dir():
        pytest.skip(f"tiny_coco not found at {root} (set DETECTION_DATA)")
    out = tmp_path / "dets.json"
    metrics = run(
        "--dataset",
        "coco",
        "--data-path",
        root,
        "--epochs",
        1,
        "--output-dir",
        tmp_path,
        "--box-score-thresh",
        0.0,
        "--lr",  # 0: the random model's boxes, which one epoch at lr 0.005 can collapse to nothing
        0.0,
        "--out",
        out,
        *TINY,
    )
    (tmp_path / "best.pth").unlink()  # ~340 MB, the same weights as checkpoint.pth
    assert "segm" in metrics and len(metrics["bbox_per_class"]) == 80
    categories = {c["id"] for c in json.loads((root / "annotations/instances_val2017.json").read_text())["categories"]}
    written = [d["category_id"] for d in json.loads(out.read_text())]
    original = sorted(categories)  # label k is the k-th smallest COCO id: 1..90 with gaps
    assert written and written == [original[d["category_id"] - 1] for d in metrics["detections"]]


def test_real_tiny_coco_person_keypoints(tmp_path, capsys):
    from conftest import SHARED_DATA

    ann = SHARED_DATA / "tiny_coco" / "annotations"
    if not ann.is_dir():
        pytest.skip(f"tiny_coco not found at {ann.parent} (set DETECTION_DATA)")
    metrics = run(
        "--dataset",
        "coco",
        "--data-path",
        ann.parent,
        "--train-ann",
        ann / "person_keypoints_train2017.json",
        "--val-ann",
        ann / "person_keypoints_val2017.json",
        "--model",
        "keypointrcnn_resnet50_fpn",
        "--epochs",
        1,
        "--output-dir",
        tmp_path,
        "--box-score-thresh",
        0.0,
        "--no-val-loss",
        *TINY,
    )
    assert "keypoints" in metrics and "IoU metric: keypoints" in capsys.readouterr().out
    (tmp_path / "best.pth").unlink()  # ~450 MB, the same weights as checkpoint.pth
    # COCOeval's 10 keypoint stats under their own names, in the returned dict, log.jsonl and report.md
    names = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
    assert list(metrics["keypoints"]) == names
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert list(next(r for r in logged if "keypoints" in r)["keypoints"]) == names
    assert "| " + " | ".join(names) + " |" in (tmp_path / "report.md").read_text()
    with pytest.raises(train.utils.SetupError, match="needs keypoints"):
        run(
            "--dataset",
            "coco",
            "--data-path",
            ann.parent,
            "--model",
            "keypointrcnn_resnet50_fpn",
            "--output-dir",
            tmp_path,
            *TINY,
        )


def test_strict_refuses_bccd_zero_size_boxes(tmp_path):
    from conftest import SHARED_DATA

    root = SHARED_DATA / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"BCCD not found at {root} (set DETECTION_DATA)")
    with pytest.raises(train.utils.SetupError, match="(?s)BloodImage_00343.*drop --strict"):
        run(
            "--dataset",
            "voc",
            "--data-path",
            root,
            "--classes",
            "RBC,WBC,Platelets",
            "--strict",
            "--output-dir",
            tmp_path,
            *TINY,
        )


def test_mask_model_on_a_box_only_dataset_is_refused(tmp_path):
    from conftest import SHARED_DATA

    root = SHARED_DATA / "BCCD"
    if not (root / "Annotations").is_dir():
        pytest.skip(f"BCCD not found at {root} (set DETECTION_DATA)")
    with pytest.raises(train.utils.SetupError, match="needs instance masks.*--model fasterrcnn_resnet50_fpn"):
        run(
            "--dataset",
            "voc",
            "--data-path",
            root,
            "--classes",
            "RBC,WBC,Platelets",
            "--model",
            "maskrcnn_resnet50_fpn",
            "--output-dir",
            tmp_path,
            "--weights",
            "none",
        )


def test_tta_and_proposal_recall_are_reported(pennfudan_dir, tmp_path, capsys):
    out = tmp_path / "run"
    model = ["--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--val-size", 3, "--epochs", 1, "--output-dir", out]
    evaluation = ["--eval", "bbox", "proposal", "--tta", "hflip", "--tta-scales", "64,80", "--eval-batch-size", 2]
    metrics = run("--data-path", pennfudan_dir, *model, *evaluation, "--cache-images", *TINY)
    assert set(metrics["proposal"]) == {"AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000"}
    assert 0.0 <= metrics["proposal"]["AR@100"] <= metrics["proposal"]["AR@1000"] <= 1.0
    assert set(metrics["tta"]["bbox"]) == set(metrics["bbox"])
    printed = capsys.readouterr().out
    before, after = round(metrics["bbox"]["AP"] * 100, 1), round(metrics["tta"]["bbox"]["AP"] * 100, 1)
    assert f"bbox AP without TTA {before:.1f}, with TTA {after:.1f} ({after - before:+.1f})" in printed
    assert "Cached the decoded images" in printed
    epoch = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert (
        json.dumps(epoch["proposal"]) == json.dumps(metrics["proposal"])
        and epoch["tta"]["bbox"] == metrics["tta"]["bbox"]
    )


def test_composed_resnet18_pafpn_with_custom_anchors(pennfudan_dir, tmp_path, capsys):
    """The README's composed model: trains, reloads exactly for --test-only and predict.py, reports TTA and AR."""
    out = tmp_path / "run"
    composed = ["--model", "fasterrcnn", "--backbone", "resnet18", "--neck", "pafpn"]
    anchors = ["--anchor-sizes", "16,32,64,128,256", "--anchor-ratios", "0.5,1,2,3"]
    evaluation = ["--eval", "bbox", "proposal", "--tta", "hflip"]
    metrics = run("--data-path", pennfudan_dir, *composed, *anchors, "--val-size", 3, "--epochs", 1,
                  "--output-dir", out, *evaluation, *TINY)  # fmt: skip
    assert {"bbox", "proposal", "tta"} <= set(metrics)
    model = predict.load_model(out / "checkpoint.pth")
    assert model.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.rpn.head.cls_logits.out_channels == 4  # 1 size x 4 ratios per location
    assert type(model.backbone.fpn).__name__ == "PAFPN" and model.backbone.body.layer4[0].conv1.in_channels == 256
    again = run("--data-path", pennfudan_dir, *composed, *anchors, "--val-size", 3, "--output-dir", out,
                "--test-only", "--resume", out / "checkpoint.pth", *TINY)  # fmt: skip
    assert again["bbox"] == metrics["bbox"]  # the same model, rebuilt from the checkpoint

    with pytest.raises(utils.SetupError, match="feature maps"):  # 3 sizes for 5 maps
        run(
            "--data-path",
            pennfudan_dir,
            *composed,
            "--anchor-sizes",
            "16,32,64",
            "--val-size",
            3,
            "--output-dir",
            tmp_path / "bad",
            *TINY,
        )
    with pytest.raises(utils.SetupError, match="--model fasterrcnn"):
        run("--data-path", pennfudan_dir, "--neck", "pafpn", "--val-size", 3, "--output-dir", tmp_path / "bad", *TINY)


def test_checkpoints_rebuild_without_structure_flags_old_format_too(pennfudan_dir, tmp_path, capsys):
    """--test-only and predict.py rebuild the model from the checkpoint alone (its model_args); a checkpoint written
    before model_args existed rebuilds from its args, to the same detections."""
    out = tmp_path / "run"
    parts = ["--model", "fasterrcnn", "--backbone", "resnet18", "--neck", "pafpn", "--anchor-ratios", "0.5,1,2,3"]
    metrics = run("--data-path", pennfudan_dir, *parts, "--val-size", 3, "--epochs", 1, "--output-dir", out, *TINY)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    (out / "best.pth").unlink()  # ~240 MB, the same weights
    assert checkpoint["model_args"]["backbone"] == "resnet18" and checkpoint["model_args"]["neck"] == "pafpn"
    old = {k: v for k, v in checkpoint.items() if k != "model_args"}  # the checkpoint format before this one
    torch.save(old, tmp_path / "old.pth")
    for path in (out / "checkpoint.pth", tmp_path / "old.pth"):
        capsys.readouterr()
        again = run("--data-path", pennfudan_dir, "--val-size", 3, "--output-dir", tmp_path / "eval", "--test-only",
                    "--resume", path, *TINY)  # fmt: skip
        assert "holds a fasterrcnn model: using that" in capsys.readouterr().out
        assert again["bbox"] == metrics["bbox"]
        model = predict.load_model(path)
        assert model.rpn.head.cls_logits.out_channels == 4  # 1 size x 4 ratios per location
        assert type(model.backbone.fpn).__name__ == "PAFPN" and model.class_names == ["person"]
