"""Anchors (--anchor-sizes, --anchor-ratios): the boxes the RPN (or RetinaNet / FCOS) scores at every location of
every feature map, sized in pixels of the model's input. `anchor_generator` makes them for a model built from parts
(compose.py); `set_anchors` replaces those of a built R-CNN. references/anchor_helper.py proposes sizes from a dataset.
"""

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator


def anchor_generator(num_maps, sizes=None, ratios=None, scales=(1.0,)):
    """Anchors for `num_maps` feature maps, finest first. sizes (px): one tuple per map, or flat: one size per map (or
    all on the only map). ratios (h/w): one tuple per map, or flat for every map. Default: 32, 64, ... px, each x
    `scales`, one per map (all five 32-512 on a single map), ratios 0.5, 1, 2."""
    if not sizes:
        single = num_maps == 1  # one map has to hold every object size
        sizes = [(32, 64, 128, 256, 512)] if single else [[int(32 * 2**i * s) for s in scales] for i in range(num_maps)]
    if not isinstance(sizes[0], (tuple, list)):
        sizes = [sizes] if num_maps == 1 else [[size] for size in sizes]
    ratios = ratios or (0.5, 1.0, 2.0)
    ratios = [ratios] * num_maps if not isinstance(ratios[0], (tuple, list)) else ratios
    if not len(sizes) == len(ratios) == num_maps:
        raise ValueError(
            f"{len(sizes)} groups of anchor sizes and {len(ratios)} of ratios for {num_maps} feature maps: give one "
            f"per map (finest first), e.g. anchor_sizes={tuple((32 * 2**i,) for i in range(num_maps))}"
        )
    if len({len(s) * len(r) for s, r in zip(sizes, ratios)}) > 1:  # the head's convolution is shared by every map
        raise ValueError(f"every map needs as many anchors (sizes x ratios): {sizes} x {ratios}")
    return AnchorGenerator(tuple(map(tuple, sizes)), tuple(map(tuple, ratios)))


def set_anchors(model, sizes=None, ratios=None):
    """New anchors for a built R-CNN's RPN (see anchor_generator); None keeps the current sizes / ratios."""
    if sizes is None and ratios is None:
        return model
    old, head = model.rpn.anchor_generator, model.rpn.head
    if sizes is not None and not isinstance(sizes[0], (tuple, list)) and any(len(s) > 1 for s in old.sizes):
        sizes = [tuple(sizes)] * len(old.sizes)  # several sizes on every map (the mobilenet FPNs): keep that layout
    model.rpn.anchor_generator = anchor_generator(len(old.sizes), sizes or old.sizes, ratios or old.aspect_ratios)
    count = model.rpn.anchor_generator.num_anchors_per_location()[0]
    if count != head.cls_logits.out_channels:
        # The RPN head's per-anchor outputs are then fresh (random): only its shared 3x3 conv keeps trained weights
        head.cls_logits = torch.nn.Conv2d(head.cls_logits.in_channels, count, 1)  # objectness logit per anchor
        head.bbox_pred = torch.nn.Conv2d(head.bbox_pred.in_channels, 4 * count, 1)  # dx, dy, dw, dh per anchor
        for layer in (head.cls_logits, head.bbox_pred):  # as torchvision's RPNHead
            torch.nn.init.normal_(layer.weight, std=0.01)
            torch.nn.init.zeros_(layer.bias)
    return model
