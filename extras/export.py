"""A trained detector as one file that runs without this project: TorchScript or ONNX, preprocessing (resize,
normalisation) and postprocessing (boxes in the input's pixels, masks pasted at its size) inside, class names in its
metadata; and the check that the file detects what eager PyTorch does.

references/export.py is the script. Deployed, the file takes one image [3, H, W] (any H, W) and returns
    boxes [N, 4] float XYXY pixels, labels [N] int64 (k names class_names[k - 1]), scores [N] float, best first
    masks [N, 1, H, W] float probabilities (Mask R-CNN), keypoints [N, K, 3] x, y, visibility and
    keypoints_scores [N, K] (Keypoint R-CNN).
"""

import contextlib
import copy
import io
import json
import math
import os
import warnings

import torch
import torch.onnx.operators
import torchvision
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou

import engine
from utils import SetupError

FORMATS = ("torchscript", "onnx")
# ONNX opset: torchvision's RoIAlign and NMS need 11 or newer; 17 writes ConvNeXt's LayerNorm as one operator
ONNX_OPSET = 17
ONNX_INSTALL = "pip install onnx onnxruntime  (or: pip install -r requirements-extras.txt)"
MATCH_IOU = 0.5  # an exported detection is the eager one it overlaps best, of the same class, above this IoU


def import_onnx():
    """(onnx, onnxruntime), imported only for ONNX work: they are optional extras."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise SetupError(f"ONNX export needs onnx and onnxruntime ({e.name} is missing): {ONNX_INSTALL}") from None
    return onnx, onnxruntime


class Deployable(torch.nn.Module):
    """One image in, its detections out, as a dict of tensors (the module docstring lists them).

    image: uint8 [3, H, W] in 0-255 or float [3, H, W] in 0-1, RGB. Scripted torchvision detectors return
    (losses, detections) and take lists of images: this wrapper is what makes the file's interface a plain one.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.dtype == torch.uint8:
            image = image.to(torch.float32) * (1.0 / 255)  # as transforms' ToDtype(scale=True): the same floats
        if torch.jit.is_scripting():
            return self.model([image])[1][0]
        return self.model([image])[0]


@torch.jit.unused
def traced_resize(image, min_size: int, max_size: int):
    """`image` resized by operations of the ONNX graph to the size eager Python computes (float64 arithmetic)."""
    side = torch.onnx.operators.shape_as_tensor(image)[-2:].to(torch.float64)  # the graph reads H, W
    # limit / side as one Div: traced `int / tensor` becomes reciprocal x int, 1 ulp off (400 x 160/400 < 160)
    limits = torch.tensor([min_size, max_size], dtype=torch.float64)
    size = torch.floor(side * (limits / torch.stack([side.min(), side.max()])).min())
    # interpolate traces floor(side x factor) in float32: a factor half a pixel above `size` floors to it exactly;
    # recompute_scale_factor then samples the pixels at side / size, as eager PyTorch does
    factors = ((size + 0.5) / side).to(torch.float32)
    image = torch.nn.functional.interpolate(
        image[None], scale_factor=(factors[0], factors[1]), mode="bilinear", recompute_scale_factor=True
    )
    return image[0]


class ExactResize(GeneralizedRCNNTransform):
    """torchvision's transform, resizing an image to the size eager PyTorch gives it in the exported files too.

    Scripted and traced, torchvision computes the scale in float32, eager Python in float64: a 400 x 200 image with
    max_size 160 becomes 159 x 79 instead of 160 x 80 in both files, and every box moves by that 0.6 %. For inference
    (the files do not train); checked against torchvision 0.29, and tests/test_export.py compares the detections of
    such an image.
    """

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        if not torch.jit.is_scripting() and torch.jit.is_tracing():
            return traced_resize(image, self.min_size[-1], self.max_size), target
        height, width = image.shape[-2:]
        scale = min(float(self.min_size[-1]) / min(height, width), float(self.max_size) / max(height, width))
        size = [int(math.floor(height * scale)), int(math.floor(width * scale))]
        return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0], target


