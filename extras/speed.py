"""The speed path: the same model, computing the same detections in fp32, faster on CPU and GPU.

    speed.fast_path(model, channels_last=True, fold_bn=True, fast_roi_align=True)

- channels_last: NHWC feature maps, the layout oneDNN (CPU) and cuDNN tensor cores run convolutions in.
- fold_bn: each frozen BatchNorm folded into the convolution before it (fine-tuned models have 50+).
- fast_roi_align: an R-CNN's RoI poolers computed by multi-threaded torch ops (fast_roi_align.py), for CPUs:
  torchvision's CPU kernel runs on one thread and took 25-40% of a training step.
- always: the RoI heads see a few RoI counts (padded with zeros), so that oneDNN's per-shape kernel cache stays
  small, and masks are pasted into the image only inside their boxes (`PasteInBoxes`).
train.py and predict.py call fast_path once; delete this file (and fast_roi_align.py) and that call, and the models
run as torchvision ships them.
"""

import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from extras.fast_roi_align import use_fast_roi_align


class ConvFrozenBN(torch.nn.Conv2d):
    """A Conv2d that also applies the FrozenBatchNorm2d after it, as one convolution.

    Frozen BatchNorm is y = x * s + t per channel (s = gamma / sqrt(var + eps), t = beta - mean * s), so
    conv(x, w, b) * s + t = conv(x, w * s, b * s + t): one pass over the feature map instead of two. The folded
    weight is computed at every call from the unchanged `weight` parameter, so a trainable conv learns exactly as
    before, and the state dict keeps the same keys and values (checkpoints load into unfolded models).
    """

    @classmethod
    def fold(cls, conv, bn):
        """A ConvFrozenBN holding `conv`'s own parameters (the optimizer, DDP and the state dict see no change)."""
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # fmt: skip
        folded.weight, folded.bias = conv.weight, conv.bias
        folded.train(conv.training)
        folded.__dict__["frozen_bn"] = bn  # kept out of _modules so it is not a second copy in the state dict
        return folded

    def forward(self, x):
        bn = self.__dict__["frozen_bn"]
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # [C_out]
        shift = bn.bias - bn.running_mean * scale
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(x, self.weight * scale.reshape(-1, 1, 1, 1), bias)


class FoldedFrozenBN(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose work its ConvFrozenBN does: the identity, with its buffers still in the state dict."""

    @classmethod
    def of(cls, bn):
        folded = cls(bn.weight.shape[0], eps=bn.eps)
        for name, buffer in bn.named_buffers():
            setattr(folded, name, buffer)  # the same tensors
        return folded

    def forward(self, x):
        return x


def fold_frozen_batchnorm(model):
    """Fold every FrozenBatchNorm2d into the Conv2d just before it (both replaced in their parent module); returns
    the number folded.

    "Just before" is registration order, which in torchvision's ResNet, MobileNet and EfficientNet blocks is
    also the order of the forward pass (conv1, bn1, ...; Sequential(conv, bn, act)). Trained BatchNorm2d layers
    are left alone: their statistics change while training.
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if type(conv) is torch.nn.Conv2d and type(bn) is FrozenBatchNorm2d:
                bn = FoldedFrozenBN.of(bn)
                setattr(parent, conv_name, ConvFrozenBN.fold(conv, bn))
                setattr(parent, bn_name, bn)
                folded += 1
    return folded


def _pad_rows(head, predictor, multiple):
    """Pad the RoIs going into `head` with zeros to a multiple of `multiple`; drop them again after `predictor`.

    oneDNN (bf16 matrix products and convolutions on CPU) compiles and caches a kernel for every input shape, and
    the number of RoIs changes from step to step and image to image: a box head's fc6 cached ~5 MB per RoI count, up
    to 1,024 of them (5 GB) in a long run. With padding there are a few shapes. Zero rows add nothing to the weight
    gradients. Heads with BatchNorm are left alone (zero rows would change their batch statistics).
    """
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in head.modules()):
        return
    rows = []  # the true count, from the head's call to its predictor's

    def pad(module, args):
        x = args[0]
        rows.append(x.shape[0])
        padding = -x.shape[0] % multiple
        return (torch.cat([x, x.new_zeros((padding, *x.shape[1:]))]), *args[1:]) if padding else None

    def unpad(module, args, output):
        n = rows.pop()
        return tuple(o[:n] for o in output) if isinstance(output, tuple) else output[:n]

    head.register_forward_pre_hook(pad)
    predictor.register_forward_hook(unpad)


