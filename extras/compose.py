"""Detectors composed from parts chosen by name: an ImageNet backbone (BACKBONES), a neck (NECKS: none, fpn, pafpn),
anchors (anchors.py) and a head (HEADS: fasterrcnn, maskrcnn, retinanet, fcos).

    model = compose.compose("retinanet", num_classes=3, backbone="convnext_tiny", neck="pafpn")

train.py enters here for --model fasterrcnn/maskrcnn/retinanet/fcos (with --backbone, --neck); `load_matching` loads
a file into a composed model wherever keys and shapes match. Delete this file and those calls and train.py trains
torchvision's named models as before.
"""

from collections import OrderedDict

import torch
import torchvision
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import models
from extras.anchors import anchor_generator

# The blocks of each ImageNet classifier that end its stride 4, 8, 16, 32 stages (maps C2..C5: C_l is 2^l px per
# cell), and their channels. ResNets name their stages; the others count the blocks of their `features` Sequential.
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
STAGES = {
    "resnet18": (RESNET_STAGES, (64, 128, 256, 512)),
    "resnet34": (RESNET_STAGES, (64, 128, 256, 512)),
    "resnet50": (RESNET_STAGES, (256, 512, 1024, 2048)),
    "resnet101": (RESNET_STAGES, (256, 512, 1024, 2048)),
    "resnext50_32x4d": (RESNET_STAGES, (256, 512, 1024, 2048)),
    "mobilenet_v2": (("3", "6", "13", "18"), (24, 32, 96, 1280)),
    "mobilenet_v3_large": (("3", "6", "12", "16"), (24, 40, 112, 960)),
    "efficientnet_b0": (("2", "3", "5", "8"), (24, 40, 112, 1280)),
    "efficientnet_b1": (("2", "3", "5", "8"), (24, 40, 112, 1280)),
    "efficientnet_b2": (("2", "3", "5", "8"), (24, 48, 120, 1408)),
    "efficientnet_b3": (("2", "3", "5", "8"), (32, 48, 136, 1536)),
    "convnext_tiny": (("1", "3", "5", "7"), (96, 192, 384, 768)),
}


def _choose(kind, name, choices):
    if name not in choices:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")
    return choices[name]


def resnet(arch, weights=None, pretrained=False):
    """A torchvision ResNet / ResNeXt; its stages are its children (the classifier is never reached)."""
    # Batches of 2 images are too small to estimate BatchNorm statistics: keep ImageNet's frozen when we have them.
    return torchvision.models.get_model(arch, weights=weights, norm_layer=FrozenBatchNorm2d if pretrained else None)


def features(arch, weights=None, pretrained=False):
    """The `features` Sequential of a MobileNet, EfficientNet or ConvNeXt (its classifier dropped)."""
    # ConvNeXt's LayerNorm has no batch statistics: it keeps its own norm either way
    norm = {} if arch.startswith("convnext") else {"norm_layer": FrozenBatchNorm2d if pretrained else None}
    return torchvision.models.get_model(arch, weights=weights, **norm).features


# --backbone name -> builder(arch, weights enum or None, pretrained) of a module whose children run in order
BACKBONES = {arch: resnet if arch.startswith(("resnet", "resnext")) else features for arch in STAGES}


def _freeze_early_stages(net, stage_ends, trainable_layers):
    """Train only the last `trainable_layers` of (stem, C2, C3, C4, C5); 5 trains all. A few images are better
    fitted by the top stages alone: ImageNet's early filters (edges, textures) already suit most data."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be 0 to 5, not {trainable_layers}")
    if trainable_layers == 5:
        return
    stem = next(iter(net.named_children()))[0]  # conv1 of a ResNet, block "0" of the others
    last_frozen = stem if trainable_layers == 4 else stage_ends[3 - trainable_layers]
    for name, child in net.named_children():
        child.requires_grad_(False)
        if name == last_frozen:
            break


class Stages(torch.nn.ModuleDict):
    """The children of a classifier up to the last stage wanted, run in order: images -> OrderedDict "0", "1", ... of
    the outputs of `return_layers` (child name -> output name). Children keep their names, as in torchvision's
    BackboneWithFPN body, so torchvision's state dicts load."""

    def __init__(self, net, return_layers):
        children = {}
        for name, child in net.named_children():
            children[name] = child
            if name == list(return_layers)[-1]:
                break
        super().__init__(children)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        maps = OrderedDict()
        for name, child in self.items():
            x = child(x)
            if name in self.return_layers:
                maps[self.return_layers[name]] = x
        return maps


