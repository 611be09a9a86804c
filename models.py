"""Detection models: torchvision's Faster / Mask R-CNN with their heads resized for your classes.

The fine-tuning recipe of the torchvision tutorial, as one function (`get_model`): build the model with its COCO
weights (91 classes), then replace the box predictor (and the mask predictor) by fresh ones for `num_classes`.
`num_classes` counts the background: a dataset with K classes needs num_classes = K + 1.
"""

import os
from contextlib import contextmanager
from unittest import mock
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


# --model name -> builder(num_classes, weights_backbone, **kwargs) for models composed here
CUSTOM_MODELS = {"fasterrcnn_mobilenet_v2": fasterrcnn_mobilenet_v2}
MODELS = TORCHVISION_MODELS + tuple(CUSTOM_MODELS)


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


@contextmanager
def _torchvision_weights_from(state_dict):
    # torchvision builders fetch pretrained weights through this one function: answering it with a local state
    # dict builds the model exactly as with downloaded COCO weights (frozen BatchNorm, same trainable layers).
    with mock.patch("torchvision.models._api.load_state_dict_from_url", lambda *args, **kwargs: state_dict):
        yield


def _coco_shaped(state, num_coco_classes=91):
    """`state` with zero predictor tensors of the COCO class count, so the builder's strict load accepts it."""
    classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    coco = dict(state)
    for key, value in state.items():
        if key.startswith(HEAD_PREFIXES):
            per_class = value.shape[0] // classes  # 4 for box regression, 1 otherwise
            coco[key] = value.new_zeros((num_coco_classes * per_class, *value.shape[1:]))
    return coco


def get_model(name, num_classes, weights="DEFAULT", weights_backbone=None, trainable_backbone_layers=None, **kwargs):
    """Build `name` for `num_classes` (your classes + background).

    weights: "DEFAULT" or a weights enum name (COCO weights, downloaded once), "none" (random init, with the
    backbone's ImageNet weights if `weights_backbone` names them), or a local .pth: a torchvision state dict or a
    checkpoint of this project, of any class count (mismatched predictors are replaced). kwargs go to the model
    (min_size, max_size, box_score_thresh, ...).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if name in CUSTOM_MODELS and str(weights).lower() == "default":
        # composed models have no COCO weights: their best start is the backbone's ImageNet weights
        weights, weights_backbone = None, weights_backbone or "DEFAULT"
    weights = resolve_weights(name, weights) if name in TORCHVISION_MODELS else _custom_weights(weights)
    if weights_backbone is not None and str(weights_backbone).lower() != "none":
        backbone_weights = torchvision.models.get_weight(weights_backbone) if "." in weights_backbone else None
        if backbone_weights is None:  # "DEFAULT" or a member name of the backbone's enum
            backbone_weights = _backbone_enum(name, weights_backbone)
        fetch_weights(backbone_weights)
    else:
        backbone_weights = None

    if name in CUSTOM_MODELS:
        model = CUSTOM_MODELS[name](num_classes, weights_backbone=backbone_weights, **kwargs)
        if weights is not None:
            model.load_state_dict(_load_state_dict_file(weights))
        return model

    builder = torchvision.models.get_model_builder(name)
    common = dict(trainable_backbone_layers=trainable_backbone_layers, **kwargs)
    if weights is None:
        return builder(weights=None, weights_backbone=backbone_weights, num_classes=num_classes, **common)
    if not isinstance(weights, str):  # a torchvision enum: COCO weights, then new heads
        model = builder(weights=weights, **common)
        return replace_predictors(model, num_classes) if num_classes != len(weights.meta["categories"]) else model

    state = _load_state_dict_file(weights)
    if any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in state):
        # trained from scratch: plain BatchNorm layout, no pretrained structure to reproduce
        file_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
        model = builder(weights=None, weights_backbone=None, num_classes=file_classes, **common)
        model.load_state_dict(state)
    else:
        with _torchvision_weights_from(_coco_shaped(state)):
            model = builder(weights="DEFAULT", **common)
        replace_predictors(model, state["roi_heads.box_predictor.cls_score.weight"].shape[0])
        model.load_state_dict(state)
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
    backbone = {"mobilenet_v2": "mobilenet_v2", "mobilenet_v3": "mobilenet_v3_large"}
    arch = next((v for k, v in backbone.items() if k in model_name), "resnet50")
    return torchvision.models.get_model_weights(arch)[member]