def describe(model, class_names, fmt, input_dtype, checkpoint):
    """The file's metadata, str -> str: what a user needs to call it and read its outputs."""
    model_args = dict(model.model_args)
    heads = getattr(model, "roi_heads", model)  # RetinaNet and FCOS keep score_thresh themselves
    if fmt == "torchscript":
        inputs = "uint8 0-255 or float32 0-1"
    else:
        inputs = "uint8 0-255" if input_dtype == "uint8" else "float32 0-1"
    return {
        "class_names": json.dumps(list(class_names)),
        "model": model_args["name"],
        "model_args": json.dumps(model_args),
        "input": f"image [3, H, W] RGB, {inputs}, any H and W; one image per call",
        "input_dtype": "uint8 or float32" if fmt == "torchscript" else input_dtype,
        "labels": "label k is class_names[k - 1]; 0 is the background and never returned",
        "score_thresh": str(heads.score_thresh),
        "min_size": str(model.transform.min_size[-1]),
        "max_size": str(model.transform.max_size),
        "requires": "onnxruntime" if fmt == "onnx" else "import torchvision before torch.jit.load (its nms, roi_align)",
        "checkpoint": os.path.basename(checkpoint),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def example_image(model):
    """A fixed random uint8 image to trace with: not square, and not already the model's input size."""
    generator = torch.Generator().manual_seed(0)
    side = model.transform.min_size[-1]
    return torch.randint(0, 256, (3, side * 3 // 4, side), dtype=torch.uint8, generator=generator)


@contextlib.contextmanager
def quiet_exporters():
    """Hide the warnings every export prints and no user acts on: torchvision's tracer and copy notes (its code was
    written for tracing), scripting's (losses, detections) note, torch.jit's and the legacy exporter's deprecations."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


def with_exact_resize(model, fmt):
    """A copy of `model` (the caller's stays as it is) whose transform is ExactResize."""
    t = model.transform
    if type(t) is not GeneralizedRCNNTransform or t.fixed_size is not None:
        raise SetupError(
            f"{model.model_args['name']} resizes with {type(t).__name__}(fixed_size={t.fixed_size}), which the "
            f"{fmt} export cannot reproduce exactly; deploy the checkpoint with predict.py instead"
        )
    model = copy.deepcopy(model)  # a shallow copy of a Module shares its submodules dict: the swap would reach it
    model.transform = ExactResize(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible)
    return model


def export_torchscript(model, path, metadata):
    """torch.jit.script of the Deployable model; metadata as _extra_files class_names.json and metadata.json."""
    with quiet_exporters():
        scripted = torch.jit.script(Deployable(with_exact_resize(model, "TorchScript")).eval())
        extra = {"class_names.json": metadata["class_names"], "metadata.json": json.dumps(metadata, indent=1)}
        torch.jit.save(scripted, path, _extra_files=extra)


def export_onnx(model, path, metadata, input_dtype="uint8", opset=ONNX_OPSET):
    """The Deployable model traced by torch.onnx's TorchScript-based exporter (torchvision's detectors are written for
    it), one image per call with dynamic height and width; metadata in the model's metadata_props."""
    onnx, _ = import_onnx()
    name = model.model_args["name"]
    model = with_exact_resize(model, "ONNX")
    wrapper = Deployable(model).eval()
    image = example_image(model)
    image = image if input_dtype == "uint8" else image.to(torch.float32) / 255
    with torch.no_grad():
        outputs = list(wrapper(image))  # boxes, labels, scores, (masks | keypoints, keypoints_scores), as torchvision
    axes = {"image": {1: "height", 2: "width"}, **{key: {0: "detections"} for key in outputs}}
    if "masks" in outputs:
        axes["masks"].update({2: "height", 3: "width"})
    try:
        with quiet_exporters(), torch.no_grad():
            torch.onnx.export(wrapper, (image,), path, dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=outputs, dynamic_axes=axes)  # fmt: skip
    except Exception as e:
        raise SetupError(
            f"torch.onnx could not export {name} ({type(e).__name__}: {e}); use --format torchscript"
        ) from e
    proto = onnx.load(path)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, path)


def is_onnx(path):
    """Whether an exported file is ONNX (a protobuf) rather than TorchScript (a zip archive), whatever its name."""
    with open(path, "rb") as f:
        return f.read(4) != b"PK\x03\x04"


def read_metadata(path):
    """The metadata of an exported file (either format), str -> str."""
    if is_onnx(path):
        _, onnxruntime = import_onnx()
        return dict(
            onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        )
    extra = {"metadata.json": ""}
    with quiet_exporters():
        torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return json.loads(extra["metadata.json"])


class Runner:
    """An exported file as a function: image tensor [3, H, W] (uint8 or float) -> dict of CPU tensors."""

    def __init__(self, path):
        self.onnx = is_onnx(path)
        if self.onnx:
            _, onnxruntime = import_onnx()
            options = onnxruntime.SessionOptions()
            # onnxruntime's threads spin between runs by default, and slow down the PyTorch model run beside it
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.names = [output.name for output in self.session.get_outputs()]
            self.uint8 = self.session.get_inputs()[0].type == "tensor(uint8)"
        else:
            with quiet_exporters():
                self.module = torch.jit.load(path, map_location="cpu").eval()

    def __call__(self, image):
        if not self.onnx:
            with quiet_exporters():  # scripted R-CNNs warn that they return (losses, detections): ours does not
                return self.module(image)
        if self.uint8 and image.is_floating_point():
            image = (image * 255).round().to(torch.uint8)  # exact for the images a uint8 file was read into
        elif not self.uint8 and not image.is_floating_point():
            image = image.to(torch.float32) * (1.0 / 255)
        outputs = self.session.run(None, {"image": image.numpy()})
        return {name: torch.from_numpy(output) for name, output in zip(self.names, outputs)}


def match(first, second):
    """Pairs (i, j) of the same detection in two outputs: same label, IoU above MATCH_IOU, best IoU first."""
    # boxes grown by half a pixel each way, so a zero-width box (a thin object, random weights) matches its twin
    grow = torch.tensor([-0.5, -0.5, 0.5, 0.5])
    iou = box_iou(first["boxes"] + grow, second["boxes"] + grow)
    iou[first["labels"][:, None] != second["labels"][None, :]] = 0
    pairs = []
    while iou.numel() and iou.max() > MATCH_IOU:
        i, j = divmod(int(iou.argmax()), iou.shape[1])
        pairs.append((i, j))
        iou[i, :], iou[:, j] = 0, 0
    return pairs


class Parity:
    """The largest differences between the matched detections of two models over many images, and the unmatched."""

    def __init__(self):
        self.matched = self.unmatched = self.detections = 0
        self.box_px = self.score = self.keypoint_px = 0.0
        self.mask_ious = []

    def add(self, eager, exported):
        pairs = match(eager, exported)
        self.detections += len(eager["boxes"]) + len(exported["boxes"])
        self.matched += len(pairs)
        self.unmatched += len(eager["boxes"]) + len(exported["boxes"]) - 2 * len(pairs)
        if not pairs:
            return
        i, j = (torch.tensor(index) for index in zip(*pairs))
        self.box_px = max(self.box_px, (eager["boxes"][i] - exported["boxes"][j]).abs().max().item())
        self.score = max(self.score, (eager["scores"][i] - exported["scores"][j]).abs().max().item())
        if "keypoints" in eager:
            xy = (eager["keypoints"][i, :, :2] - exported["keypoints"][j, :, :2]).abs()
            self.keypoint_px = max(self.keypoint_px, xy.max().item())
        if "masks" in eager:
            a, b = eager["masks"][i, 0] > 0.5, exported["masks"][j, 0] > 0.5  # torchvision's evaluation cut
            inter, union = (a & b).flatten(1).sum(1), (a | b).flatten(1).sum(1)
            self.mask_ious += torch.where(union > 0, inter / union.clamp(min=1), 1.0).tolist()

    def summary(self):
        result = {"matched": self.matched, "unmatched": self.unmatched, "box_px": self.box_px, "score": self.score}
        if self.mask_ious:
            result["mask_iou"] = sum(self.mask_ious) / len(self.mask_ious)
        return result


def coco_results(output, image_id):
    """One image's detections in COCO's results format, as engine.evaluate scores them."""
    results = [
        {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
        for box, label, score in zip(engine.xywh(output["boxes"]), output["labels"].tolist(), output["scores"].tolist())
    ]
    if "masks" in output:
        for result, rle in zip(results, engine.encode_masks(output["masks"][:, 0] > 0.5)):
            result["segmentation"] = rle
    if "keypoints" in output:
        for result, points in zip(results, output["keypoints"].flatten(1).tolist()):
            result["keypoints"] = points
    return results


def coco_ap(images, annotations, results, class_names, iou_type):
    """COCO AP (IoU .50:.95) of `results`, in points (0-100), silently."""
    coco_gt = engine.coco_from_records(images, [dict(a) for a in annotations], class_names)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, engine.load_results(coco_gt, images, results, class_names), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return 100 * max(float(coco_eval.stats[0]), 0.0)  # -1 (no ground truth of that kind) reads as 0
