"""Mixed precision (--amp): box arithmetic kept in fp32 under bf16 / fp16 autocast.

Autocast runs convolutions and matrix products in 16 bits, which is what makes it fast; torchvision's R-CNNs then
also decode boxes, match anchors and compute the box losses in the heads' 16-bit outputs. `float32_boxes` hands those
steps fp32 inputs; models.prepare_model applies it when --amp is on.
"""

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast is ~2x faster than fp32;
    elsewhere it is emulated and can be slower. Read from /proc/cpuinfo, so False outside Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def note_native_bf16():
    if cpu_has_native_bf16():
        print("This CPU computes bf16 natively: --amp trains up to ~3x faster, at some cost in AP (README, Speed)")


class Float32Anchors(AnchorGenerator):
    """torchvision's AnchorGenerator, making anchors in float32 whatever the feature maps' dtype. Under bf16 autocast
    torchvision's takes the maps' bf16, whose 8-bit mantissa cannot tell x = 1024 from 1028: beyond 1024 px only 41
    of 80 stride-4 anchor centres stay distinct (and its cell anchors stay rounded for later fp32 calls too)."""

    def forward(self, image_list, feature_maps):
        # the maps are read for their size, dtype and device only: empty float32 stand-ins carry all three
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in feature_maps]
        return super().forward(image_list, shapes)


def _float32_outputs(module, inputs, output):
    if isinstance(output, torch.Tensor):
        return output.float().contiguous()  # contiguous: torchvision's losses .view() them (keypoints)
    if isinstance(output, (tuple, list)):
        return type(output)(_float32_outputs(module, inputs, o) for o in output)
    if isinstance(output, dict):  # RetinaNet / FCOS heads
        return {k: _float32_outputs(module, inputs, v) for k, v in output.items()}
    return output


def float32_boxes(model):
    """Keep box arithmetic in fp32 under bf16/fp16 autocast: anchors (Float32Anchors) and the heads' outputs (a
    forward hook), so box decoding, anchor matching and the losses run in fp32 (bf16 has 8 bits of mantissa: at
    x = 1000 px a box edge moves in steps of 4-8 px). No weight changes; in fp32 nothing changes."""
    holder = model.rpn if hasattr(model, "rpn") else model  # RetinaNet / FCOS hold their own
    old = getattr(holder, "anchor_generator", None)
    if type(old) is AnchorGenerator:
        holder.anchor_generator = Float32Anchors(old.sizes, old.aspect_ratios)
    heads = [getattr(model, "rpn", None) and model.rpn.head, getattr(model, "head", None)]  # RPN; RetinaNet/FCOS
    roi_heads = getattr(model, "roi_heads", None)
    heads += [getattr(roi_heads, name, None) for name in ("box_predictor", "mask_predictor", "keypoint_predictor")]
    for head in filter(None, heads):
        head.register_forward_hook(_float32_outputs)
    return model
