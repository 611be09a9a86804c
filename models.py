"""Detection models: torchvision's Faster / Mask / Keypoint R-CNN with their heads resized for your classes.

The fine-tuning recipe of the torchvision tutorial, as one function (`get_model`): build the model with its COCO
weights (91 classes), then replace the box predictor (and the mask predictor) by fresh ones for `num_classes`.
`num_classes` counts the background: a dataset with K classes needs num_classes = K + 1.
`build` makes the same model with random weights, laid out as for pretrained ones when `pretrained` (frozen BatchNorm,
early stages frozen): what a checkpoint or a local weights file is loaded into (`load_weights`).
"""

import os
from urllib.parse import urlparse

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

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


def fasterrcnn_mobilenet_v2(num_classes, weights_backbone=None, pretrained=None, **kwargs):
    """The tutorial's custom model: MobileNetV2 features (one map, 1280 channels, stride 32) + Faster R-CNN heads."""
    pretrained = weights_backbone is not None if pretrained is None else pretrained
    # Batches of 2 images are too small to estimate BatchNorm statistics: keep ImageNet's frozen when we have them.
    norm_layer = FrozenBatchNorm2d if pretrained else torch.nn.BatchNorm2d
    backbone = torchvision.models.mobilenet_v2(weights=weights_backbone, norm_layer=norm_layer).features
    backbone.out_channels = 1280  # FasterRCNN reads this to size the RPN and box heads
    # One feature map, so one tuple of 5 sizes (pixels) x 3 aspect ratios (h/w) = 15 anchors per location
    anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    roi_pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pooler, **kwargs)


MODELS = TORCHVISION_MODELS + ("fasterrcnn_mobilenet_v2",)


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
    if model_name not in TORCHVISION_MODELS:
        raise SetupError(f"{model_name} has no COCO weights: pass --weights none (or a .pth file)")
    try:
        enum = torchvision.models.get_weight(weights) if "." in str(weights) else None
        enum = enum or torchvision.models.get_model_weights(model_name)[weights]
    except (KeyError, ValueError) as e:
        valid = ", ".join(["DEFAULT", *torchvision.models.get_model_weights(model_name).__members__, "none", "FILE"])
        raise SetupError(f"unknown weights {weights!r} for {model_name}; choose one of: {valid}") from e
    fetch_weights(enum)
    return enum


def backbone_weights(arch, weights_backbone):
    """ImageNet weights of a classifier `arch` (or of the backbone of a named model): an enum (file fetched) or None."""
    if weights_backbone is None or str(weights_backbone).lower() == "none":
        return None
    arch = next((a for a in ("mobilenet_v3_large", "mobilenet_v2") if a[:12] in arch), arch)
    classifiers = torchvision.models.list_models(module=torchvision.models)
    enum = torchvision.models.get_model_weights(arch if arch in classifiers else "resnet50")
    if "." in weights_backbone:
        enum = torchvision.models.get_weight(weights_backbone)
    elif weights_backbone not in enum.__members__:
        raise SetupError(f"unknown backbone weights {weights_backbone!r}; choose one of: {', '.join(enum.__members__)}")
    else:
        enum = enum[weights_backbone]
    fetch_weights(enum)
    return enum


