"""Pascal VOC layout: PASCAL VOC 2007/2012, labelImg's output and many small public datasets (BCCD, for one).

    root/JPEGImages/<id>.jpg
    root/Annotations/<id>.xml         <annotation> <size><width/><height/></size>
                                        <object><name/><difficult/><bndbox><xmin/><ymin/><xmax/><ymax/></bndbox></object>
    root/ImageSets/Main/<split>.txt   one <id> per line (train, val, trainval, test)

VOC numbers pixels from 1 and includes both ends: xmin=1, xmax=10 is the first ten pixels, [0, 10] in the pixel-edge
coordinates of the contract. So x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax.
"""

import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from datasets.common import BoxChecker, choose_val_size, random_split, read_classes
from datasets.images import image_size
from extras.formats import BoxRecords
from utils import SetupError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")
# tried after the xml's <filename>: labelImg, CVAT and Roboflow write VOC folders of .jpg, .JPG, .jpeg and .png files
IMAGE_EXTENSIONS = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG")


def list_annotation_ids(root):
    """Sorted ids (file stems) of every root/Annotations/*.xml: the image list when ImageSets/Main has no split."""
    return sorted(p.stem for p in (Path(root) / "Annotations").glob("*.xml"))


def _number(node, tag, xml_path, default=None):
    """The number in node's <tag> (a path such as "size/width" works); `default` if the tag is missing or empty."""
    text = (node.findtext(tag) or "").strip()
    if not text and default is not None:
        return default
    try:
        return float(text)  # labelling tools write "273.5" as readily as "273"
    except ValueError:
        raise SetupError(f"{xml_path}: <{tag}> is {text!r}, expected a number") from None


def read_xml(xml_path):
    """The parsed root element of a VOC xml; a missing or broken file raises SetupError naming it."""
    try:
        return ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise SetupError(f"annotation {xml_path} not found, but the split lists it; fix the split file") from None
    except ET.ParseError as e:
        line, column = e.position
        raise SetupError(f"{xml_path}: invalid XML at line {line}, column {column} ({e}); fix or re-export it") from e


def find_image(root, image_id, xml_path, xml=None):
    """The image an xml annotates: JPEGImages/<its <filename>>, else JPEGImages/<id> with a common extension."""
    xml = read_xml(xml_path) if xml is None else xml
    filename = (xml.findtext("filename") or "").strip()
    folder = Path(root) / "JPEGImages"
    tried = [folder / Path(filename).name] if filename else []  # .name: the folder is ours, whatever the xml says
    tried += [folder / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS]
    for path in tried:
        if path.is_file():
            return path
    raise SetupError(
        f"image not found for {xml_path}; tried {', '.join(str(p) for p in tried)}. Restore the image, or fix "
        f"<filename> in the xml"
    )


def parse_annotation(xml_path, xml=None):
    """One VOC xml (or its parsed root `xml`) -> (width, height, objects), as written in the file.

    width and height are 0 when <size> is absent (some tools also write 0 there); objects is a list of
    (name, [xmin, ymin, xmax, ymax], difficult) in VOC's 1-based coordinates, difficult 0 when the tag is missing
    or empty.
    """
    root = read_xml(xml_path) if xml is None else xml
    width, height = int(_number(root, "size/width", xml_path, 0)), int(_number(root, "size/height", xml_path, 0))
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        bndbox = obj.find("bndbox")
        if not name or bndbox is None or any(bndbox.find(tag) is None for tag in BOX_TAGS):
            raise SetupError(
                f"{xml_path}: <object> number {i + 1} lacks <name> or <bndbox> with <xmin><ymin><xmax><ymax>; "
                f"every object needs both"
            )
        box = [_number(bndbox, tag, xml_path) for tag in BOX_TAGS]
        objects.append((name, box, int(_number(obj, "difficult", xml_path, 0) != 0)))
    return width, height, objects


