"""Detection models: torchvision's Faster / Mask R-CNN with their heads resized for your classes.

The fine-tuning recipe of the torchvision tutorial, as one function (`get_model`): build the model with its COCO
weights (91 classes), then replace the box predictor (and the mask predictor) by fresh ones for `num_classes`.
`num_classes` counts the background: a dataset with K classes needs num_classes = K + 1.
Other detectors are composed from parts chosen by name (`compose`): an ImageNet backbone (BACKBONES), a neck (NECKS:
none, fpn, pafpn), anchors (`anchor_generator`) and a head (HEADS: fasterrcnn, maskrcnn, retinanet, fcos).
"""

import os
from collections import OrderedDict
from contextlib import contextmanager
from unittest import mock
from urllib.parse import urlparse

import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fast_roi_align import use_fast_roi_align
from transforms import COCO_KEYPOINT_FLIP
from utils import SetupError

# --model names served by torchvision's builders (with COCO weights under weights="DEFAULT")
TORCHVISION_MODELS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "keypointrcnn_resnet50_fpn",  # person keypoints (17, COCO's): train on a person_keypoints json
)
# Predictor tensors whose first dimension is (a multiple of) the number of classes
HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
# RPN tensors whose first dimension is (4 x) the number of anchors per location
RPN_PREDICTORS = ("rpn.head.cls_logits.", "rpn.head.bbox_pred.")


def fasterrcnn_mobilenet_v2(num_classes, weights_backbone=None, **kwargs):
    """The tutorial's custom model: MobileNetV2 features (one map, 1280 channels, stride 32) + Faster R-CNN heads."""
    pretrained = weights_backbone is not None
    # Batches of 2 images are too small to estimate BatchNorm statistics: keep ImageNet's frozen when we have them.
    norm_layer = FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d
    backbone = torchvision.models.mobilenet_v2(weights=weights_backbone, norm_layer=norm_layer).features
    backbone.out_channels = 1280  # FasterRCNN reads this to size the RPN and box heads
    # One feature map, so one tuple of 5 sizes (pixels) x 3 aspect ratios (h/w) = 15 anchors per location
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    roi_pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pooler, **kwargs)


# ---------------------------------------------------------------------------- detectors composed from parts by name
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


def backbone_body(arch, levels=(2, 3, 4, 5), weights=None, pretrained=False, trainable_layers=None):
    """ImageNet classifier `arch` -> (module: images [B, 3, H, W] -> OrderedDict "0", "1", ... of its C`levels` maps,
    their channels). trainable_layers: how many of stem, C2..C5 train (default 3 when pretrained, else all 5)."""
    net = _choose("backbone", arch, BACKBONES)(arch, weights, pretrained)
    stage_ends, channels = STAGES[arch]
    _freeze_early_stages(net, stage_ends, (3 if pretrained else 5) if trainable_layers is None else trainable_layers)
    body = IntermediateLayerGetter(net, {stage_ends[level - 2]: str(i) for i, level in enumerate(levels)})
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


# --model name -> builder(num_classes, weights_backbone, **kwargs) for models composed here
CUSTOM_MODELS = {"fasterrcnn_mobilenet_v2": fasterrcnn_mobilenet_v2}
MODELS = TORCHVISION_MODELS + tuple(CUSTOM_MODELS) + tuple(HEADS)


def replace_predictors(model, num_classes):
    """The fine-tuning step: new box (and mask) classifiers for `num_classes`, keeping every other weight."""
    box_features = model.roi_heads.box_predictor.cls_score.in_features  # 1024 for the R-CNN box heads
    model.roi_heads.box_predictor = FastRCNNPredictor(box_features, num_classes)
    if getattr(model.roi_heads, "mask_predictor", None) is not None:
        mask_features = model.roi_heads.mask_predictor.conv5_mask.in_channels  # 256
        model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_features, 256, num_classes)
    return model


