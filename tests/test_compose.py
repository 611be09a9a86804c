"""models.py's composed detectors: every backbone x neck trains a step, PAFPN's levels, anchors per location, the
dense heads, and checkpoints (ours rebuilt exactly, torchvision's loaded where keys and shapes match)."""

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import models
from extras import compose
from utils import SetupError

SMALL = dict(min_size=64, max_size=96)  # 64 x 80 images stay 64 x 80 (padded to 64 x 96 inside the model)
# R-CNN steps on 32 sampled RoIs instead of 512: the box head's fc6 (12544 x 1024) is most of a step's time
RCNN = dict(SMALL, box_batch_size_per_image=32)


@pytest.fixture(autouse=True)
def one_thread():
    """On 64 x 80 images thread hand-offs cost more than they save, and far more on a busy machine (about 8x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sample(masks=False):
    """One 64 x 80 image and its target: one box (and its mask) of class 1."""
    target = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 56.0]]), "labels": torch.tensor([1])}
    if masks:
        target["masks"] = torch.zeros(1, 64, 80, dtype=torch.uint8)
        target["masks"][0, 10:56, 8:40] = 1
    return [torch.rand(3, 64, 80)], [target]


def train_step(model, masks=False):
    """Forward with targets and backward; returns the loss dict."""
    model.train()
    images, targets = sample(masks)
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(loss) for loss in losses.values()), losses
    return losses


@pytest.mark.parametrize("neck", compose.NECKS)
@pytest.mark.parametrize("backbone", compose.BACKBONES)
def test_every_backbone_and_neck_trains_a_step(backbone, neck):
    torch.manual_seed(0)
    model = compose.get_model("fasterrcnn", num_classes=3, weights="none", backbone=backbone, neck=neck, **RCNN)
    assert model.backbone.out_channels == (256 if neck != "none" else compose.STAGES[backbone][1][-1])
    assert set(train_step(model)) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(p.requires_grad for p in model.parameters())  # from scratch: nothing to keep frozen


def test_pafpn_levels_channels_and_strides():
    channels = compose.STAGES["resnet18"][1]
    neck = compose.PAFPN(list(channels), [4, 8, 16, 32])
    maps = {str(i): torch.rand(2, c, 64 // s, 96 // s) for i, (c, s) in enumerate(zip(channels, (4, 8, 16, 32)))}
    maps["0"].requires_grad_(True)
    out = neck(maps)
    assert list(out) == ["0", "1", "2", "3", "pool"] == list(neck.strides)
    assert neck.out_channels == 256
    for name, stride in neck.strides.items():
        assert out[name].shape == (2, 256, -(-64 // stride), -(-96 // stride)), name  # ceil: "pool" of 2 x 3 is 1 x 2
    # every N level depends on the finest map through the bottom-up path (P5 alone would not, in a plain FPN)
    out["3"].sum().backward()
    assert maps["0"].grad.abs().sum() > 0


def test_dense_heads_start_at_c3():
    model = compose.get_model("retinanet", num_classes=3, weights="none", backbone="resnet18", neck="pafpn", **SMALL)
    assert model.backbone.strides == {"0": 8, "1": 16, "2": 32, "pool": 64}
    model = compose.get_model("fasterrcnn", num_classes=3, weights="none", backbone="resnet18", neck="none", **SMALL)
    assert model.backbone.strides == {"0": 32}
    assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)


@pytest.mark.parametrize(
    "neck, sizes, ratios, per_location",
    [
        ("fpn", None, None, 3),  # torchvision's: one size per level x 3 ratios
        ("fpn", ((16, 24), (32, 48), (64, 96), (128, 192), (256, 384)), (0.25, 0.5, 1.0, 2.0), 8),
        ("pafpn", (16, 32, 64, 128, 256), (1.0,), 1),  # flat: one size per level
        ("none", (16, 32, 64), (0.5, 1.0, 2.0, 4.0), 12),  # flat on the only map: all three sizes there
    ],
)
def test_custom_anchors_set_the_rpn_head(neck, sizes, ratios, per_location):
    model = compose.get_model(
        "fasterrcnn", 3, weights="none", backbone="mobilenet_v3_large", neck=neck, anchor_sizes=sizes,
        anchor_ratios=ratios, **RCNN,
    )  # fmt: skip
    assert model.rpn.anchor_generator.num_anchors_per_location() == [per_location] * len(model.backbone.strides)
    assert model.rpn.head.cls_logits.out_channels == per_location
    assert model.rpn.head.bbox_pred.out_channels == 4 * per_location
    train_step(model)


def test_named_model_takes_anchors_and_keeps_the_shared_rpn_conv():
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"  # 3 maps x 5 sizes x 3 ratios = 15 anchors per location
    torch.manual_seed(0)
    plain = models.get_model(name, num_classes=3, weights="none", **SMALL)
    torch.manual_seed(0)
    tall = models.get_model(name, num_classes=3, weights="none", anchor_ratios=(1.0, 2.0, 4.0, 8.0), **RCNN)
    assert tall.rpn.anchor_generator.sizes == plain.rpn.anchor_generator.sizes
    assert tall.rpn.head.cls_logits.out_channels == 20 and tall.rpn.head.bbox_pred.out_channels == 80
    assert torch.equal(tall.rpn.head.conv[0][0].weight, plain.rpn.head.conv[0][0].weight)
    train_step(tall)


def test_named_checkpoint_with_custom_anchors_reloads(tmp_path):
    """A pretrained-layout file (frozen BatchNorm) with 20 RPN anchors: the builder is fed zeros of its own 15."""
    name, ratios = "fasterrcnn_mobilenet_v3_large_320_fpn", (1.0, 2.0, 4.0, 8.0)
    state = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=3).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "coco.pth"
    torch.save(state, path)
    model = models.get_model(name, num_classes=3, weights=str(path), anchor_ratios=ratios)  # 15 -> 20: fresh RPN preds
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    again = models.get_model(name, num_classes=3, weights=str(tmp_path / "ckpt.pth"), anchor_ratios=ratios)
    assert again.rpn.head.cls_logits.out_channels == 20
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_mismatched_anchors_and_parts_name_the_fix():
    with pytest.raises(ValueError, match=r"3 groups of anchor sizes .* 5 feature maps.*anchor_sizes="):
        compose.get_model("fasterrcnn", 3, weights="none", backbone="resnet18", anchor_sizes=((32,), (64,), (128,)))
    with pytest.raises(ValueError, match="as many anchors"):
        sizes = ((32,), (64,), (128,), (256,), (512, 640))
        compose.get_model("fasterrcnn", 3, weights="none", backbone="resnet18", anchor_sizes=sizes)
    with pytest.raises(ValueError, match="--model fasterrcnn"):
        models.get_model("fasterrcnn_resnet50_fpn", 3, weights="none", backbone="resnet18")
    with pytest.raises(ValueError, match="convnext_tiny"):
        compose.get_model("fasterrcnn", 3, weights="none", backbone="vgg16")
    with pytest.raises(ValueError, match="pafpn"):
        compose.get_model("fasterrcnn", 3, weights="none", backbone="resnet18", neck="bifpn")
    with pytest.raises(SetupError, match="IMAGENET1K_V1"):
        compose.get_model("fasterrcnn", 3, weights="none", backbone="resnet18", weights_backbone="NOPE")
    with pytest.raises(ValueError, match="anchor-free"):
        compose.get_model("fcos", 3, weights="none", backbone="resnet18", anchor_sizes=(32, 64, 128, 256))


@pytest.mark.parametrize("head, per_location", [("retinanet", 9), ("fcos", 1)])
def test_dense_heads_train_and_predict(head, per_location):
    torch.manual_seed(0)
    model = compose.get_model(head, 3, weights="none", backbone="resnet18", box_score_thresh=0.0, **SMALL)
    assert model.anchor_generator.num_anchors_per_location() == [per_location] * 4
    assert model.score_thresh == 0.0  # train.py's box_score_thresh, under its RetinaNet / FCOS name
    losses = train_step(model)
    assert "bbox_regression" in losses and "classification" in losses
    model.eval()
    with torch.no_grad():
        out = model(sample()[0])[0]
    assert out["boxes"].shape[1] == 4 and len(out["labels"]) == len(out["scores"])


def test_maskrcnn_composed_trains_a_step():
    model = compose.get_model("maskrcnn", 3, weights="none", backbone="resnet18", neck="pafpn", **RCNN)
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]  # no "pool"
    assert "loss_mask" in train_step(model, masks=True)


@pytest.mark.parametrize("pretrained", [False, True])
def test_composed_checkpoint_rebuilds_exactly(tmp_path, capsys, pretrained):
    parts = dict(backbone="mobilenet_v3_large", neck="pafpn", anchor_sizes=(16, 32, 64, 128, 256), anchor_ratios=(1, 3))
    torch.manual_seed(0)
    # pretrained: built as from ImageNet weights (frozen BatchNorm, early stages frozen) without downloading them
    model = compose.compose("maskrcnn", 4, pretrained=pretrained, **parts, **RCNN)
    train_step(model, masks=True)  # BatchNorm statistics move (when not frozen)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, path)
    again = compose.get_model("maskrcnn", 4, weights=str(path), **parts, **RCNN)
    assert "fresh: nothing" in capsys.readouterr().out
    assert list(again.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    frozen_bn = any(isinstance(m, FrozenBatchNorm2d) for m in again.backbone.body.modules())
    assert frozen_bn == pretrained
    assert [p.requires_grad for p in again.parameters()] == [p.requires_grad for p in model.parameters()]


def test_torchvision_state_dict_loads_where_it_fits(tmp_path, capsys):
    """torchvision's fasterrcnn_resnet50_fpn layout (a COCO file: 91 classes, frozen BatchNorm) into fasterrcnn +
    resnet50 + fpn for 3 classes: everything but the box predictor loads."""
    torch.manual_seed(0)
    coco = torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None, num_classes=91)
    state = {k: v for k, v in coco.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "coco.pth")
    torch.manual_seed(1)
    model = compose.get_model("fasterrcnn", 3, weights=str(tmp_path / "coco.pth"), backbone="resnet50", neck="fpn")
    report = capsys.readouterr().out
    assert "loaded backbone.body, backbone.fpn, rpn.head, roi_heads.box_head; fresh: roi_heads.box_predictor" in report
    loaded = model.state_dict()
    for prefix in ("backbone.body.", "backbone.fpn.", "rpn.head.", "roi_heads.box_head."):
        keys = [k for k in state if k.startswith(prefix)]
        assert keys and all(torch.equal(loaded[k], state[k]) for k in keys), prefix
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())  # as torchvision's COCO model
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad  # only layer2..layer4 train by default
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    # the same file into a PAFPN: its top-down FPN loads, the bottom-up path starts fresh
    model = compose.get_model("fasterrcnn", 3, weights=str(tmp_path / "coco.pth"), neck="pafpn")
    assert "loaded backbone.body, backbone.fpn (16/28 tensors)" in capsys.readouterr().out