class VOCDetection(BoxRecords):
    """Items are (image, target) following the contract in datasets/__init__.py; image_id is the index in the split.

    Images come from ImageSets/Main/{split}.txt, or from `split_ids` (xml stems) when the dataset ships no split.
    Objects marked difficult become iscrowd=1 regions: not trained on, and neither credited nor penalised in
    evaluation, which is how VOC's own metric treats them.
    """

    def __init__(self, root, split="train", classes=VOC_CLASSES, transforms=None, split_ids=None, strict=False):
        self.root = Path(root)
        self.classes = list(classes)
        self.transforms = transforms
        if split_ids is None:
            split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
            if not split_file.is_file():
                raise SetupError(
                    f"split file {split_file} not found. Check that --data-path is the folder holding Annotations/ "
                    f"and JPEGImages/; a dataset without ImageSets/Main takes split_ids (see list_annotation_ids)."
                )
            split_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        self.ids = list(split_ids)
        if not self.ids:
            raise SetupError(f"no images in split {split!r} of {self.root}; expected xml files in Annotations/")

        label_of = {name: k for k, name in enumerate(self.classes, start=1)}
        unknown = {}  # class name not in classes -> first xml that uses it
        found = set()  # every class name the annotations use
        checker = BoxChecker(self.root / "Annotations", strict)
        self.items = []  # per image: path, size, and its kept boxes, labels and iscrowd
        for image_id in self.ids:
            xml_path = self.root / "Annotations" / f"{image_id}.xml"
            xml = read_xml(xml_path)
            image_path = find_image(self.root, image_id, xml_path, xml)
            width, height, objects = parse_annotation(xml_path, xml)
            if not width or not height:
                height, width = image_size(image_path)  # from the header, upright
            for name, _, _ in objects:
                found.add(name)
                if name not in label_of:
                    unknown.setdefault(name, xml_path)
            raw = torch.tensor([box for _, box, _ in objects], dtype=torch.float32).reshape(-1, 4)
            # xmax == xmin is a click without a drag in the labelling tool, not a 1-pixel object: drop it, as the
            # other formats drop boxes of width 0.
            valid = (raw[:, 2] > raw[:, 0]) & (raw[:, 3] > raw[:, 1])
            boxes, keep = checker(raw - torch.tensor([1.0, 1.0, 0.0, 0.0]), valid, height, width, xml_path.name)
            labels = torch.tensor([label_of.get(name, 0) for name, _, _ in objects], dtype=torch.int64)
            iscrowd = torch.tensor([difficult for _, _, difficult in objects], dtype=torch.int64)
            self.items.append(
                {
                    "path": image_path,
                    "height": height,
                    "width": width,
                    "boxes": boxes[keep],
                    "labels": labels[keep],
                    "iscrowd": iscrowd[keep],
                }
            )
        if unknown:
            name, xml_path = next(iter(unknown.items()))
            # without --classes (the 20 VOC names) suggest what the files use; else the given names, then the new ones
            default = self.classes == list(VOC_CLASSES)
            everything = sorted(found) if default else self.classes + sorted(unknown)
            raise SetupError(
                f"{xml_path}: class {name!r} is not one of the classes ({', '.join(self.classes)}); the annotations "
                f"use {len(unknown)} unknown names: {', '.join(sorted(unknown))}.\n"
                f"  Pass every class name, e.g. --classes {','.join(everything)} (the order sets the labels)."
            )
        checker.warn()

    def size_fix(self, item):
        return (
            f"its xml <size> says {item['width']}x{item['height']}; fix <size> in Annotations/{item['path'].stem}.xml"
        )

    def __repr__(self):
        return f"VOCDetection(root={str(self.root)!r}, {len(self)} images, classes={self.classes})"


def get_voc(root, train_transforms, val_transforms, classes=None, train_split="train", val_split="val",
            val_size=None, split_seed=0, strict=False):  # fmt: skip
    """Pascal VOC layout; without ImageSets/Main/{split}.txt every xml in Annotations/ is used, split seeded."""
    classes = read_classes(classes) if classes else list(VOC_CLASSES)
    if (Path(root) / "ImageSets" / "Main" / f"{train_split}.txt").is_file():
        train_ids = val_ids = None
    else:
        ids = list_annotation_ids(root)
        train_idx, val_idx = random_split(len(ids), choose_val_size(len(ids), val_size), split_seed)
        train_ids, val_ids = [ids[i] for i in train_idx], [ids[i] for i in val_idx]
    train = VOCDetection(root, train_split, classes, train_transforms, split_ids=train_ids, strict=strict)
    val = VOCDetection(root, val_split, classes, val_transforms, split_ids=val_ids, strict=strict)
    return train, val, list(classes)