def fetch_weights(weights):
    """Put a torchvision weights file in the torch hub cache (downloading it once); clear message when offline."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, path, progress=True)
        except OSError as e:
            raise SetupError(
                f"could not download the {weights} weights from {weights.url} ({e}).\n"
                f"  Pass --weights none to train from random weights, or --weights FILE.pth with a copy of that "
                f"file (or put it at {path})."
            ) from e
    return path


def resolve_weights(model_name, weights):
    """'DEFAULT' / 'COCO_V1' / a full enum name -> that enum (file fetched); 'none' -> None; else a local file."""
    if weights is None or str(weights).lower() == "none":
        return None
    if os.path.splitext(str(weights))[1] in (".pth", ".pt") or os.path.exists(str(weights)):
        if not os.path.isfile(weights):
            raise SetupError(f"weights file {weights} does not exist; pass an existing .pth file or --weights none")
        return str(weights)
    try:
        if "." in str(weights):
            enum = torchvision.models.get_weight(weights)
        else:
            enum = torchvision.models.get_model_weights(model_name)[weights]
    except (KeyError, ValueError) as e:
        valid = ", ".join(["DEFAULT", *torchvision.models.get_model_weights(model_name).__members__, "none", "FILE"])
        raise SetupError(f"unknown weights {weights!r} for {model_name}; choose one of: {valid}") from e
    fetch_weights(enum)
    return enum


def _load_state_dict_file(path):
    """A torchvision state dict, or this project's checkpoint (its "model" entry). Only tensors are unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SetupError(f"cannot load weights from {path}: {e}") from e
    return state["model"] if "model" in state else state


def _trained_from_scratch(state):
    """Whether the backbone has BatchNorm counters: plain BatchNorm, not the frozen kind of a pretrained start."""
    return any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)


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


@contextmanager
def _torchvision_weights_from(state_dict):
    # torchvision builders fetch pretrained weights through this one function: answering it with a local state
    # dict builds the model exactly as with downloaded COCO weights (frozen BatchNorm, same trainable layers).
    with mock.patch("torchvision.models._api.load_state_dict_from_url", lambda *args, **kwargs: state_dict):
        yield


def _coco_shaped(state, num_coco_classes=91, rpn_anchors=None):
    """`state` with zero predictor tensors of the COCO class count, so the builder's strict load accepts it; with
    `rpn_anchors` (the builder's anchors per location), zero RPN predictors of that count too (set_anchors follows)."""
    classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    anchors = state["rpn.head.cls_logits.weight"].shape[0]
    coco = dict(state)
    for key, value in state.items():
        if key.startswith(HEAD_PREFIXES):
            per_class = value.shape[0] // classes  # 4 for box regression, 1 otherwise
            coco[key] = value.new_zeros((num_coco_classes * per_class, *value.shape[1:]))
        if rpn_anchors is not None and key.startswith(RPN_PREDICTORS):
            per_anchor = value.shape[0] // anchors  # 4 for box regression, 1 for objectness
            coco[key] = value.new_zeros((rpn_anchors * per_anchor, *value.shape[1:]))
    return coco


def _with_model_rpn(state, model, source):
    """`state`, with `model`'s fresh RPN predictors instead of its own if it was trained with other anchors."""
    ours, theirs = model.rpn.head.cls_logits.out_channels, state["rpn.head.cls_logits.weight"].shape[0]
    if ours == theirs:
        return state
    print(f"{source} has {theirs} anchors per location, the model {ours}: its RPN predictors start fresh")
    return {**state, **{k: v for k, v in model.state_dict().items() if k.startswith(RPN_PREDICTORS)}}


def _builder_rpn_anchors(name):
    """Anchors per location of torchvision's `name` as built (3; 15 for the MobileNet ones), read off a model built
    on the meta device (shapes only: no memory, no initialization)."""
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None, weights_backbone=None).rpn.head.cls_logits.out_channels


