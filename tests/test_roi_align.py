"""fast_roi_align against torchvision.ops: the same outputs and input gradients, and a drop-in for R-CNN poolers."""

import copy
from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign

from extras.fast_roi_align import FastMultiScaleRoIAlign, roi_align, use_fast_roi_align

ATOL = 1e-4  # fp32, unit-scale features and upstream gradients


def random_rois(num_images, per_image, height, width, gen, dtype=torch.float32):
    """[K, 5] rois in image pixels: ordinary boxes, boxes partly (or wholly) off the image, sub-pixel boxes."""
    rois = []
    for image in range(num_images):
        size = torch.rand(per_image, 2, generator=gen) * torch.tensor([width, height]) * 0.8
        size[: per_image // 4] *= 0.01  # tiny: well under one feature cell, some under one pixel
        center = torch.rand(per_image, 2, generator=gen) * torch.tensor([width, height]) * 1.4
        center -= 0.2 * torch.tensor([width, height])  # spills over every edge
        boxes = torch.cat([center - size / 2, center + size / 2], dim=1)
        rois.append(torch.cat([torch.full((per_image, 1), float(image)), boxes], dim=1))
    return torch.cat(rois).to(dtype)


def compare(x, rois, output_size, spatial_scale, sampling_ratio, aligned, gen):
    """Max abs differences of the outputs and of the input gradients (for one random upstream gradient)."""
    x = x.detach().requires_grad_()
    expected = torchvision.ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    actual = roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    grad_out = torch.randn(expected.shape, generator=gen, dtype=x.dtype)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    (actual_grad,) = torch.autograd.grad(actual, x, grad_out)
    return (actual - expected).abs().max().item(), (actual_grad - expected_grad).abs().max().item()


@pytest.mark.parametrize("spatial_scale", [1.0, 1 / 4, 1 / 8, 1 / 16, 1 / 32])
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision(spatial_scale, aligned):
    gen = torch.Generator().manual_seed(0)
    height, width = 19, 26  # feature cells
    x = torch.randn(3, 8, height, width, generator=gen)
    rois = random_rois(3, 24, height / spatial_scale, width / spatial_scale, gen)
    # The box head's and the mask head's settings, and a non-square grid with another sampling ratio
    for output_size, sampling_ratio in [(7, 2), ((14, 14), 2), ((3, 5), 1), ((5, 3), 3)]:
        d_out, d_grad = compare(x, rois, output_size, spatial_scale, sampling_ratio, aligned, gen)
        assert d_out < ATOL and d_grad < ATOL, (output_size, d_out, d_grad)


def test_channels_last_list_boxes_and_fallback():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 25, 34, generator=gen).contiguous(memory_format=torch.channels_last)
    rois = random_rois(2, 30, 25 * 32, 34 * 32, gen)
    d_out, d_grad = compare(x, rois, 7, 1 / 32, 2, False, gen)
    assert d_out < ATOL and d_grad < ATOL
    # Boxes as a list of per-image [K_i, 4], as the R-CNN heads pass them
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    expected = torchvision.ops.roi_align(x, boxes, 7, 1 / 32, 2)
    torch.testing.assert_close(roi_align(x, boxes, 7, 1 / 32, 2), expected, atol=ATOL, rtol=0)
    # sampling_ratio <= 0 (adaptive grid) is torchvision's own kernel
    d_out, d_grad = compare(x, rois, 7, 1 / 32, -1, False, gen)
    assert d_out == 0 and d_grad == 0
    # No rois
    assert roi_align(x, rois[:0], 7, 1 / 32, 2).shape == (0, 16, 7, 7)


def test_gradcheck_fp64():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = random_rois(2, 5, 9 * 4, 11 * 4, gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 1 / 4, 2), (x,))