def backbone_body(arch, levels=(2, 3, 4, 5), weights=None, pretrained=False, trainable_layers=None):
    """ImageNet classifier `arch` -> (module: images [B, 3, H, W] -> OrderedDict "0", "1", ... of its C`levels` maps,
    their channels). trainable_layers: how many of stem, C2..C5 train (default 3 when pretrained, else all 5)."""
    net = _choose("backbone", arch, BACKBONES)(arch, weights, pretrained)
    stage_ends, channels = STAGES[arch]
    _freeze_early_stages(net, stage_ends, (3 if pretrained else 5) if trainable_layers is None else trainable_layers)
    body = Stages(net, {stage_ends[level - 2]: str(i) for i, level in enumerate(levels)})
    return body, [channels[level - 2] for level in levels]


def _pyramid_strides(strides):
    """Map name -> stride (px) of an FPN's outputs: one per input map, plus "pool" (max-pooled by 2 from the last)."""
    return {**{str(i): stride for i, stride in enumerate(strides)}, "pool": 2 * strides[-1]}


def no_neck(channels, strides):
    """The last map only (C5, stride 32), as the tutorial's MobileNetV2 model: cheapest, weakest on small objects."""
    neck = torch.nn.Identity()
    neck.out_channels, neck.strides = channels[-1], {"0": strides[-1]}
    return neck


def fpn(channels, strides):
    """torchvision's FPN: every map to 256 channels, coarse semantics added top-down, plus a max-pooled level."""
    neck = FeaturePyramidNetwork(channels, 256, extra_blocks=LastLevelMaxPool())
    neck.out_channels, neck.strides = 256, _pyramid_strides(strides)
    return neck


class PAFPN(FeaturePyramidNetwork):
    """FPN plus PANet's bottom-up path (Liu et al., 2018), a short way up for the fine maps' precise localization:
    N_lowest = P_lowest, N_i+1 = conv3x3(P_i+1 + conv3x3_stride2(N_i)), then max-pooled "pool" level as FPN's.
    The top-down part keeps FeaturePyramidNetwork's parameter names, so FPN weights (torchvision's COCO) load."""

    def __init__(self, channels, strides, out_channels=256):
        super().__init__(channels, out_channels)  # P maps, no extra level: "pool" comes after the N path
        conv = lambda stride: torch.nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1)  # noqa: E731
        self.downsample = torch.nn.ModuleList(conv(2) for _ in channels[1:])
        self.fuse = torch.nn.ModuleList(conv(1) for _ in channels[1:])
        for layer in [*self.downsample, *self.fuse]:  # as FPN initializes its own convolutions
            torch.nn.init.kaiming_uniform_(layer.weight, a=1)
            torch.nn.init.zeros_(layer.bias)
        self.out_channels, self.strides = out_channels, _pyramid_strides(strides)

    def forward(self, maps):
        p = list(super().forward(maps).values())  # [B, 256, H / stride, W / stride], finest first
        n = [p[0]]
        for downsample, fuse, p_next in zip(self.downsample, self.fuse, p[1:]):
            n.append(fuse(p_next + downsample(n[-1])))  # the stride-2 conv brings N_i to P_i+1's size
        n.append(torch.nn.functional.max_pool2d(n[-1], kernel_size=1, stride=2))  # "pool": for the largest anchors
        return OrderedDict(zip(self.strides, n))