def paste_masks(masks, boxes, image_size, padding=1):
    """The model's masks pasted into the image and cut at 0.5: bool [N, 1, H, W], computed only inside each box.

    The same numbers as torchvision's paste_masks_in_image followed by `> 0.5` (same box expansion, same bilinear
    resize), without its full-image float mask per detection: with 100 detections per image those writes were most of
    the evaluation time. The result is a transposed view of an [N, W, H] array: each mask column-major, the order
    pycocotools' RLE encoder reads, so encoding needs no copy either.
    masks: probabilities [N, 1, M, M] (M = 28); boxes: float [N, 4] XYXY in the image's pixels.
    """
    n, _, m, _ = masks.shape
    height, width = image_size
    # one pixel of zero padding around each mask, and the box grown to match, as torchvision does
    padded = F.pad(masks, (padding,) * 4)
    centre, half = (boxes[:, :2] + boxes[:, 2:]) * 0.5, (boxes[:, 2:] - boxes[:, :2]) * 0.5 * ((m + 2 * padding) / m)
    pasted = torch.zeros(n, width, height, dtype=torch.bool, device=masks.device)
    for k, (x0, y0, x1, y1) in enumerate(torch.cat([centre - half, centre + half], 1).to(torch.int64).tolist()):
        size = (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))  # box pixels, both ends included
        inside = F.interpolate(padded[k : k + 1], size=size, mode="bilinear", align_corners=False)[0, 0] > 0.5
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)  # clipped to the image
        if cx1 > cx0 and cy1 > cy0:
            pasted[k, cx0:cx1, cy0:cy1] = inside[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].T
    return pasted.transpose(1, 2)[:, None]


class PasteInBoxes(GeneralizedRCNNTransform):
    """An R-CNN's transform (`model.transform = PasteInBoxes(model.transform)`) whose postprocess pastes masks with
    `paste_masks`: bool masks [N, 1, H, W], cut at 0.5, instead of probabilities (TTA then averages votes).
    In training it resizes as the transform it replaces (MultiScaleResize's random sizes); in evaluation at its
    min_size / max_size, which TTA sets."""

    def __init__(self, transform):
        sizes = dict(size_divisible=transform.size_divisible, fixed_size=transform.fixed_size)
        super().__init__(transform.min_size, transform.max_size, transform.image_mean, transform.image_std, **sizes)
        self.replaced = transform

    def resize(self, image, target=None):
        return self.replaced.resize(image, target) if self.training else super().resize(image, target)

    def postprocess(self, result, image_shapes, original_image_sizes):
        masks = [output.pop("masks", None) for output in result]  # probabilities [N, 1, 28, 28] per image
        result = super().postprocess(result, image_shapes, original_image_sizes)  # boxes in the image's pixels
        for output, mask, size in zip(result, masks, original_image_sizes):
            if mask is not None:
                output["masks"] = paste_masks(mask, output["boxes"], size)
        return result


def _contiguous(module, inputs, output):
    return output.contiguous()  # NCHW again, as the code after the predictor expects; a copy only for NHWC outputs


def fast_path(model, channels_last=True, fold_bn=True, fast_roi_align=False):
    """Make `model` (on its device) fast without changing what it computes in fp32; see the module docstring."""
    if fold_bn:
        fold_frozen_batchnorm(model)
    roi_heads = getattr(model, "roi_heads", None)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if getattr(roi_heads, "keypoint_predictor", None) is not None:  # torchvision's keypoint loss .view()s them
            roi_heads.keypoint_predictor.register_forward_hook(_contiguous)
    if fast_roi_align and roi_heads is not None:
        use_fast_roi_align(model)
    if roi_heads is not None and roi_heads.has_mask() and isinstance(model.transform, GeneralizedRCNNTransform):
        model.transform = PasteInBoxes(model.transform)
    for name, multiple in (("box", 64), ("mask", 16), ("keypoint", 16)):
        if getattr(roi_heads, f"{name}_head", None) is not None:
            _pad_rows(getattr(roi_heads, f"{name}_head"), getattr(roi_heads, f"{name}_predictor"), multiple)
    return model