def test_bf16_under_autocast():
    """Autocast hands roi_align bf16 maps; both compute in fp32 and return bf16."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 50, 68, generator=gen).to(torch.bfloat16).requires_grad_()
    rois = random_rois(2, 40, 50 * 16, 68 * 16, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torchvision.ops.roi_align(x, rois, 7, 1 / 16, 2)
        actual = roi_align(x, rois, 7, 1 / 16, 2)
    assert actual.dtype == expected.dtype == torch.bfloat16
    # Both round an fp32 result to bf16: at most one bf16 step (2^-8 relative) apart
    torch.testing.assert_close(actual.float(), expected.float(), atol=1e-3, rtol=2**-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the adaptive-grid fallback under autocast
        fallback = roi_align(x, rois, 7, 1 / 16, -1)
    assert fallback.dtype == torch.bfloat16 and fallback.shape == actual.shape


def fpn_features(gen, channels_last=False, image_size=(320, 416)):
    feats = OrderedDict()
    for i, stride in enumerate((4, 8, 16, 32)):
        f = torch.randn(2, 8, image_size[0] // stride, image_size[1] // stride, generator=gen)
        feats[str(i)] = f.contiguous(memory_format=torch.channels_last) if channels_last else f
    feats["pool"] = torch.randn(2, 8, 5, 7, generator=gen)  # not pooled from, as in torchvision's FPN
    return feats


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("output_size", [7, 14])
def test_multiscale_matches_torchvision(channels_last, output_size):
    gen = torch.Generator().manual_seed(4)
    image_size = (640, 832)  # boxes up to 0.8 x 832 px reach level "3" (sqrt(area) > 448 px)
    feats = fpn_features(gen, channels_last, image_size)
    for f in feats.values():
        f.requires_grad_()
    rois = random_rois(2, 64, *image_size, gen)
    boxes = [rois[rois[:, 0] == i, 1:].clamp(min=0) for i in range(2)]  # spread over the 4 levels
    names = ["0", "1", "2", "3"]
    expected = MultiScaleRoIAlign(names, output_size, 2)(feats, boxes, [image_size] * 2)
    actual = FastMultiScaleRoIAlign(names, output_size, 2)(feats, boxes, [image_size] * 2)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    grad_out = torch.randn(expected.shape, generator=gen)
    levels = list(feats.values())[:4]
    expected_grads = torch.autograd.grad(expected, levels, grad_out)
    actual_grads = torch.autograd.grad(actual, levels, grad_out, allow_unused=True)  # None: a level without rois
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(torch.zeros_like(e) if a is None else a, e, atol=ATOL, rtol=0)
    assert all(g is not None for g in actual_grads)  # the boxes do reach every level


def test_multiscale_one_level_and_no_rois():
    gen = torch.Generator().manual_seed(5)
    feats = fpn_features(gen)
    names = ["0", "1", "2", "3"]
    small = [torch.tensor([[10.0, 10.0, 40.0, 50.0], [100.0, 60.0, 130.0, 80.0]])] * 2  # all on level "0"
    for boxes in (small, [torch.zeros(0, 4)] * 2):
        expected = MultiScaleRoIAlign(names, 7, 2)(feats, boxes, [(320, 416)] * 2)
        actual = FastMultiScaleRoIAlign(names, 7, 2)(feats, boxes, [(320, 416)] * 2)
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_use_fast_roi_align_on_mask_rcnn():
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=160, max_size=192
    )
    fast = use_fast_roi_align(copy.deepcopy(model))
    for name in ("box_roi_pool", "mask_roi_pool"):
        assert type(getattr(fast.roi_heads, name)) is FastMultiScaleRoIAlign
        assert repr(getattr(fast.roi_heads, name)) == repr(getattr(model.roi_heads, name)).replace("Multi", "FastMulti")
    assert fast.state_dict().keys() == model.state_dict().keys()
    fast.load_state_dict(model.state_dict())  # checkpoints move between the two

    images = [torch.rand(3, 160, 192)]
    masks = torch.zeros(1, 160, 192, dtype=torch.uint8)
    masks[0, 40:120, 30:150] = 1
    targets = [{"boxes": torch.tensor([[30.0, 40.0, 150.0, 120.0]]), "labels": torch.tensor([1]), "masks": masks}]
    losses = {}
    for key, m in (("torchvision", model), ("fast", fast)):
        m.train()
        torch.manual_seed(1)  # the same sampled proposals in both
        losses[key] = m(images, targets)
    for name, value in losses["torchvision"].items():
        torch.testing.assert_close(losses["fast"][name], value, atol=1e-4, rtol=1e-4)
