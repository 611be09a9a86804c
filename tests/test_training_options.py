"""--accumulate, --ema, --repeat-factor-thr and --patience: their arithmetic, and a resumed run that uses them all."""

import argparse
import math
import types

import pytest
import torch

import engine
import train
import utils
from datasets.group_by_aspect_ratio import GroupedBatchSampler
from extras import early_stop, ema, repeat_factor


class MeanColourRegressor(torch.nn.Module):
    """A detector-shaped toy without BatchNorm: model(images, targets) -> {"loss_mse": mean over the images}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, images, targets):
        x = torch.stack([image.mean(dim=(1, 2)) for image in images])  # [B, 3]
        y = torch.stack([t["boxes"].sum() / 100 for t in targets])  # [B]
        return {"loss_mse": ((self.linear(x).squeeze(1) - y) ** 2).mean()}


def toy_batches(batch_size, count=4):
    torch.manual_seed(1)
    samples = []
    for i in range(count):
        target = {"boxes": torch.rand(2, 4) * 50, "labels": torch.ones(2, dtype=torch.int64), "image_id": i}
        samples.append((torch.rand(3, 8, 8), target))
    return [tuple(zip(*samples[i : i + batch_size])) for i in range(0, count, batch_size)]


def train_toy(batch_size, accumulate):
    model = MeanColourRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = []
    loop = dict(epoch=1, print_freq=100, accumulate=accumulate, after_step=lambda: steps.append(1))
    stats = engine.train_one_epoch(model, optimizer, toy_batches(batch_size), torch.device("cpu"), **loop)
    return model, len(steps), stats


def test_two_accumulated_batches_of_2_equal_one_batch_of_4():
    big, big_steps, _ = train_toy(batch_size=4, accumulate=1)
    accumulated, accumulated_steps, stats = train_toy(batch_size=2, accumulate=2)
    assert big_steps == accumulated_steps == 1 and stats["steps"] == 2  # 2 batches, one optimizer step
    for a, b in zip(big.parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-7), (a, b)
    separate, separate_steps, _ = train_toy(batch_size=2, accumulate=1)  # the control: two steps differ
    assert separate_steps == 2 and not torch.allclose(separate.linear.weight, big.linear.weight, atol=1e-4)


def test_accumulation_windows_and_warm_up_count_optimizer_steps():
    model = MeanColourRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    lrs = []
    batches = toy_batches(1, count=5)  # accumulate 2: windows of batches (0, 1), (2, 3), (4)
    engine.train_one_epoch(model, optimizer, batches, torch.device("cpu"), epoch=0, print_freq=100, accumulate=2,
                           after_step=lambda: lrs.append(optimizer.param_groups[0]["lr"]))  # fmt: skip
    # 3 optimizer steps; the warm-up runs over them (0, 1, 2 of warmup_iters = 2), not over the 5 batches
    assert lrs == pytest.approx([0.1 * 1e-3, 0.1 * (1e-3 + (1 - 1e-3) / 2), 0.1])


def test_ema_follows_the_ramped_decay():
    model = torch.nn.Linear(2, 1)
    average = ema.ModelEMA(model, decay=0.9, ramp=1)
    start = average.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)
    decay = 0.9 * (1 - math.exp(-1))
    assert torch.allclose(average.module.weight, decay * start + (1 - decay) * model.weight)
    assert not average.module.weight.requires_grad and average.updates == 1


def test_repeat_factors_draw_rare_class_images_the_expected_number_of_times():
    labels = [{1}] * 90 + [{1, 2}] * 4 + [{2}] * 6  # class 2 in 10% of the images
    factors, per_class = repeat_factor.repeat_factors(labels, threshold=0.25)
    expected = math.sqrt(0.25 / 0.1)  # 1.58: drawn once or twice, twice in 58% of the epochs
    assert per_class == {1: (94, 1.0), 2: (10, pytest.approx(expected))}
    assert factors[:90] == [1.0] * 90 and factors[90:] == [pytest.approx(expected)] * 10

    sampler = repeat_factor.RepeatFactorSampler(factors, seed=3)
    draws = torch.zeros(100)
    for epoch in range(400):
        sampler.set_epoch(epoch)
        counts = torch.bincount(torch.tensor(list(sampler)), minlength=100)
        assert (counts[:90] == 1).all() and ((counts[90:] == 1) | (counts[90:] == 2)).all()
        draws += counts
    # 10 images x 400 epochs: the mean is within ~4 standard errors of 1.58
    assert draws[90:].mean() / 400 == pytest.approx(expected, abs=0.04)

    again = repeat_factor.RepeatFactorSampler(factors, seed=3)
    again.set_epoch(7), sampler.set_epoch(7)
    assert list(again) == list(sampler)  # deterministic for (seed, epoch)


def test_repeat_factor_sampler_shards_ranks_and_batches_by_aspect_ratio():
    factors = [1.0] * 7 + [2.5] * 3
    whole = repeat_factor.RepeatFactorSampler(factors, seed=0)
    ranks = [repeat_factor.RepeatFactorSampler(factors, num_replicas=2, rank=r, seed=0) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (whole, *ranks):
            s.set_epoch(epoch)
        assert len(ranks[0]) == len(ranks[1]) == math.ceil(len(whole) / 2)  # every rank steps as often
        assert set(ranks[0].indices + ranks[1].indices) == set(whole.indices)
    groups = [i % 2 for i in range(10)]
    batches = list(GroupedBatchSampler(ranks[0], groups, batch_size=2))
    assert len(batches) == len(ranks[0]) // 2 and all(len(b) == 2 for b in batches)


def test_image_labels_from_samples():
    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return None, {"labels": torch.tensor([1, 1] if i else [2])}

    subset = torch.utils.data.Subset(Samples(), [2, 0])
    assert repeat_factor.image_labels(subset) == [{1}, {2}]


def test_patience_counts_evaluations_since_the_best(tmp_path):
    assert early_stop.evaluations_since(best_epoch=2, epoch=5, eval_interval=1) == 3
    assert early_stop.evaluations_since(best_epoch=1, epoch=7, eval_interval=2) == 3  # evaluated after 3, 5, 7
    args = argparse.Namespace(patience=2, eval_interval=1, output_dir=str(tmp_path))
    torch.save({"model": {}, "epoch": 1}, tmp_path / "best.pth")
    run = types.SimpleNamespace(args=args, best_epoch=1, best_ap=0.25, stopped=None)
    assert not early_stop.should_stop(run, 2) and run.stopped is None
    assert early_stop.should_stop(run, 3)
    assert "after epoch 3" in run.stopped and "0.2500, came at epoch 1" in run.stopped
    assert torch.load(tmp_path / "best.pth", weights_only=True)["stopped"] == run.stopped


def run(*argv):
    return train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


def test_resumed_run_with_accumulation_ema_and_repeats_equals_a_straight_one(pennfudan_dir, tmp_path, capsys):
    common = ["--data-path", pennfudan_dir, "--val-size", 3, "--model", "fasterrcnn_mobilenet_v3_large_320_fpn"]
    common += ["--weights", "none", "--min-size", "64", "--max-size", "96", "-j", "0", "--save-interval", "100"]
    common += ["-b", 1, "--accumulate", 2, "--ema", 0.9, "--repeat-factor-thr", 0.5, "--patience", 5]
    run(*common, "--epochs", 2, "--output-dir", tmp_path / "straight")
    printed = capsys.readouterr().out
    assert "x 2 accumulated / 2 = 0.005 (linear scaling)" in printed
    assert "Repeat-factor sampling (threshold 0.5)" in printed and "person" in printed
    assert "Confusion matrix at IoU 0.5" in printed and "Recommended --score-thresh" in printed
    report = (tmp_path / "straight" / "report.md").read_text()
    assert "## Error analysis" in report and (tmp_path / "straight" / "confusion_matrix.png").is_file()
    assert "| truth \\ predicted | person | background |" in report  # the confusion counts
    assert "## Repeat-factor sampling (--repeat-factor-thr 0.5)" in report and "| person | 5 | 1.00 |" in report

    (tmp_path / "straight" / "best.pth").unlink()  # ~220 MB each: the average, the raw weights and the momentum
    run(*common, "--epochs", 1, "--output-dir", tmp_path / "stopped")
    run(*common, "--epochs", 2, "--output-dir", tmp_path / "stopped", "--resume", "auto")
    (tmp_path / "stopped" / "best.pth").unlink()
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)
    assert straight["ema_updates"] == resumed["ema_updates"] == 2 * 3  # 5 batches an epoch: windows of 2, 2 and 1
    for key in ("model", "model_raw"):  # the average and the raw weights, both carried through the resume
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    assert not all(torch.equal(v, straight["model_raw"][k]) for k, v in straight["model"].items())
    assert straight["score_thresh"] == resumed["score_thresh"] and straight["best_epoch"] in (0, 1)

    capsys.readouterr()  # --test-only evaluates the average ("model"), here on tiles of 48 px of the 64-96 px images
    tiled = ["--test-only", "--resume", tmp_path / "straight" / "checkpoint.pth", "--tile", 48, "--tile-full-image"]
    metrics = run(*common, "--output-dir", tmp_path / "tiled", *tiled)
    assert "bbox" in metrics and "errors" in metrics and "Testing" in capsys.readouterr().out
    with pytest.raises(utils.SetupError, match="--tile N"):
        run(*common, "--output-dir", tmp_path / "tiled", "--tile", 48)  # training on tiles: cut them with the converter
