import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import models
from utils import SetupError

SMALL = dict(min_size=64, max_size=96)


@pytest.mark.parametrize("name", models.MODELS)
def test_every_model_builds_for_num_classes(name):
    model = models.get_model(name, num_classes=3, weights="none", **SMALL)
    if name in ("retinanet", "fcos"):  # one-stage: the classification head predicts the classes
        assert model.head.classification_head.num_classes == 3
    else:
        assert model.roi_heads.box_predictor.cls_score.out_features == 3
        assert model.roi_heads.box_predictor.bbox_pred.out_features == 12
    if name.startswith("maskrcnn"):
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 70, 90)])
    assert set(out[0]) >= {"boxes", "labels", "scores"}


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="maskrcnn_resnet50_fpn"):
        models.get_model("yolo", num_classes=2)


def _coco_like_file(tmp_path, name):
    """A 91-class state dict in the layout of torchvision's COCO files (frozen BatchNorm: no num_batches_tracked)."""
    state = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91).state_dict()
    state = {
        k: v for k, v in state.items() if not (k.startswith("backbone.body.") and k.endswith("num_batches_tracked"))
    }
    path = tmp_path / "coco.pth"
    torch.save(state, path)
    return path, state


def test_local_coco_file_is_built_like_downloaded_weights(tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    path, state = _coco_like_file(tmp_path, name)
    model = models.get_model(name, num_classes=4, weights=str(path))
    loaded = model.state_dict()
    kept = [k for k in state if not k.startswith(models.HEAD_PREFIXES)]
    assert all(torch.equal(loaded[k], state[k]) for k in kept)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    frozen = [n for n, p in model.backbone.body.named_parameters() if not p.requires_grad]
    assert frozen  # like torchvision with COCO weights: only the last 3 backbone stages train


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_coco_weights_from_the_hub_cache_load_like_a_local_file(name, tmp_path, monkeypatch):
    """--weights DEFAULT without a download: the file torch's hub cache holds is loaded into the pretrained layout
    (the v2 models keep trainable BatchNorm), with new predictors for another class count."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    enum = torchvision.models.get_model_weights(name).DEFAULT
    coco = models.build(name, 91, pretrained=True)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / enum.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(coco.state_dict(), cached)
    same = models.get_model(name, num_classes=91, weights="DEFAULT")
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), coco.state_dict().values()))
    model = models.get_model(name, num_classes=3, weights="DEFAULT", min_size=64)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3 and model.transform.min_size == (64,)
    assert model.model_args["pretrained"] and model.model_args["min_size"] == 64
    trains = {n for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trains and trains != {n for n, _ in model.backbone.body.named_parameters()}  # early stages frozen
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == ("_v2" not in name)


def test_checkpoint_of_this_project_reloads_with_its_classes(tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    path, _ = _coco_like_file(tmp_path, name)
    model = models.get_model(name, num_classes=3, weights=str(path))
    torch.save({"model": model.state_dict(), "class_names": ["a", "b"]}, tmp_path / "ckpt.pth")
    again = models.get_model(name, num_classes=3, weights=str(tmp_path / "ckpt.pth"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = models.get_model(name, num_classes=6, weights=str(tmp_path / "ckpt.pth"))  # new classes: new heads
    assert other.roi_heads.box_predictor.cls_score.out_features == 6
    assert torch.equal(other.backbone.fpn.inner_blocks[0][0].weight, model.backbone.fpn.inner_blocks[0][0].weight)


def test_offline_weights_say_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SetupError, match="(?s)--weights none.*--weights FILE.pth"):
        models.get_model("maskrcnn_resnet50_fpn", num_classes=2, weights="DEFAULT")
    with pytest.raises(SetupError, match="COCO_V1"):
        models.get_model("maskrcnn_resnet50_fpn", num_classes=2, weights="NOPE")
    with pytest.raises(SetupError, match="does not exist"):
        models.get_model("maskrcnn_resnet50_fpn", num_classes=2, weights=str(tmp_path / "missing.pth"))


def test_flat_anchor_sizes_keep_the_models_layout():
    """One size per map for FPN R-CNNs (resnet50_fpn); all sizes on every map where the model has that (mobilenet)."""
    sizes, ratios = [16, 32, 64, 128, 256], [1.0, 2.0]
    per_level = models.get_model("fasterrcnn_resnet50_fpn", 2, weights="none", anchor_sizes=sizes, **SMALL)
    assert per_level.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    model = models.get_model("fasterrcnn_mobilenet_v3_large_fpn", 2, "none", anchor_sizes=sizes, anchor_ratios=ratios)
    assert model.rpn.anchor_generator.sizes == (tuple(sizes),) * 3
    assert model.rpn.head.cls_logits.out_channels == 10  # 5 sizes x 2 ratios per location


@pytest.mark.parametrize("name", models.TORCHVISION_MODELS)
def test_pretrained_layout_is_torchvisions(name, monkeypatch):
    """models.build(pretrained=True) reproduces what torchvision's builder makes for COCO weights (fails when a
    torchvision release changes that layout): module types and BatchNorm eps, and which parameters train."""
    with torch.device("meta"):
        shapes = torchvision.models.get_model(name, weights=None, weights_backbone=None).state_dict()
    zeros = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    # the builder fetches its weights through this one function: answered offline with zeros (tests only)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *args, **kwargs: zeros)
    for layers in (None, 0, 2, 5):
        theirs = torchvision.models.get_model(name, weights="DEFAULT", trainable_backbone_layers=layers)
        ours = models.build(name, 2 if "keypoint" in name else 91, pretrained=True, trainable_backbone_layers=layers)
        describe = lambda m: [(n, type(x).__name__, getattr(x, "eps", None)) for n, x in m.named_modules()]  # noqa: E731
        assert describe(ours) == describe(theirs)
        trains = lambda m: [(n, p.requires_grad) for n, p in m.named_parameters()]  # noqa: E731
        assert trains(ours) == trains(theirs), layers


def test_model_args_rebuild_the_model(tmp_path):
    path, _ = _coco_like_file(tmp_path, "fasterrcnn_mobilenet_v3_large_320_fpn")
    model = models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, str(path), anchor_ratios=(1.0, 2.0), **SMALL)
    assert model.model_args == dict(
        name="fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, pretrained=True, trainable_backbone_layers=None,
        anchor_ratios=(1.0, 2.0), **SMALL,
    )  # fmt: skip
    again = models.build(**model.model_args)
    again.load_state_dict(model.state_dict())  # the same structure, key for key and shape for shape
    trains = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trains(again) == trains(model) and again.transform.min_size == (64,)