def load_state_dict_file(path):
    """A torchvision state dict, or this project's checkpoint (its "model" entry). Only tensors are unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SetupError(f"cannot load weights from {path}: {e}") from e
    return state["model"] if "model" in state else state


def pretrained_layout(state):
    """Whether a state dict comes from a pretrained start: no BatchNorm counters in the backbone (frozen BatchNorm)."""
    return not any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state)


def freeze_like_pretrained(model, name, trainable_layers=3):
    """Give a torchvision model built without weights the layout its builder makes for pretrained ones.

    Checked against torchvision 0.29 (tests/test_models.py compares every name with the builder's own): the
    ResNet-50 v1 and MobileNetV3 models freeze their backbone's BatchNorm (FrozenBatchNorm2d; eps 0 for the v1 COCO
    weights, the eps they were trained with), the v2 models keep BatchNorm2d; the stem and the first stages train
    only when `trainable_layers` (of 5 ResNet stages, 6 MobileNet ones) reaches them.
    """
    body = model.backbone.body
    if "_v2" not in name:
        eps = 0.0 if "resnet50_fpn" in name else 1e-5
        for parent in body.modules():
            for child_name, child in parent.named_children():
                if type(child) is torch.nn.BatchNorm2d:
                    setattr(parent, child_name, FrozenBatchNorm2d(child.num_features, eps=eps))
    if "mobilenet" in name:  # stages end at the strided blocks; the first and last blocks are stages of their own
        blocks = list(body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        first_trained = len(blocks) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        trained = tuple(f"{i}." for i in range(first_trained, len(blocks)))
    else:
        trained = ("layer4", "layer3", "layer2", "layer1", "conv1", "bn1")[: trainable_layers + (trainable_layers == 5)]
    for param_name, param in body.named_parameters():
        if not param_name.startswith(trained):
            param.requires_grad_(False)
    return model


def build(name, num_classes, pretrained=False, trainable_backbone_layers=None, weights_backbone=None, **kwargs):
    """`name` for `num_classes` with random weights (ImageNet ones in the backbone with `weights_backbone`), laid out
    as for pretrained weights when `pretrained`: the structure a checkpoint of it loads into. kwargs: anchor_sizes,
    anchor_ratios (see anchor_generator), and the model's own (min_size, max_size, box_score_thresh, ...).
    `model.model_args` keeps the arguments, so that build(**model_args) makes the same model again."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if "backbone" in kwargs or "neck" in kwargs:
        raise ValueError(f"{name} has its own backbone and neck; to choose them use --model fasterrcnn or maskrcnn")
    pretrained = pretrained or weights_backbone is not None
    model_args = dict(name=name, num_classes=num_classes, pretrained=pretrained, **kwargs)
    model_args["trainable_backbone_layers"] = trainable_backbone_layers
    sizes, ratios = kwargs.pop("anchor_sizes", None), kwargs.pop("anchor_ratios", None)
    if name == "fasterrcnn_mobilenet_v2":
        model = fasterrcnn_mobilenet_v2(num_classes, weights_backbone, pretrained, **kwargs)
    elif weights_backbone is not None:  # torchvision lays the model out for pretrained weights itself
        layers = dict(trainable_backbone_layers=trainable_backbone_layers, num_classes=num_classes)
        model = torchvision.models.get_model(name, weights=None, weights_backbone=weights_backbone, **layers, **kwargs)
    else:
        model = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
        )
        layers = 3 if trainable_backbone_layers is None else trainable_backbone_layers
        if pretrained and not 0 <= layers <= (6 if "mobilenet" in name else 5):
            raise ValueError(f"trainable_backbone_layers must be 0 to {6 if 'mobilenet' in name else 5}, not {layers}")
        if pretrained:
            freeze_like_pretrained(model, name, layers)
    set_anchors(model, sizes, ratios)
    model.model_args = model_args
    return model


def load_weights(model, state, source):
    """Load a state dict of the same model, of any class count (new predictors then replace its own) and any anchors
    per location (the RPN's predictors then start fresh)."""
    file_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    num_classes = model.roi_heads.box_predictor.cls_score.out_features
    replace_predictors(model, file_classes)
    ours, theirs = model.rpn.head.cls_logits.out_channels, state["rpn.head.cls_logits.weight"].shape[0]
    if ours != theirs:
        print(f"{source} has {theirs} anchors per location, the model {ours}: its RPN predictors start fresh")
        state = {**state, **{k: v for k, v in model.state_dict().items() if k.startswith(RPN_PREDICTORS)}}
    model.load_state_dict(state)
    if file_classes != num_classes:
        skipped = ", ".join(sorted(k for k in state if k.startswith(HEAD_PREFIXES)))
        print(f"{source} has {file_classes} classes, the model {num_classes}: new predictors replace {skipped}")
        replace_predictors(model, num_classes)
    return model


def get_model(name, num_classes, weights="DEFAULT", weights_backbone=None, trainable_backbone_layers=None, **kwargs):
    """Build `name` for `num_classes` (your classes + background).

    weights: "DEFAULT" or a weights enum name (COCO weights, downloaded once), "none" (random init, with the
    backbone's ImageNet weights if `weights_backbone` names them), or a local .pth: a torchvision state dict or a
    checkpoint of this project, of any class count (mismatched predictors are replaced). kwargs go to `build`:
    anchor_sizes, anchor_ratios, min_size, max_size, box_score_thresh, ...
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if name not in TORCHVISION_MODELS and str(weights).lower() == "default":
        weights, weights_backbone = None, weights_backbone or "DEFAULT"  # no COCO weights: ImageNet's backbone
    weights = resolve_weights(name, weights)
    layers = dict(trainable_backbone_layers=trainable_backbone_layers)
    if isinstance(weights, str):  # a local file: the model as that file was built, then its weights
        state = load_state_dict_file(weights)
        return load_weights(build(name, num_classes, pretrained_layout(state), **layers, **kwargs), state, weights)
    if weights is None:
        return build(name, num_classes, weights_backbone=backbone_weights(name, weights_backbone), **layers, **kwargs)
    anchors = {k: kwargs.pop(k) for k in ("anchor_sizes", "anchor_ratios") if k in kwargs}
    model = torchvision.models.get_model(name, weights=weights, **layers, **kwargs)  # COCO weights, then new heads
    set_anchors(model, anchors.get("anchor_sizes"), anchors.get("anchor_ratios"))
    model.model_args = dict(name=name, num_classes=num_classes, pretrained=True, **layers, **kwargs, **anchors)
    return replace_predictors(model, num_classes) if num_classes != len(weights.meta["categories"]) else model


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