# --neck name -> builder(channels of the backbone's maps, their strides in px) of a module with out_channels, strides
NECKS = {"none": no_neck, "fpn": fpn, "pafpn": PAFPN}


class BackboneWithNeck(torch.nn.Module):
    """What torchvision's detectors take as `backbone`: images [B, 3, H, W] -> OrderedDict name -> map
    [B, out_channels, H / stride, W / stride], with `strides` (name -> px) and `out_channels`."""

    def __init__(self, body, neck):
        super().__init__()
        self.body, self.fpn = body, neck  # named as in torchvision's BackboneWithFPN, so its state dicts load here
        self.out_channels, self.strides = neck.out_channels, neck.strides

    def forward(self, images):
        return self.fpn(self.body(images))


def roi_pooler(backbone, output_size):
    # The RPN proposes on every map; RoIs are pooled from the neck's maps but not from "pool" (an extra level for the
    # RPN's largest anchors), as torchvision does. MultiScaleRoIAlign picks each RoI's map by its size.
    names = [name for name in backbone.strides if name != "pool"]
    return MultiScaleRoIAlign(featmap_names=names, output_size=output_size, sampling_ratio=2)


def fasterrcnn(backbone, num_classes, anchor_sizes=None, anchor_ratios=None, **kwargs):
    anchors = anchor_generator(len(backbone.strides), anchor_sizes, anchor_ratios)
    pool = roi_pooler(backbone, 7)  # [K, 256, 7, 7] per RoI, for the box head
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, box_roi_pool=pool, **kwargs)


def maskrcnn(backbone, num_classes, anchor_sizes=None, anchor_ratios=None, **kwargs):
    anchors = anchor_generator(len(backbone.strides), anchor_sizes, anchor_ratios)
    # masks are predicted on 28 x 28 from 14 x 14 RoI features, boxes classified from 7 x 7
    pools = dict(box_roi_pool=roi_pooler(backbone, 7), mask_roi_pool=roi_pooler(backbone, 14))
    return MaskRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **pools, **kwargs)


def _dense_options(kwargs):
    """train.py passes the R-CNN name box_score_thresh; RetinaNet and FCOS call it score_thresh."""
    return {("score_thresh" if key == "box_score_thresh" else key): value for key, value in kwargs.items()}


def retinanet(backbone, num_classes, anchor_sizes=None, anchor_ratios=None, **kwargs):
    # Default: 3 sizes a third of an octave apart (x1, x2^1/3, x2^2/3) x 3 ratios = 9 anchors per location (torchvision)
    scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    anchors = anchor_generator(len(backbone.strides), anchor_sizes, anchor_ratios, scales)
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, **_dense_options(kwargs))


def fcos(backbone, num_classes, anchor_sizes=None, anchor_ratios=None, **kwargs):
    if anchor_sizes or anchor_ratios:
        raise ValueError("FCOS is anchor-free: anchor_sizes / anchor_ratios are for fasterrcnn, maskrcnn, retinanet")
    # One square "anchor" per location, as wide as its map's stride: FCOS uses it as the point and the scale of the
    # box regression (left, top, right, bottom distances in strides)
    sizes = tuple((stride,) for stride in backbone.strides.values())
    anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
    return FCOS(backbone, num_classes, anchor_generator=anchors, **_dense_options(kwargs))


# --model name -> builder(backbone with neck, num_classes, anchor_sizes, anchor_ratios, **kwargs) of a detector.
# RetinaNet and FCOS have no roi_heads (no box_predictor): their classes are in model.head.classification_head.
HEADS = {"fasterrcnn": fasterrcnn, "maskrcnn": maskrcnn, "retinanet": retinanet, "fcos": fcos}


