"""references/benchmark.py on a tiny generated dataset: stand-in weights load like torchvision's COCO file, the
speed mode measures each configuration in a child process, the accuracy mode trains each with its own flags."""

import json
import subprocess
import sys

import pycocotools.mask as mask_util
import torch
from conftest import REPO, make_pennfudan

import models

sys.path.insert(0, str(REPO / "references"))
import benchmark  # noqa: E402
import benchmark_masks  # noqa: E402

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"
TINY = ["--model", NAME, "--min-size", "64", "--max-size", "96", "-j", "0", "--val-size", "2", "--print-freq", "100"]


def test_stand_in_weights_load_as_the_coco_file_with_measured_batchnorm_statistics(tmp_path):
    path = benchmark.stand_in_weights(NAME, str(tmp_path))
    model = models.get_model(NAME, num_classes=3, weights=path)  # the path a downloaded COCO file takes
    frozen = [m for m in model.backbone.body.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert len(frozen) > 20
    variances = torch.cat([m.running_var for m in frozen])
    assert not torch.allclose(variances, torch.ones_like(variances))  # calibrated, not the initial 1
    state = torch.load(path, weights_only=True)
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 91


def test_own_flags_are_not_passed_to_train_py():
    argv = ["--iters", "3", "--json=out.json", "--model", NAME, "--repeats", "2", "--lr", "0.01", "--configs=plain"]
    assert benchmark.own_argv(argv) == ["--model", NAME, "--lr", "0.01"]


def test_speed_mode_measures_each_configuration_in_a_child_process(tmp_path):
    make_pennfudan(tmp_path / "pf", num_images=8)
    out = tmp_path / "bench.json"
    argv = ["--data-path", tmp_path / "pf", "--weights", "stand-in", *TINY, "--iters", "2", "--warmup", "1"]
    argv += ["--eval-images", "2", "--json", out]
    done = subprocess.run(
        [sys.executable, REPO / "references" / "benchmark.py", *map(str, argv)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "| plain |" in done.stdout and "| default |" in done.stdout and "| amp |" in done.stdout
    assert "default / plain: train_img_s x" in done.stdout and "amp / plain: train_img_s x" in done.stdout
    result = json.loads(out.read_text())
    assert list(result["runs"]) == ["plain", "default", "amp"]
    for config, runs in result["runs"].items():
        (run,) = runs
        assert run["train_img_s"] > 0 and run["eval_img_s"] > 0 and run["peak_mb"] > 100, (config, run)
        assert run["nan_steps"] == 0 and run["timed_steps"] == 2  # the worker measured the --iters asked for
    assert result["median"]["plain"] == result["runs"]["plain"][0]


def test_accuracy_mode_trains_each_configuration_with_its_flags(tmp_path):
    make_pennfudan(tmp_path / "pf", num_images=8)
    out = tmp_path / "acc" / "accuracy.json"
    argv = ["--data-path", tmp_path / "pf", "--weights", "none", *TINY, "--accuracy-epochs", "1", "--json", out]
    done = subprocess.run(
        [sys.executable, REPO / "references" / "benchmark.py", *map(str, argv)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    for config, fast, amp in (("plain", False, False), ("default", True, None), ("amp", True, True)):
        (run,) = result["runs"][config]
        assert 0 <= run["bbox_AP"] <= 1 and run["minutes"] > 0
        flags = json.loads((tmp_path / "acc" / f"accuracy_{config}" / "args.json").read_text())
        assert flags["epochs"] == 1 and flags["amp"] is amp
        assert flags["channels_last"] is fast and flags["fold_bn"] is fast and flags["fast_roi_align"] is fast
        kept = sorted(p.name for p in (tmp_path / "acc" / f"accuracy_{config}").glob("*.pth"))
        assert kept == ["best.pth"]  # ~150 MB each: no per-epoch copies, no checkpoint.pth once it has finished


def test_mask_benchmark_compares_equal_rles_of_real_masks():
    masks, boxes = benchmark_masks.fake_detections(12, 120, 160)
    before, _ = benchmark_masks.before(masks, boxes, (120, 160))
    after, _ = benchmark_masks.after(masks, boxes, (120, 160))
    assert before == after and len(after) == 12
    assert all(mask_util.area(rle) > 20 for rle in after)  # blobs, not empty masks that would trivially match
    done = subprocess.run(
        [sys.executable, REPO / "references" / "benchmark_masks.py", "--detections", "3", "--repeats", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "| before |" in done.stdout and "| after |" in done.stdout and "faster" in done.stdout
