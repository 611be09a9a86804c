"""Detection models: torchvision's Faster / Mask / Keypoint R-CNN with their heads resized for your classes.

The fine-tuning recipe of the torchvision tutorial is `get_model`: the model with its COCO weights (91 classes), its
box and mask predictors replaced by fresh ones for `num_classes` (K classes + background: K + 1). `build` lays a model
out as for pretrained weights (frozen BatchNorm, early stages frozen), `load_weights` fills it (COCO's, a local
file's), `model_from_checkpoint` rebuilds a train.py checkpoint's model and `prepare_model` readies it on its device.
The composed detectors (COMPOSED) are built by extras/compose.py, an extra.
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

# --model names built from parts by extras/compose.py (with --backbone and --neck)
COMPOSED = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")
# train.py flags that are also model constructor arguments (absent: the model's defaults)
MODEL_OPTIONS = ("min_size", "max_size", "box_score_thresh", "backbone", "neck", "anchor_sizes", "anchor_ratios")


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
    anchor_ratios (extras/anchors.py), and the model's own (min_size, max_size, box_score_thresh, ...).
    `model.model_args` keeps the arguments, so that build(**model_args) makes the same model again."""
    if name in COMPOSED:
        from extras import compose  # an extra: backbone x neck x head

        layers = dict(trainable_backbone_layers=trainable_backbone_layers, weights_backbone=weights_backbone)
        return compose.build(name, num_classes, pretrained=pretrained, **layers, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS + COMPOSED)}")
    if "backbone" in kwargs or "neck" in kwargs:
        raise ValueError(f"{name} has its own backbone and neck; to choose them use --model fasterrcnn or maskrcnn")
    pretrained = pretrained or weights_backbone is not None
    model_args = dict(name=name, num_classes=num_classes, pretrained=pretrained, **kwargs)
    model_args["trainable_backbone_layers"] = trainable_backbone_layers
    sizes, ratios = kwargs.pop("anchor_sizes", None), kwargs.pop("anchor_ratios", None)
    builder = dict(weights=None, weights_backbone=weights_backbone, num_classes=num_classes)
    if name == "fasterrcnn_mobilenet_v2":
        model = fasterrcnn_mobilenet_v2(num_classes, weights_backbone, pretrained, **kwargs)
    elif weights_backbone is not None:  # torchvision lays the model out for pretrained weights itself
        layers = trainable_backbone_layers
        model = torchvision.models.get_model(name, **builder, trainable_backbone_layers=layers, **kwargs)
    else:
        model = torchvision.models.get_model(name, **builder, **kwargs)
        layers = 3 if trainable_backbone_layers is None else trainable_backbone_layers
        if pretrained and not 0 <= layers <= (6 if "mobilenet" in name else 5):
            raise ValueError(f"trainable_backbone_layers must be 0 to {6 if 'mobilenet' in name else 5}, not {layers}")
        if pretrained:
            freeze_like_pretrained(model, name, layers)
    if sizes is not None or ratios is not None:
        from extras import anchors  # --anchor-sizes, --anchor-ratios

        anchors.set_anchors(model, sizes, ratios)
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
    if name in COMPOSED:
        from extras import compose

        return compose.get_model(name, num_classes, weights, weights_backbone, trainable_backbone_layers, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS + COMPOSED)}")
    if name not in TORCHVISION_MODELS and str(weights).lower() == "default":
        weights, weights_backbone = None, weights_backbone or "DEFAULT"  # no COCO weights: ImageNet's backbone
    weights = resolve_weights(name, weights)
    layers = dict(trainable_backbone_layers=trainable_backbone_layers)
    if weights is None:
        return build(name, num_classes, weights_backbone=backbone_weights(name, weights_backbone), **layers, **kwargs)
    # COCO weights (the file fetch_weights cached) or a local file: the model laid out as they were trained (frozen
    # BatchNorm, early stages frozen), then their weights, with new predictors where the class count differs
    local = isinstance(weights, str)
    state = load_state_dict_file(weights) if local else weights.get_state_dict(progress=True)
    model = build(name, num_classes, pretrained_layout(state) if local else True, **layers, **kwargs)
    return load_weights(model, state, weights)


def model_from_checkpoint(checkpoint, **options):
    """The model of a train.py checkpoint, rebuilt from its model_args (older checkpoints: from their args) and
    loaded, on the CPU; `options` replace model_args (min_size, ...)."""
    model_args = checkpoint.get("model_args")
    if model_args is None:  # written before checkpoints kept model_args: what train.py was given
        args = checkpoint["args"]
        model_args = {k: args[k] for k in MODEL_OPTIONS if args.get(k) is not None}
        model_args.update(name=args["model"], num_classes=len(checkpoint["class_names"]) + 1)
        model_args.update(pretrained=pretrained_layout(checkpoint["model"]))
        model_args.update(trainable_backbone_layers=args.get("trainable_backbone_layers"))
    model_args = {**model_args, **options}
    model = build(**model_args)
    model.load_state_dict(checkpoint["model"])
    return model


def prepare_model(
    model, device, multiscale=False, channels_last=True, fold_bn=True, fast_roi_align=True, compile=False, amp=False
):
    """`model` on `device`, to train or evaluate: --data-augmentation multiscale, box arithmetic in fp32 under --amp,
    the speed path (same results: channels_last, BatchNorm folding, CPU RoIAlign) and --compile."""
    if multiscale:  # training rescales by 0.6-1.0 of the model's size
        if not hasattr(model, "transform") or not hasattr(model.transform, "resize"):
            raise SetupError(
                f"--data-augmentation multiscale needs an R-CNN-style resize; {type(model).__name__} has none"
            )
        from extras import multiscale  # random input sizes in training

        model.transform = multiscale.MultiScaleResize(model.transform)
    if amp:
        from extras import mixed_precision  # box decoding, anchor matching and the losses in fp32 under autocast

        mixed_precision.float32_boxes(model)
    model.to(device)
    from extras import speed  # the speed path; without it the model runs as torchvision ships it

    speed.fast_path(model, channels_last, fold_bn, fast_roi_align and device.type == "cpu")  # CUDA's RoIAlign is fast
    if compile:
        model.backbone.compile()  # in place: the state dict keeps its keys (torch.compile(m) would prefix them)
    return model