def get_model(name, num_classes, *args, **options):
    """Build `name` for `num_classes` (your classes + background).

    weights: "DEFAULT" or a weights enum name (COCO weights, downloaded once), "none" (random init, with the
    backbone's ImageNet weights if `weights_backbone` names them), or a local .pth: a torchvision state dict or a
    checkpoint of this project, of any class count (mismatched predictors are replaced). kwargs go to the model
    (min_size, max_size, box_score_thresh, ...).
    Composed names (HEADS: fasterrcnn, maskrcnn, retinanet, fcos) take `backbone` (BACKBONES, default resnet50) and
    `neck` (NECKS, default fpn); "DEFAULT" weights then mean the backbone's ImageNet ones, and a .pth is loaded
    wherever keys and shapes match. anchor_sizes / anchor_ratios (see anchor_generator) also fit the named R-CNNs.
    To rebuild a composed checkpoint, pass the same backbone, neck, anchor_sizes and anchor_ratios.
    """
    return float32_anchors(_build_model(name, num_classes, *args, **options))


class Float32Anchors(AnchorGenerator):
    """torchvision's AnchorGenerator, making anchors in float32 whatever the feature maps' dtype. Under bf16 autocast
    torchvision's takes the maps' bf16, whose 8-bit mantissa cannot tell x = 1024 from 1028: beyond 1024 px only 41
    of 80 stride-4 anchor centres stay distinct (and its cell anchors stay rounded for later fp32 calls too)."""

    def forward(self, image_list, feature_maps):
        # the maps are read for their size, dtype and device only: empty float32 stand-ins carry all three
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in feature_maps]
        return super().forward(image_list, shapes)


def float32_anchors(model):
    """Swap the model's AnchorGenerator (the RPN's, or RetinaNet's / FCOS's) for Float32Anchors; no weights change."""
    holder = model.rpn if hasattr(model, "rpn") else model
    old = getattr(holder, "anchor_generator", None)
    if type(old) is AnchorGenerator:
        holder.anchor_generator = Float32Anchors(old.sizes, old.aspect_ratios)
    return model


