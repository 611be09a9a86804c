"""The fast path (speed.fast_path, bf16 autocast) computes what the plain model computes."""

import argparse
import copy

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import models
import train
from extras import mixed_precision, speed


def _pretrained_like(tmp_path, name, num_classes=3, **kwargs):
    """`name` built as from COCO weights (frozen BatchNorm, early stages frozen), with non-trivial BN statistics."""
    torch.manual_seed(0)
    state = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for key, value in state.items():  # identity BatchNorm would make folding trivially exact
        if key.endswith("running_var") or (key.endswith(".weight") and value.dim() == 1):
            value.uniform_(0.5, 1.5)
        elif key.endswith("running_mean") or (key.endswith(".bias") and "bn" in key):
            value.normal_(0, 0.1)
    torch.save(state, tmp_path / "coco.pth")
    return models.get_model(name, num_classes=num_classes, weights=str(tmp_path / "coco.pth"), **kwargs)


def _batch(masks=False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 72, 96, generator=g), torch.rand(3, 80, 64, generator=g)]
    targets = []
    for image, box in zip(images, ([8.0, 10, 60, 50], [5.0, 20, 40, 70])):
        target = {"boxes": torch.tensor([box]), "labels": torch.tensor([1])}
        if masks:
            target["masks"] = torch.zeros(1, *image.shape[-2:], dtype=torch.uint8)
            x1, y1, x2, y2 = map(int, box)
            target["masks"][0, y1:y2, x1:x2] = 1
        targets.append(target)
    return images, targets


def _losses_and_grads(model, images, targets, amp_dtype=None):
    model.train()
    torch.manual_seed(1)  # the RPN and RoI heads sample proposals at random: the same draws for both models
    with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return {k: v.item() for k, v in losses.items()}, grads


def _float64(images, targets):
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    return [image.double() for image in images], targets


