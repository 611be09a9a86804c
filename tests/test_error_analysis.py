"""extras/error_analysis.py on hand-built cases with known answers, and its PR curve against pycocotools' COCOeval."""

import contextlib
import copy
import io
import json
import sys
import types

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

import engine
import utils
from extras import error_analysis, report

NAMES = ["cat", "dog"]
CAT, DOG, BACKGROUND = 0, 1, 2  # rows and columns of the confusion matrix


def gt(image_id, label, box, crowd=0):
    return {"image_id": image_id, "category_id": label, "bbox": list(box), "iscrowd": crowd}


def det(image_id, label, box, score):
    return {"image_id": image_id, "category_id": label, "bbox": list(box), "score": score}


def confusion(annotations, detections):
    return np.array(error_analysis.analyse(annotations, detections, NAMES, score_thresh=0.25)["confusion"])


def test_class_swap_is_off_diagonal():
    counts = confusion([gt(1, 1, [0, 0, 10, 10])], [det(1, 2, [1, 0, 10, 10], 0.9)])  # a cat detected as a dog
    assert counts[CAT, DOG] == 1 and counts.sum() == 1


def test_missed_object_and_false_detection():
    counts = confusion([gt(1, 2, [0, 0, 10, 10])], [det(1, 1, [50, 50, 10, 10], 0.9)])  # IoU 0: no match
    assert counts[DOG, BACKGROUND] == 1 and counts[BACKGROUND, CAT] == 1 and counts.sum() == 2


def test_duplicate_detection_is_a_false_detection():
    boxes = [det(1, 2, [0, 0, 10, 10], 0.6), det(1, 2, [0, 0, 10, 11], 0.9)]  # the best-scoring one matches first
    counts = confusion([gt(1, 2, [0, 0, 10, 10])], boxes)
    assert counts[DOG, DOG] == 1 and counts[BACKGROUND, DOG] == 1 and counts.sum() == 2


def test_detection_below_threshold_is_ignored():
    counts = confusion([gt(1, 1, [0, 0, 10, 10])], [det(1, 1, [0, 0, 10, 10], 0.2), det(1, 2, [40, 40, 5, 5], 0.25)])
    assert counts[CAT, BACKGROUND] == 1 and counts.sum() == 1  # missed; neither detection counts (> 0.25 is kept)


def test_crowd_is_neither_missed_nor_a_false_detection():
    crowd = gt(1, 2, [0, 0, 100, 100], crowd=1)
    counts = confusion([crowd, gt(1, 1, [200, 200, 10, 10])], [det(1, 1, [10, 10, 20, 20], 0.9)])
    assert counts[CAT, BACKGROUND] == 1 and counts.sum() == 1  # only the real cat, missed
    errors = error_analysis.analyse([crowd], [det(1, 2, [10, 10, 20, 20], 0.9)], NAMES)
    assert errors["per_class"]["dog"]["num_gt"] == 0 and np.isnan(errors["per_class"]["dog"]["AP50"])