def _build_model(
    name,
    num_classes,
    weights="DEFAULT",
    weights_backbone=None,
    trainable_backbone_layers=None,
    backbone=None,
    neck=None,
    anchor_sizes=None,
    anchor_ratios=None,
    **kwargs,
):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if name in HEADS:
        backbone, neck = backbone or "resnet50", neck or "fpn"
        _choose("backbone", backbone, BACKBONES)
    elif backbone is not None or neck is not None:
        raise ValueError(f"{name} has its own backbone and neck; to choose them use --model fasterrcnn or maskrcnn")
    if name not in TORCHVISION_MODELS and str(weights).lower() == "default":
        # composed models have no COCO weights: their best start is the backbone's ImageNet weights
        weights, weights_backbone = None, weights_backbone or "DEFAULT"
    weights = resolve_weights(name, weights) if name in TORCHVISION_MODELS else _custom_weights(weights)
    if weights_backbone is not None and str(weights_backbone).lower() != "none":
        backbone_weights = torchvision.models.get_weight(weights_backbone) if "." in weights_backbone else None
        if backbone_weights is None:  # "DEFAULT" or a member name of the backbone's enum
            backbone_weights = _backbone_enum(backbone or name, weights_backbone)
        fetch_weights(backbone_weights)
    else:
        backbone_weights = None

    if name in HEADS:
        state = _load_state_dict_file(weights) if weights is not None else {}
        # a file without BatchNorm counters was trained from pretrained weights (frozen BatchNorm): rebuild it so
        pretrained = backbone_weights is not None or (bool(state) and not _trained_from_scratch(state))
        parts = dict(backbone=backbone, neck=neck, weights_backbone=backbone_weights, pretrained=pretrained)
        anchors = dict(anchor_sizes=anchor_sizes, anchor_ratios=anchor_ratios)
        model = compose(name, num_classes, **parts, trainable_layers=trainable_backbone_layers, **anchors, **kwargs)
        return load_matching(model, state, weights) if state else model
    if name in CUSTOM_MODELS:
        model = CUSTOM_MODELS[name](num_classes, weights_backbone=backbone_weights, **kwargs)
        set_anchors(model, anchor_sizes, anchor_ratios)
        if weights is not None:
            model.load_state_dict(_with_model_rpn(_load_state_dict_file(weights), model, weights))
        return model

    builder = torchvision.models.get_model_builder(name)
    common = dict(trainable_backbone_layers=trainable_backbone_layers, **kwargs)
    if weights is None:
        model = builder(weights=None, weights_backbone=backbone_weights, num_classes=num_classes, **common)
        return set_anchors(model, anchor_sizes, anchor_ratios)
    if not isinstance(weights, str):  # a torchvision enum: COCO weights, then new heads
        model = set_anchors(builder(weights=weights, **common), anchor_sizes, anchor_ratios)
        return replace_predictors(model, num_classes) if num_classes != len(weights.meta["categories"]) else model

    state = _load_state_dict_file(weights)
    if _trained_from_scratch(state):  # plain BatchNorm layout, no pretrained structure to reproduce
        file_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
        model = builder(weights=None, weights_backbone=None, num_classes=file_classes, **common)
        set_anchors(model, anchor_sizes, anchor_ratios)
    else:
        rpn_anchors = _builder_rpn_anchors(name) if anchor_sizes or anchor_ratios else None  # file's may differ
        with _torchvision_weights_from(_coco_shaped(state, rpn_anchors=rpn_anchors)):
            model = builder(weights="DEFAULT", **common)
        set_anchors(model, anchor_sizes, anchor_ratios)
        replace_predictors(model, state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    model.load_state_dict(_with_model_rpn(state, model, weights))
    file_classes = model.roi_heads.box_predictor.cls_score.out_features
    if file_classes != num_classes:
        skipped = ", ".join(sorted(k for k in state if k.startswith(HEAD_PREFIXES)))
        print(f"{weights} has {file_classes} classes, the model {num_classes}: new predictors replace {skipped}")
        replace_predictors(model, num_classes)
    return model


def _custom_weights(weights):
    if weights is None or str(weights).lower() == "none":
        return None
    if not os.path.isfile(weights):
        raise SetupError(f"weights file {weights} does not exist; pass an existing .pth file or --weights none")
    return weights


def _backbone_enum(model_name, member):
    """The ImageNet weights `member` of a BACKBONES name, or of the backbone of a named model."""
    backbone = {"mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3_large"}
    arch = model_name if model_name in BACKBONES else next((v for k, v in backbone.items() if k in model_name), None)
    enum = torchvision.models.get_model_weights(arch or "resnet50")
    if member not in enum.__members__:
        raise SetupError(f"unknown backbone weights {member!r}; choose one of: {', '.join(enum.__members__)}, none")
    return enum[member]


# -------------------------------------------------------------------------------------------------------- fast path
class ConvFrozenBN(torch.nn.Conv2d):
    """A Conv2d that also applies the FrozenBatchNorm2d after it, as one convolution.

    Frozen BatchNorm is y = x * s + t per channel (s = gamma / sqrt(var + eps), t = beta - mean * s), so
    conv(x, w, b) * s + t = conv(x, w * s, b * s + t): one pass over the feature map instead of two. The folded
    weight is computed at every call from the unchanged `weight` parameter, so a trainable conv learns exactly as
    before, and the state dict keeps the same keys and values (checkpoints load into unfolded models).
    """

    def forward(self, x):
        bn = self.__dict__["frozen_bn"]  # kept out of _modules so it is not a second copy in the state dict
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # [C_out]
        shift = bn.bias - bn.running_mean * scale
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(x, self.weight * scale.reshape(-1, 1, 1, 1), bias)


class FoldedFrozenBN(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose work its ConvFrozenBN does: the identity, with its buffers still in the state dict."""

    def forward(self, x):
        return x


def fold_frozen_batchnorm(model):
    """Fold every FrozenBatchNorm2d into the Conv2d just before it; returns the number folded.

    "Just before" is registration order, which in torchvision's ResNet, MobileNet and EfficientNet blocks is
    also the order of the forward pass (conv1, bn1, ...; Sequential(conv, bn, act)). Trained BatchNorm2d layers
    are left alone: their statistics change while training.
    """
    folded = 0
    for parent in model.modules():
        children = list(parent.children())
        for conv, bn in zip(children, children[1:]):
            if type(conv) is torch.nn.Conv2d and type(bn) is FrozenBatchNorm2d:
                conv.__class__, bn.__class__ = ConvFrozenBN, FoldedFrozenBN
                conv.__dict__["frozen_bn"] = bn
                folded += 1
    return folded


def _float32_outputs(module, inputs, output):
    if isinstance(output, torch.Tensor):
        return output.float().contiguous()  # contiguous: torchvision's losses .view() them (keypoints)
    if isinstance(output, (tuple, list)):
        return type(output)(_float32_outputs(module, inputs, o) for o in output)
    if isinstance(output, dict):  # RetinaNet / FCOS heads
        return {k: _float32_outputs(module, inputs, v) for k, v in output.items()}
    return output


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


def fast_path(model, channels_last=True, fold_bn=True, fast_roi_align=False):
    """Make `model` fast on its device without changing what it computes in fp32.

    channels_last: NHWC feature maps, the layout oneDNN (CPU) and cuDNN tensor cores run convolutions in.
    fold_bn: frozen BatchNorm folded into the convolutions (fine-tuned models from COCO/ImageNet weights have 50+).
    fast_roi_align: an R-CNN's RoI poolers computed by multi-threaded torch ops (fast_roi_align.py), for CPUs:
    torchvision's CPU kernel runs on one thread and took 25-40% of a training step.
    Always: the heads' outputs are cast to fp32, so that under bf16/fp16 autocast the box decoding, anchor matching
    and losses stay in fp32 (bf16 has 8 bits of mantissa: at x = 1000 px a box edge moves in steps of 4-8 px), and
    the RoI heads see a few RoI counts (padded with zeros) so that oneDNN's per-shape kernel cache stays small.
    """
    if fold_bn:
        fold_frozen_batchnorm(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if fast_roi_align and hasattr(model, "roi_heads"):
        use_fast_roi_align(model)
    heads = [getattr(model, "rpn", None) and model.rpn.head, getattr(model, "head", None)]  # RPN; RetinaNet/FCOS
    roi_heads = getattr(model, "roi_heads", None)
    heads += [getattr(roi_heads, name, None) for name in ("box_predictor", "mask_predictor", "keypoint_predictor")]
    for head in filter(None, heads):
        head.register_forward_hook(_float32_outputs)
    for name, multiple in (("box", 64), ("mask", 16), ("keypoint", 16)):
        if getattr(roi_heads, f"{name}_head", None) is not None:
            _pad_rows(getattr(roi_heads, f"{name}_head"), getattr(roi_heads, f"{name}_predictor"), multiple)
    return model


# ----------------------------------------------------------------------------------------------- test-time augmentation
class TTA(torch.nn.Module):
    """Test-time augmentation: run an R-CNN (eval mode) on several views of each image and merge the detections.

    Views: each min_size in `scales` (pixels of the shorter side; the model's own when None), each also on the
    horizontally flipped image when `hflip`. Every view's detections are mapped back to the original image's pixels
    and concatenated, then merged per class: "nms" keeps the best box of each overlapping group (IoU > iou_thresh),
    "vote" moves it to the score-weighted mean of the boxes of its class overlapping it by IoU >= iou_thresh.
    Either way a kept detection keeps its score and keypoints, and its mask is the mean of the mask probabilities of
    those overlapping detections (averaged before the usual 0.5 cut). At most `detections_per_img` are returned,
    best first, in the model's output format. Wrap the bare model (not DDP); every view's masks [N, 1, H, W] are
    held until the merge.
    """

    def __init__(
        self, model, hflip=True, scales=None, merge="nms", iou_thresh=0.5, detections_per_img=None, keypoint_flip=None
    ):
        super().__init__()
        if merge not in ("nms", "vote"):
            raise ValueError(f"unknown TTA merge {merge!r}; choose one of: nms, vote")
        if not hasattr(model, "transform") or not hasattr(model, "roi_heads"):
            raise ValueError("TTA wraps a torchvision R-CNN (pass the model itself, not its DDP wrapper)")
        # a mirrored left wrist is a right wrist: flipped keypoints need the left/right pairs (COCO's by default)
        self.keypoint_flip = list(COCO_KEYPOINT_FLIP if keypoint_flip is None else keypoint_flip)
        keypoint_predictor = getattr(model.roi_heads, "keypoint_predictor", None)
        if hflip and keypoint_predictor is not None:
            num_keypoints = keypoint_predictor.kps_score_lowres.out_channels
            if num_keypoints != len(self.keypoint_flip):
                raise ValueError(
                    f"the model predicts {num_keypoints} keypoints but keypoint_flip pairs {len(self.keypoint_flip)}: "
                    f"pass keypoint_flip (index of each keypoint's mirror image) or hflip=False"
                )
        self.model, self.hflip, self.merge, self.iou_thresh = model, hflip, merge, iou_thresh
        self.scales = tuple(int(s) for s in scales) if scales else (None,)
        self.detections_per_img = detections_per_img or model.roi_heads.detections_per_img

    def _unflip(self, output, width):
        """Detections on a flipped image -> detections on the image (`width` pixels wide)."""
        output = dict(output)
        x1, y1, x2, y2 = output["boxes"].unbind(1)
        output["boxes"] = torch.stack([width - x2, y1, width - x1, y2], dim=1)  # pixel extents mirror exactly
        if "masks" in output:  # [N, 1, H, W]
            output["masks"] = output["masks"].flip(-1)
        if "keypoints" in output:  # [N, K, 3] as (x, y, visible); continuous x mirrors as x -> W - x
            keypoints = output["keypoints"][:, self.keypoint_flip]
            keypoints[..., 0] = width - keypoints[..., 0]
            output["keypoints"] = keypoints
            output["keypoints_scores"] = output["keypoints_scores"][:, self.keypoint_flip]
        return output

    def _view(self, images, min_size=None, flip=False):
        """The model's detections on one view of `images`, in each original image's pixels."""
        resize = self.model.transform  # GeneralizedRCNNTransform: resizes inside the model, maps results back
        saved = resize.min_size, resize.max_size
        if min_size is not None:
            # max_size grows with min_size: with a fixed cap a wide image would reach it at every large scale and
            # those views would all be the same size
            resize.min_size, resize.max_size = (min_size,), round(saved[1] * min_size / saved[0][-1])
        try:
            outputs = self.model([image.flip(-1) for image in images] if flip else images)
        finally:
            resize.min_size, resize.max_size = saved
        if flip:
            outputs = [self._unflip(output, image.shape[-1]) for output, image in zip(outputs, images)]
        return outputs

    def _merge(self, views):
        """One image's detections from every view -> one set: per-class NMS or box voting, masks averaged."""
        merged = {key: torch.cat([view[key] for view in views]) for key in views[0]}  # M detections
        boxes, scores, labels = merged["boxes"].float(), merged["scores"].float(), merged["labels"]
        keep = torchvision.ops.batched_nms(boxes, scores, labels, self.iou_thresh)[: self.detections_per_img]
        # members[k, m]: detection m is of kept detection k's class and overlaps it, so it votes for k's box / mask
        members = (torchvision.ops.box_iou(boxes[keep], boxes) >= self.iou_thresh) & (labels[keep, None] == labels)
        members[torch.arange(len(keep)), keep] = True  # a zero-area box has IoU nan with itself
        output = {key: value[keep] for key, value in merged.items() if key != "masks"}
        output["boxes"], output["scores"] = boxes[keep], scores[keep]
        if self.merge == "vote":
            weights = members * scores  # [K, M]
            output["boxes"] = weights @ boxes / weights.sum(1, keepdim=True)
        if "masks" in merged:
            masks = merged["masks"].float()  # [M, 1, H, W] probabilities
            mean = members.float() @ masks.flatten(1) / members.sum(1, keepdim=True)
            output["masks"] = mean.view(len(keep), *masks.shape[1:])
        return output

    @torch.no_grad()
    def forward(self, images):
        """images: list of float [3, H, W] -> list of {"boxes", "labels", "scores", ...}, as the wrapped model."""
        if self.model.training:
            raise RuntimeError("TTA is for inference only (there is no TTA loss): call .eval() on it first")
        flips = (False, True) if self.hflip else (False,)
        views = [self._view(images, scale, flip) for scale in self.scales for flip in flips]  # [view][image]
        return [self._merge([view[i] for view in views]) for i in range(len(images))]