def _relative_error(values, reference):
    """The largest error over all tensors, each relative to the largest entry of its reference."""
    return max(
        float((values[k] - reference[k]).abs().max() / reference[k].abs().max().clamp(min=1e-12)) for k in values
    )


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_folding_batchnorm_changes_neither_losses_nor_gradients(tmp_path, name):
    plain = _pretrained_like(tmp_path, name, min_size=64, max_size=96)
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in plain.modules())
    fast = copy.deepcopy(plain)
    assert speed.fold_frozen_batchnorm(fast) == frozen > 20  # every frozen BatchNorm found its conv
    assert fast.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    images, targets = _batch(masks=name.startswith("mask"))
    # fp32 sums in another order differ by ~1e-4 in a deep random network: judge both against float64
    truth = _losses_and_grads(copy.deepcopy(plain).double(), *_float64(images, targets))
    losses, grads = _losses_and_grads(plain, images, targets)
    fast_losses, fast_grads = _losses_and_grads(fast, images, targets)
    assert fast_grads.keys() == grads.keys() and any(n.startswith("backbone.body") for n in grads)
    as_tensors = lambda d: {k: torch.tensor(v) for k, v in d.items()}  # noqa: E731
    assert _relative_error(as_tensors(fast_losses), as_tensors(truth[0])) < 1e-4
    assert _relative_error(fast_grads, truth[1]) <= 2 * max(_relative_error(grads, truth[1]), 1e-5)
    plain.eval(), fast.eval()
    with torch.no_grad():
        expected, got = plain(images), fast(images)
    for a, b in zip(expected, got):  # fp32 rounding of w * s through 50+ layers: hundredths of a pixel, at most
        assert torch.allclose(a["boxes"], b["boxes"], atol=0.05) and torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_fast_path_trains_like_fp32(tmp_path):
    """Four SGD steps with bf16 autocast + channels_last + folded BatchNorm follow the fp32 run.

    The RPN's losses are computed on anchors sampled from the ground truth alone, so they must agree to bf16's
    precision (8-bit mantissa, ~0.4% per rounding): 1%. The RoI heads' losses are computed on proposals the model
    ranks itself, and a near-tie that bf16 breaks the other way samples other proposals: 10%.
    """
    plain = _pretrained_like(tmp_path, "fasterrcnn_mobilenet_v3_large_320_fpn", min_size=64, max_size=96)
    fast = models.prepare_model(copy.deepcopy(plain), torch.device("cpu"), amp=True)  # train.py's CPU fast path, --amp
    images, targets = _batch()
    history = {}
    for label, model, amp_dtype in (("fp32", plain, None), ("fast", fast, torch.bfloat16)):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        history[label] = []
        for _ in range(4):
            model.train()
            torch.manual_seed(1)
            with torch.autocast("cpu", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = model(images, targets)
            sum(losses.values()).backward()
            optimizer.step()
            optimizer.zero_grad()
            history[label].append({k: v.item() for k, v in losses.items()})
    for expected, got in zip(history["fp32"], history["fast"]):
        for name in expected:
            tolerance = 0.01 if "rpn" in name or "objectness" in name else 0.1
            assert got[name] == pytest.approx(expected[name], rel=tolerance), (name, history)
    assert history["fast"][-1]["loss_classifier"] < history["fast"][0]["loss_classifier"]  # it learns
    fast.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        objectness, deltas = fast.rpn.head(list(fast.backbone(torch.rand(1, 3, 64, 96)).values()))
        outputs = fast(images)
    assert objectness[0].dtype == deltas[0].dtype == torch.float32  # decoded and matched in fp32
    assert outputs[0]["boxes"].dtype == torch.float32


def test_roi_heads_see_a_few_padded_shapes_and_compute_the_same(tmp_path):
    """oneDNN caches a kernel per input shape (~5 MB each for a box head's fc6 in bf16, up to 1,024 of them): the
    fast path pads the RoIs to a multiple of 64 (box head) or 16 (mask head), and the padding changes nothing."""
    plain = _pretrained_like(tmp_path, "maskrcnn_resnet50_fpn", min_size=64, max_size=96)
    padded, rows = copy.deepcopy(plain), {}
    for when in ("before", "after"):  # pre-hooks run in order: before the fast path's padding, and after it
        for name in ("box", "mask"):
            record = rows.setdefault((name, when), [])
            head = getattr(padded.roi_heads, f"{name}_head")
            head.register_forward_pre_hook(lambda m, a, r=record: r.append(len(a[0])))
        if when == "before":
            speed.fast_path(padded, channels_last=False, fold_bn=False)
    images, targets = _batch(masks=True)
    losses, grads = _losses_and_grads(plain, images, targets)
    padded_losses, padded_grads = _losses_and_grads(padded, images, targets)
    assert padded_losses == pytest.approx(losses, rel=1e-5)
    assert padded_grads.keys() == grads.keys() and _relative_error(padded_grads, grads) < 1e-5
    plain.eval(), padded.eval()
    with torch.no_grad():
        expected, got = plain(images), padded(images)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(
            torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a if k != "masks"
        )
        assert torch.equal(a["masks"] > 0.5, b["masks"])  # speed.PasteInBoxes pastes them cut at 0.5
    for name, multiple in (("box", 64), ("mask", 16)):
        before, after = rows[name, "before"], rows[name, "after"]
        assert all(n % multiple == 0 for n in after) and any(n % multiple for n in before), rows  # padding was needed
        assert [-(-n // multiple) * multiple for n in before] == after, rows


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for flags, expected in (("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 avx512f", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(
            builtins, "open", lambda p, *a, info=cpuinfo, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k)
        )
        assert mixed_precision.cpu_has_native_bf16() is expected


def test_bf16_is_opt_in_on_cpu_and_suggested_where_it_is_native(monkeypatch, capsys):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(mixed_precision, "cpu_has_native_bf16", lambda native=native: native)
        assert train.get_amp_dtype(argparse.Namespace(amp=None, amp_dtype=None), cpu) is None
        assert ("--amp trains" in capsys.readouterr().out) is native
    assert train.get_amp_dtype(argparse.Namespace(amp=True, amp_dtype=None), cpu) is torch.bfloat16
    assert train.get_amp_dtype(argparse.Namespace(amp=None, amp_dtype="bf16"), cpu) is torch.bfloat16
    assert train.get_amp_dtype(argparse.Namespace(amp=False, amp_dtype=None), torch.device("cuda")) is None
    assert train.get_amp_dtype(argparse.Namespace(amp=None, amp_dtype=None), torch.device("cuda")) is torch.float16


def test_keypoint_rcnn_trains_on_the_fast_path_in_fp32():
    """channels_last makes the keypoint predictor's logits NHWC, which torchvision's keypoint loss .view()s: the fast
    path hands them on contiguous, and the loss is the one of the plain model."""
    torch.manual_seed(0)
    plain = models.get_model("keypointrcnn_resnet50_fpn", num_classes=2, weights="none", min_size=64, max_size=96)
    fast = models.prepare_model(copy.deepcopy(plain), torch.device("cpu"))  # fp32: no mixed_precision hooks
    images, targets = _batch()
    for target in targets:
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        points = torch.stack([torch.linspace(x1 + 1, x2 - 1, 17), torch.linspace(y1 + 1, y2 - 1, 17)], dim=1)
        target["keypoints"] = torch.cat([points, torch.full((17, 1), 2.0)], dim=1)[None]  # [1, 17, 3], all visible
    losses = {}
    for label, model in (("plain", plain), ("fast", fast)):
        model.train()
        torch.manual_seed(1)
        losses[label] = model(images, targets)
        sum(losses[label].values()).backward()
    assert losses["fast"]["loss_keypoint"] > 0
    assert losses["fast"]["loss_keypoint"].item() == pytest.approx(losses["plain"]["loss_keypoint"].item(), rel=1e-3)