def test_normalized_rows_and_json():
    annotations = [gt(1, 1, [0, 0, 10, 10]), gt(2, 1, [0, 0, 10, 10]), gt(3, 2, [0, 0, 10, 10])]
    detections = [det(1, 2, [0, 0, 10, 10], 0.9), det(3, 2, [0, 0, 10, 10], 0.8), det(3, 1, [50, 0, 10, 10], 0.7)]
    errors = error_analysis.analyse(annotations, detections, NAMES)
    assert errors["confusion"] == [[0, 1, 1], [0, 1, 0], [1, 0, 0]]
    assert errors["confusion_normalized"] == [[0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert errors["labels"] == ["cat", "dog", "background"]
    assert json.loads(json.dumps(errors))["confusion"] == errors["confusion"]  # plain data for log.jsonl


def hand_case():
    """Each object alone in its image; a detection is on its object (a true positive) or on nothing."""
    annotations, detections = [], []
    for label, hits in (
        (1, [(0.9, 1), (0.8, 1), (0.7, 0), (0.6, 1), (0.5, 0), (0.4, 0)]),
        (2, [(0.95, 1), (0.85, 0), (0.3, 1)]),
    ):
        num_gt = 4 if label == 1 else 2
        for i in range(num_gt):
            annotations.append(gt(10 * label + i, label, [0, 0, 20, 20]))
        found = 0
        for score, hit in hits:
            box = [0, 0, 20, 20] if hit else [100, 100, 20, 20]
            detections.append(det(10 * label + found, label, box, score))
            found += hit
    return annotations, detections


def test_f1_optimal_thresholds_by_hand():
    errors = error_analysis.analyse(*hand_case(), NAMES)
    # cat, 4 objects: F1 = 2 tp / (kept + 4) = .40 .67 .57 .75 .67 .60 -> keep 4, halfway between .6 and .5
    cat = errors["per_class"]["cat"]
    assert cat["threshold"] == pytest.approx(0.55) and cat["f1"] == pytest.approx(0.75)
    assert cat["precision"] == pytest.approx(0.75) and cat["recall"] == pytest.approx(0.75)
    # dog, 2 objects: .67 .50 .80 -> keep all 3, halfway between .3 and 0
    dog = errors["per_class"]["dog"]
    assert dog["threshold"] == pytest.approx(0.15) and dog["f1"] == pytest.approx(0.8)
    # pooled, 6 objects, tp 1 2 2 3 3 4 4 4 5: F1 .29 .50 .44 .60 .55 .67 .62 .57 .67; of the two best (kept 6 or
    # all 9) the higher threshold wins
    best = errors["recommended"]
    assert best["threshold"] == pytest.approx(0.55) and best["f1"] == pytest.approx(2 / 3)
    assert best["precision"] == pytest.approx(4 / 6) and best["recall"] == pytest.approx(4 / 6)
    assert error_analysis.recommended_threshold({"errors": errors}) == pytest.approx(0.55)
    assert error_analysis.recommended_threshold({}) is None


def test_equal_scores_are_cut_together():
    annotations = [gt(1, 1, [0, 0, 10, 10]), gt(2, 1, [0, 0, 10, 10])]
    detections = [det(1, 1, [0, 0, 10, 10], 0.9), det(3, 1, [0, 0, 10, 10], 0.5), det(2, 1, [0, 0, 10, 10], 0.5)]
    best = error_analysis.analyse(annotations, detections, NAMES)["recommended"]
    assert best["threshold"] == pytest.approx(0.25) and best["f1"] == pytest.approx(
        0.8
    )  # cutting between the two 0.5s would give F1 1.0


def random_case(seed, num_images=25):
    """Ground truth of 3 classes (some crowd), jittered detections (some of the wrong class) and clutter, and one image
    with 150 detections of a class: COCOeval keeps its best 100."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "height": 200, "width": 200})
        for _ in range(rng.integers(0, 6)):
            xy, wh, label = rng.uniform(0, 150, 2), rng.uniform(10, 50, 2), int(rng.integers(1, 4))
            annotations.append(gt(image_id, label, [*xy, *wh], crowd=int(rng.random() < 0.1)))
            annotations[-1]["area"] = float(wh.prod())
            for _ in range(rng.integers(0, 3) if image_id > 1 else 150):
                box = np.r_[xy + rng.normal(0, 4, 2), np.abs(wh + rng.normal(0, 4, 2))]
                detections.append(det(image_id, label if rng.random() < 0.8 else int(rng.integers(1, 4)), box, 0.0))
        for _ in range(rng.integers(0, 4)):
            detections.append(det(image_id, int(rng.integers(1, 4)), [*rng.uniform(0, 150, 2), 20, 20], 0.0))
    for d in detections:
        d["score"] = float(rng.random())
    return images, annotations, detections


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pr_curve_equals_cocoeval(seed):
    images, annotations, detections = random_case(seed)
    names = ["a", "b", "c"]
    coco_gt = engine.coco_from_records(images, copy.deepcopy(annotations), names)
    coco_eval = COCOeval(coco_gt, engine.load_results(coco_gt, images, detections, names), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    errors = error_analysis.analyse(annotations, detections, names)
    for k, name in enumerate(names):
        expected = coco_eval.eval["precision"][0, :, k, 0, -1]  # IoU 0.5, 101 recall points, area all, 100 dets
        curve = errors["per_class"][name]["curve"]
        assert curve["recall"] == pytest.approx(coco_eval.params.recThrs.tolist(), abs=1e-12)
        np.testing.assert_allclose(curve["precision"], expected, rtol=0, atol=1e-6)
        assert errors["per_class"][name]["AP50"] == pytest.approx(expected.mean(), abs=1e-12)


class FixedModel(torch.nn.Module):
    """Returns the preset outputs, in order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, images):
        out, self.outputs = self.outputs[: len(images)], self.outputs[len(images) :]
        return out


def test_scorer_in_evaluate(capsys):
    boxes = torch.tensor([[10.0, 10, 40, 50], [60, 20, 90, 70]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "image_id": 7, "iscrowd": torch.tensor([0, 0])}
    output = {"boxes": boxes + 2, "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.9, 0.8])}  # dog as cat
    loader = torch.utils.data.DataLoader([(torch.zeros(3, 100, 100), target)], collate_fn=utils.collate_fn)
    scorer = error_analysis.scorer(score_thresh=0.5)
    metrics = engine.evaluate(FixedModel([output]), loader, torch.device("cpu"), class_names=NAMES, scorers=[scorer])
    errors = metrics["errors"]
    assert errors["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]] and errors["score_thresh"] == 0.5
    assert errors["per_class"]["cat"]["AP50"] == pytest.approx(metrics["bbox_per_class"]["cat"]["AP50"])
    printed = capsys.readouterr().out
    assert "truth / predicted" in printed and "Recommended --score-thresh 0.850" in printed


def test_save_plots_and_report(tmp_path, capsys):
    errors = error_analysis.analyse(*hand_case(), NAMES)
    paths = error_analysis.save_plots(errors, NAMES, tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["confusion_matrix.png", "pr_curve.png"]
    for path in paths:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"epoch": 0, "train": {"loss": 1.0}, "bbox": {"AP": 0.5}}) + "\n")
    args = types.SimpleNamespace(model="fasterrcnn_resnet50_fpn", dataset="custom", output_dir=str(out), device="cpu")
    bbox = dict.fromkeys(engine.STAT_NAMES, 0.5)
    per_class = {name: {"AP": 0.5, "AP50": 0.5} for name in NAMES}
    metrics = {"bbox": bbox, "bbox_per_class": per_class, "errors": errors}
    report.write_report(args, metrics, out / "log.jsonl", 1.0, 10.0)
    text = (out / "report.md").read_text()
    assert "## Error analysis" in text and "`--score-thresh 0.550`" in text
    assert "| cat | 4 | 0.550 | 75.0 | 75.0 | 75.0 |" in text and "| dog | 2 | 0.150 | 66.7 | 100.0 | 80.0 |" in text
    assert "![confusion_matrix](confusion_matrix.png)" in text and "![pr_curve](pr_curve.png)" in text
    assert (out / "confusion_matrix.png").stat().st_size > 0 and (out / "pr_curve.png").stat().st_size > 0


def test_save_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # `import` raises ImportError
    errors = error_analysis.analyse(*hand_case(), NAMES)
    assert error_analysis.save_plots(errors, NAMES, tmp_path) == []
    assert "pip install matplotlib" in capsys.readouterr().out and not list(tmp_path.iterdir())