def compose(
    head,
    num_classes,
    backbone="resnet50",
    neck="fpn",
    weights_backbone=None,
    pretrained=None,
    trainable_layers=None,
    **kwargs,
):
    """A detector from parts chosen by name, e.g. compose("retinanet", 3, "convnext_tiny", "pafpn").

    weights_backbone: an ImageNet weights enum or None; pretrained (default: whether weights_backbone is given)
    means frozen BatchNorm and early stages frozen (trainable_layers, 0-5). kwargs go to the head: anchor_sizes,
    anchor_ratios, min_size, max_size, ...
    """
    build_head, build_neck = _choose("head", head, HEADS), _choose("neck", neck, NECKS)
    # R-CNN heads pool RoIs from C2 up (stride 4), as torchvision's; dense heads predict at every location of every
    # map, so they start at C3 (stride 8) as torchvision's RetinaNet and FCOS do. Without a neck, C5 only.
    levels = (5,) if neck == "none" else (3, 4, 5) if head in ("retinanet", "fcos") else (2, 3, 4, 5)
    pretrained = weights_backbone is not None if pretrained is None else pretrained
    body, channels = backbone_body(backbone, levels, weights_backbone, pretrained, trainable_layers)
    strides = [2**level for level in levels]  # px per cell of C2 .. C5
    return build_head(BackboneWithNeck(body, build_neck(channels, strides)), num_classes, **kwargs)


def build(name, num_classes, backbone="resnet50", neck="fpn", pretrained=False, trainable_backbone_layers=None,
          weights_backbone=None, **kwargs):  # fmt: skip
    """compose() with models.build's arguments; `model.model_args` rebuilds it: build(**model.model_args)."""
    model = compose(name, num_classes, backbone, neck, weights_backbone, pretrained or weights_backbone is not None,
                    trainable_backbone_layers, **kwargs)  # fmt: skip
    model.model_args = dict(name=name, num_classes=num_classes, backbone=backbone, neck=neck, **kwargs)
    model.model_args.update(
        pretrained=pretrained or weights_backbone is not None, trainable_backbone_layers=trainable_backbone_layers
    )
    return model


def get_model(name, num_classes, weights="DEFAULT", weights_backbone=None, trainable_backbone_layers=None,
              backbone=None, neck=None, **kwargs):  # fmt: skip
    """models.get_model for composed detectors: "DEFAULT" weights mean the backbone's ImageNet ones (there are no
    COCO weights for them), "none" random ones; a .pth is loaded wherever keys and shapes match."""
    backbone, neck = backbone or "resnet50", neck or "fpn"
    _choose("backbone", backbone, BACKBONES)
    if str(weights).lower() == "default":
        weights, weights_backbone = None, weights_backbone or "DEFAULT"
    weights = models.resolve_weights(name, weights)
    state = models.load_state_dict_file(weights) if weights is not None else {}
    # a file without BatchNorm counters was trained from pretrained weights (frozen BatchNorm): rebuild it so
    parts = dict(backbone=backbone, neck=neck, weights_backbone=models.backbone_weights(backbone, weights_backbone))
    parts.update(
        pretrained=bool(state) and models.pretrained_layout(state), trainable_backbone_layers=trainable_backbone_layers
    )
    model = build(name, num_classes, **parts, **kwargs)
    return load_matching(model, state, weights) if state else model


def load_matching(model, state, source):
    """Load every tensor of `state` whose key and shape match `model`'s (the rest stays fresh); print which parts."""
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(matched, strict=False)
    parts = {}  # "backbone.body", "backbone.fpn", "rpn.head", "roi_heads.box_predictor", ... -> [loaded, all] tensors
    for key in own:
        counts = parts.setdefault(".".join(key.split(".")[:2]), [0, 0])
        counts[0], counts[1] = counts[0] + (key in matched), counts[1] + 1
    loaded = [part + ("" if n == total else f" ({n}/{total} tensors)") for part, (n, total) in parts.items() if n]
    fresh = [part for part, (n, _) in parts.items() if not n]
    print(f"{source}: loaded {', '.join(loaded) or 'nothing'}; fresh: {', '.join(fresh) or 'nothing'}")
    return model
