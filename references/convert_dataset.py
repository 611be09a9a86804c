"""Convert detection annotations between Pascal VOC xml, COCO json and mmdetection's list of dicts (.json / .pkl).

    python references/convert_dataset.py --from voc --data-path ROOT [--split train] [--classes a,b] \
        --to coco --out train.json
    python references/convert_dataset.py --from coco --ann-file instances.json --img-prefix IMAGES \
        --to custom --out train.json
    python references/convert_dataset.py --from custom --ann-file train.json --img-prefix IMAGES --classes a,b \
        --to coco --out coco.json
    python references/convert_dataset.py --from coco --ann-file instances.json --img-prefix IMAGES \
        --to voc --out DIR [--split train]
    python references/convert_dataset.py --from coco --ann-file instances.json --img-prefix IMAGES \
        --to coco --out tiles/train.json --tile 800 [--tile-overlap 0.2 --min-visible 0.3 --max-empty-share 0.2]
    python references/convert_dataset.py --from voc --data-path ROOT --split val --to yolo --out DIR
    python references/convert_dataset.py --from yolo --data-path DIR [--split val] --to voc --out VOC_DIR

Only annotations are read (sizes from the annotation, or from an image header when a VOC xml has none) and written:
images are never decoded, copied or moved. File names in the output are relative to the same image folder as the
input's: ROOT/JPEGImages for VOC, --img-prefix for COCO and the list of dicts. What is written where:
    coco    one json; category ids 1..K in class order; box-only (segmentation is not converted)
    custom  FILE.json or FILE.pkl, plus the class names, one a line, in FILE.classes.txt (labels index into them)
    voc     DIR/Annotations/<id>.xml, DIR/ImageSets/Main/<split>.txt, DIR/classes.txt, and DIR/JPEGImages as a
            symbolic link to the image folder (VOC reads DIR/JPEGImages/<id>.jpg, so only .jpg images convert)

Ignored regions map onto each other: VOC difficult=1 <-> COCO iscrowd=1 <-> bboxes_ignore / labels_ignore.
Classes: a COCO file names its own, in sorted category-id order; a list of dicts needs --classes; VOC takes --classes
or, without it, the names found in the xml files, sorted (for Pascal VOC itself that is the usual 20-class order).
Boxes the dataset classes would drop (zero width or height, wholly outside the image) are dropped and boxes crossing
the border clipped, with the same warning as the dataset classes give, so the output holds what training would see.
The output is then loaded back with the project's dataset class, and its image and box counts checked against the
input's. Exit code 2 with one "error: ..." line on a bad flag, an unreadable input or a count mismatch.

--tile SIZE cuts a COCO dataset's images into overlapping tiles for training a detector for small objects in large
images (extras/tiling.py; the only mode that decodes and writes images): tiles/train.json gets the annotations, the
folder tiles/train/ the tile images (<stem>_<x0>_<y0>.<ext>). Boxes are clipped to each tile, and a remnant keeping
under --min-visible of its box's area is dropped; segmentations are cut to the tile too (written as RLE).

YOLO (extras/formats/yolo.py) keeps its labels in DIR/labels/ beside DIR/images/, so --to yolo links each image (a
copy where links fail) into DIR/images/SPLIT/ and writes DIR/labels/SPLIT/*.txt and a DIR/data.yaml naming every
split written so far: run it once per split (--split train, val or test; default train). Coordinates get 10
decimals, so a box comes back within 1e-6 px on images up to 10000 px. YOLO cannot mark an ignored region: ignored
boxes (VOC difficult, COCO iscrowd, bboxes_ignore) are dropped and counted in the output, as Ultralytics' own VOC
conversion drops difficult objects. --from yolo reads data.yaml's --split (default train) with the image sizes from
the headers; a polygon row becomes its bounding box.
"""

import argparse
import json
import os
import pickle
import shutil
import sys
import warnings
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the core is one folder up

from datasets import coco  # noqa: E402
from datasets.coco import CocoDetection  # noqa: E402
from datasets.common import BoxChecker, read_classes  # noqa: E402
from datasets.images import image_size  # noqa: E402
from extras.formats import yolo  # noqa: E402
from extras.formats.custom import CustomDataset, boxes_and_labels, load_middle_format  # noqa: E402
from extras.formats.voc import (  # noqa: E402
    BOX_TAGS,
    VOCDetection,
    find_image,
    list_annotation_ids,
    parse_annotation,
    read_xml,
)
from utils import SetupError, cli  # noqa: E402

FORMATS = ("voc", "coco", "custom", "yolo")
DEFAULT_VOC_SPLIT = "trainval"  # the split file --to voc writes when --split is not given
YOLO_SPLITS = ("train", "val", "test")  # the keys of data.yaml; --from yolo and --to yolo default to train
YOLO_DIGITS = 10  # decimals of a YOLO coordinate: 0.5e-10 of a 10000 px side is 0.5e-6 px

# Records, the common form every reader returns and every writer takes, one dict per image:
#   {"file_name": path relative to the image folder, "width": int, "height": int,
#    "boxes": [[x1, y1, x2, y2], ...] float pixel edges (0-based, x2 = x1 + width), "labels": [0-based class index],
#    "ignore": [0 or 1]}   (readers add "valid": [bool], the format's own box test, consumed by drop_and_clip)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("input")
    source.add_argument("--from", dest="from_format", default=None, choices=FORMATS, help="input format (required)")
    source.add_argument(
        "--data-path",
        "--img-prefix",
        default=None,
        type=str,
        help="voc: the root holding Annotations/ and JPEGImages/ (required); yolo: data.yaml or its folder "
        "(required); coco, custom: the folder image file names are relative to, needed to load the output back "
        "(default: the folder of --ann-file)",
    )
    source.add_argument("--ann-file", default=None, type=str, help="coco json, or custom .json/.pkl (required there)")
    source.add_argument(
        "--split",
        default=None,
        type=str,
        help="voc input: read ImageSets/Main/SPLIT.txt (default: every xml in Annotations/); "
        f"voc output: the split file to write (default {DEFAULT_VOC_SPLIT}); yolo input and output: train, val "
        "or test (default train)",
    )
    source.add_argument(
        "--classes",
        default=None,
        type=str,
        help="class names, a,b,c or a classes.txt: required for custom input; voc input: default the names found, "
        "sorted; coco input: from its categories; yolo input: from data.yaml",
    )
    target = parser.add_argument_group("output")
    target.add_argument("--to", dest="to_format", default=None, choices=FORMATS, help="output format (required)")
    target.add_argument(
        "--out", default=None, type=str, help="coco: FILE.json; custom: FILE.json or .pkl; voc, yolo: DIR (required)"
    )
    target.add_argument(
        "--workers",
        default=os.cpu_count() or 1,
        type=int,
        help=f"processes reading and writing VOC xml files (default os.cpu_count(), here {os.cpu_count()})",
    )
    tiles = parser.add_argument_group("tiles (--from coco --to coco)")
    tiles.add_argument(
        "--tile", default=0, type=int, help="cut images into tiles of this many px square (default 0: off)"
    )
    tiles.add_argument(
        "--tile-overlap", default=0.2, type=float, help="share of a tile its neighbours also hold (default 0.2)"
    )
    tiles.add_argument(
        "--min-visible",
        default=0.3,
        type=float,
        help="drop a box's remnant on a tile keeping under this share of the box's area (default 0.3)",
    )
    tiles.add_argument(
        "--max-empty-share",
        default=0.2,
        type=float,
        help="at most this share of the tiles written hold no object; the others are dropped at random (default 0.2)",
    )
    tiles.add_argument("--seed", default=0, type=int, help="seed choosing the empty tiles kept (default 0)")
    return parser


def check_args(args):
    """Every flag problem before any file is read."""
    if args.from_format is None or args.to_format is None or args.out is None:
        raise SetupError(f"pass --from and --to (one of {', '.join(FORMATS)}) and --out")
    if args.tile:
        if args.from_format != "coco" or args.to_format != "coco":
            raise SetupError("--tile cuts a COCO dataset into COCO tiles: pass --from coco --to coco")
        if args.tile < 32 or not 0 <= args.tile_overlap < 1:
            raise SetupError("--tile is a size in pixels (>= 32) and --tile-overlap a fraction, 0 <= R < 1")
        if not 0 <= args.min_visible <= 1 or not 0 <= args.max_empty_share <= 1:
            raise SetupError("--min-visible and --max-empty-share are fractions, between 0 and 1")
    elif args.from_format == args.to_format:
        raise SetupError(f"--from and --to are both {args.from_format}: nothing to convert")
    if args.from_format == "voc" and not args.data_path:
        raise SetupError("--from voc needs --data-path ROOT (the folder holding Annotations/ and JPEGImages/)")
    if args.from_format == "yolo" and (not args.data_path or args.classes):
        raise SetupError("--from yolo needs --data-path (data.yaml or its folder), which names the classes")
    if "yolo" in (args.from_format, args.to_format) and args.split not in (None, *YOLO_SPLITS):
        raise SetupError(f"--split {args.split}: a YOLO data.yaml has the splits {', '.join(YOLO_SPLITS)}")
    if args.from_format not in ("voc", "yolo") and not args.ann_file:
        raise SetupError(f"--from {args.from_format} needs --ann-file FILE")
    if args.from_format == "custom" and not args.classes:
        raise SetupError("--from custom needs --classes a,b,c (or classes.txt): the file stores only label indices")
    if args.from_format == "coco" and args.classes:
        raise SetupError("--from coco takes the class names from the file's categories; drop --classes")
    suffixes = {"coco": (".json",), "custom": (".json", ".pkl"), "voc": None, "yolo": None}[args.to_format]
    if suffixes and Path(args.out).suffix not in suffixes:
        raise SetupError(f"--to {args.to_format} writes a {' or '.join(suffixes)} file; got --out {args.out}")
    if args.to_format in ("voc", "yolo") and Path(args.out).is_file():
        raise SetupError(f"--to {args.to_format} writes a folder, and {args.out} is a file")
    if args.workers < 1:
        raise SetupError("--workers must be >= 1")


def parallel_map(function, tasks, workers, what):
    """[function(task) for task in tasks], in order, on `workers` processes, with a "\\r[n/N] what" line on stderr."""
    total = len(tasks)
    # about 100 updates on a terminal; in a log file (where \r does not go back) only the last one
    every = max(1, total // 100) if sys.stderr.isatty() else total

    def progress(results):
        for n, result in enumerate(results, start=1):
            if n % every == 0 or n == total:
                print(f"\r[{n}/{total}] {what}", end="\n" if n == total else "", file=sys.stderr, flush=True)
            yield result

    if workers == 1 or total < 2:
        return list(progress(map(function, tasks)))
    with ProcessPoolExecutor(min(workers, total)) as pool:
        # chunks of several files: one xml is far cheaper than a round trip to a worker process
        return list(progress(pool.map(function, tasks, chunksize=max(1, total // (4 * workers)))))


def coordinate(value):
    """A coordinate as written to json or xml: an int when whole, else rounded to 1e-6 px.

    (xmin - 1) + 1 can differ from xmin in the last bit of a float; the rounding makes 273.3 come back as 273.3.
    """
    value = round(float(value), 6)
    return int(value) if value.is_integer() else value


# ------------------------------------------------------------------------------------------------ readers
def _read_voc_xml(task):
    """Worker: (xml path, image path) -> parse_annotation's (width, height, objects), the size from the image
    header when the xml has none."""
    xml_path, root, image_id = task
    xml = read_xml(xml_path)
    width, height, objects = parse_annotation(xml_path, xml)
    if not width or not height:
        height, width = image_size(find_image(root, image_id, xml_path, xml))  # the header's, upright
    return width, height, objects


def read_voc(root, split, classes, workers):
    """-> (records, class names, image folder) from ROOT/Annotations, the ids of ImageSets/Main/SPLIT.txt or all."""
    root = Path(root)
    if split:
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise SetupError(f"split file {split_file} not found; pass an existing --split, or none for every xml")
        ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    else:
        ids = list_annotation_ids(root)
    if not ids:
        raise SetupError(f"no annotations found in {root / 'Annotations'} (split {split or 'all'})")
    tasks = [(root / "Annotations" / f"{i}.xml", root, i) for i in ids]
    parsed = parallel_map(_read_voc_xml, tasks, workers, "xml files read")

    found = sorted({name for _, _, objects in parsed for name, _, _ in objects})
    classes = read_classes(classes) if classes else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SetupError(
            f"the xml files use class names that are not in --classes: {', '.join(unknown)}; pass every class name, "
            f"e.g. --classes {','.join(list(classes) + unknown)} (the order sets the labels)"
        )
    index = {name: k for k, name in enumerate(classes)}
    records = []
    for image_id, (width, height, objects) in zip(ids, parsed):
        records.append(
            {
                "file_name": f"{image_id}.jpg",
                "width": int(width),
                "height": int(height),
                # VOC is 1-based and includes both ends: pixel edges x1 = xmin - 1, x2 = xmax (extras/formats/voc.py)
                "boxes": [[xmin - 1, ymin - 1, xmax, ymax] for _, (xmin, ymin, xmax, ymax), _ in objects],
                "labels": [index[name] for name, _, _ in objects],
                "ignore": [difficult for _, _, difficult in objects],
                # VOCDetection's test: xmax == xmin is a click without a drag, not a 1-pixel object
                "valid": [xmax > xmin and ymax > ymin for _, (xmin, ymin, xmax, ymax), _ in objects],
            }
        )
    return records, classes, root / "JPEGImages"


def read_coco(ann_file):
    """-> (records, class names) from a COCO json; images in id order and classes in category-id order, as
    CocoDetection numbers them. Segmentations are not read: the other formats hold boxes only."""
    categories, images, anns_per_image = coco.read_coco(ann_file)
    if any(ann.get("segmentation") for anns in anns_per_image.values() for ann in anns):
        print(f"note: {ann_file} has segmentations; they are not converted (boxes only)")
    index = {c["id"]: k for k, c in enumerate(categories)}
    records = []
    for im in images:
        anns = anns_per_image[im["id"]]
        records.append(
            {
                "file_name": im["file_name"],
                "width": int(im["width"]),
                "height": int(im["height"]),
                "boxes": [[x, y, x + w, y + h] for x, y, w, h in (ann["bbox"] for ann in anns)],
                "labels": [index[ann["category_id"]] for ann in anns],
                "ignore": [1 if ann.get("iscrowd") else 0 for ann in anns],
                "valid": [w > 0 and h > 0 for _, _, w, h in (ann["bbox"] for ann in anns)],
            }
        )
    return records, [c["name"] for c in categories]


def read_custom(ann_file, classes):
    """-> (records, class names) from mmdetection's list of dicts; ignored boxes follow the others in each image."""
    classes = read_classes(classes)
    records = []
    for n, entry in enumerate(load_middle_format(ann_file)):
        where = f"{ann_file}, entry {n}"
        try:
            file_name, width, height = entry["filename"], int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError) as e:
            raise SetupError(f"{where}: every entry needs filename, width and height ({e!r})") from None
        ann = entry.get("ann") or {}  # test-set files have no "ann"
        # float64: the coordinates exactly as written (the dataset class reads float32, enough to train on)
        boxes, labels = boxes_and_labels(ann, "bboxes", "labels", where, dtype=np.float64)
        ignore_boxes, ignore_labels = boxes_and_labels(ann, "bboxes_ignore", "labels_ignore", where, np.float64)
        labels = np.concatenate([labels, ignore_labels])
        if ((labels < 0) | (labels >= len(classes))).any():
            raise SetupError(
                f"{where}: labels must be 0..{len(classes) - 1} (0-based, one per class name), found "
                f"{sorted(set(labels.tolist()))}; pass every class name in --classes"
            )
        boxes = np.concatenate([boxes, ignore_boxes])
        records.append(
            {
                "file_name": file_name,
                "width": width,
                "height": height,
                "boxes": boxes.tolist(),
                "labels": labels.tolist(),
                "ignore": [0] * (len(labels) - len(ignore_labels)) + [1] * len(ignore_labels),
                "valid": ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist(),
            }
        )
    return records, classes


def read_yolo(data_path, split, workers):
    """-> (records, class names, image folder) of data.yaml's split; sizes from the image headers, polygon rows as
    their bounds, malformed rows dropped with the dataset class's warning."""
    yaml_path, classes, splits = yolo.read_data_yaml(data_path)
    if not splits[split]:
        there = " or ".join(s for s in splits if splits[s])
        raise SetupError(f"{yaml_path} has no {split} split; pass --split {there}")
    paths = yolo.list_images(splits[split])
    if not paths:
        raise SetupError(f"{yaml_path}: no images in the {split} split ({', '.join(map(str, splits[split]))})")
    folder = Path(os.path.commonpath([p.parent for p in paths]))  # file names are relative to it
    sizes = parallel_map(image_size, paths, workers, "image headers read")  # (height, width), upright
    bad_rows, records, polygons = [], [], 0
    for path, (height, width) in zip(paths, sizes):
        rows = yolo.read_labels(yolo.label_path(path), len(classes), bad_rows)
        polygons += sum(len(values) > 4 for _, values, _ in rows)
        boxes = [yolo.pixel_box(values, width, height) for _, values, _ in rows]  # whole pixels come back whole
        records.append(
            {
                "file_name": path.relative_to(folder).as_posix(),
                "width": width,
                "height": height,
                "boxes": boxes,
                "labels": [cls for cls, _, _ in rows],
                "ignore": [0] * len(rows),
                "valid": [x2 > x1 and y2 > y1 for x1, y1, x2, y2 in boxes],
            }
        )
    yolo.report_bad_rows(bad_rows, yaml_path, strict=False)
    if polygons:
        print(f"note: {polygons} polygon rows are converted to their bounding boxes (segmentation is not converted)")
    return records, classes, folder


def drop_and_clip(records, source):
    """Drop the boxes the dataset classes drop and clip those they clip, with their warning (common.BoxChecker).

    BoxChecker decides on float32 tensors, as the dataset classes do; the clipping itself is redone here in float64
    so that every coordinate inside the image stays exactly as written.
    """
    checker = BoxChecker(source)
    for record in records:
        width, height = record["width"], record["height"]
        boxes = torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4)
        valid = torch.tensor(record.pop("valid"), dtype=torch.bool)
        _, keep = checker(boxes, valid, height, width, record["file_name"])
        keep = keep.tolist()
        record["boxes"] = [
            [min(max(x1, 0), width), min(max(y1, 0), height), min(max(x2, 0), width), min(max(y2, 0), height)]
            for (x1, y1, x2, y2), k in zip(record["boxes"], keep)
            if k
        ]
        record["labels"] = [label for label, k in zip(record["labels"], keep) if k]
        record["ignore"] = [ignore for ignore, k in zip(record["ignore"], keep) if k]
    checker.warn()
    return records


# ------------------------------------------------------------------------------------------------ writers
def write_coco(records, classes, out):
    """One json; image ids 1..N in record order, category ids 1..K in class order, box-only annotations."""
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append(
            {"id": image_id, "file_name": record["file_name"], "width": record["width"], "height": record["height"]}
        )
        for (x1, y1, x2, y2), label, ignore in zip(record["boxes"], record["labels"], record["ignore"]):
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [coordinate(v) for v in (x1, y1, w, h)],
                    "area": coordinate(w * h),
                    "iscrowd": ignore,  # an ignored region with a box and no segmentation
                }
            )
    categories = [{"id": k, "name": name} for k, name in enumerate(classes, start=1)]
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def classes_file_of(out):
    """Where --to custom puts the class names: train.json -> train.classes.txt."""
    return Path(out).with_suffix(".classes.txt")


def write_custom(records, classes, out):
    """mmdetection's list of dicts; a .pkl holds numpy arrays (float32 boxes, int64 labels) as mmcv.dump writes."""
    pkl = Path(out).suffix == ".pkl"
    entries = []
    for record in records:
        ann = {}
        for flag, box_key, label_key in ((0, "bboxes", "labels"), (1, "bboxes_ignore", "labels_ignore")):
            chosen = [i for i, ignore in enumerate(record["ignore"]) if ignore == flag]
            boxes = [[coordinate(v) for v in record["boxes"][i]] for i in chosen]
            labels = [record["labels"][i] for i in chosen]
            if pkl:  # mmdetection indexes these as arrays, shape (0, 4) when empty
                boxes, labels = np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64)
            ann[box_key], ann[label_key] = boxes, labels
        entries.append(
            {"filename": record["file_name"], "width": record["width"], "height": record["height"], "ann": ann}
        )
    if pkl:
        with open(out, "wb") as f:
            pickle.dump(entries, f)
    else:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(entries, f)
    classes_file_of(out).write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")


def _write_voc_xml(task):
    """Worker: (xml path, width, height, objects) -> the xml file; objects as parse_annotation returns them."""
    xml_path, width, height, objects = task
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = f"{xml_path.stem}.jpg"
    size = ET.SubElement(root, "size")
    # depth is not known without decoding the image; 3 (RGB) is what VOC and labelImg write for colour images
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(difficult)
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(BOX_TAGS, box):
            ET.SubElement(bndbox, tag).text = str(value)
    ET.indent(root)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(xml_path, encoding="utf-8")


def voc_ids(records):
    """The VOC id of each record (its file name without .jpg); refuses what the VOC layout cannot hold."""
    ids = []
    for record in records:
        path = Path(record["file_name"])
        if path.is_absolute() or ".." in path.parts or any(c.isspace() for c in record["file_name"]):
            raise SetupError(f"{record['file_name']!r}: a VOC id must be a relative path without '..' or spaces")
        ids.append(path.with_suffix("").as_posix())
    not_jpg = [r["file_name"] for r in records if Path(r["file_name"]).suffix != ".jpg"]
    if not_jpg:
        raise SetupError(
            f"the VOC layout holds JPEGImages/<id>.jpg only, and {len(not_jpg)} images are not .jpg (first: "
            f"{not_jpg[0]}); convert them to JPEG first, or use --to coco / --to custom"
        )
    if len(set(ids)) != len(ids):
        raise SetupError("two images share a file name; the VOC layout needs one xml per image")
    return ids


def write_voc(records, classes, out, split, images, workers):
    """DIR/Annotations/<id>.xml, DIR/ImageSets/Main/<split>.txt, DIR/classes.txt and the DIR/JPEGImages link."""
    out = Path(out)
    ids = voc_ids(records)
    tasks = []
    for image_id, record in zip(ids, records):
        objects = [
            # pixel edges back to VOC's 1-based inclusive numbering: xmin = x1 + 1, xmax = x2
            (classes[label], [coordinate(v) for v in (x1 + 1, y1 + 1, x2, y2)], ignore)
            for (x1, y1, x2, y2), label, ignore in zip(record["boxes"], record["labels"], record["ignore"])
        ]
        tasks.append((out / "Annotations" / f"{image_id}.xml", record["width"], record["height"], objects))
    parallel_map(_write_voc_xml, tasks, workers, "xml files written")
    (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    link = out / "JPEGImages"
    if not link.exists() and not link.is_symlink():
        try:  # a link, not a copy: the output folder is a complete VOC root at no disk cost
            link.symlink_to(Path(images).resolve(), target_is_directory=True)
        except OSError as e:
            raise SetupError(f"could not link {link} to {images} ({e}); copy the images there and rerun") from None


def write_yolo(records, classes, out, split, images):
    """DIR/images/SPLIT/<file> (links), DIR/labels/SPLIT/<file>.txt, DIR/data.yaml; -> how many images were copied.

    Ignored boxes must be gone already (main drops them): a YOLO row cannot say "ignore"."""
    out = Path(out)
    image_dir, label_dir = out / "images" / split, out / "labels" / split
    if image_dir.exists() or label_dir.exists():  # old files would stay beside the new ones
        raise SetupError(f"{image_dir} or {label_dir} exists already; remove it, or pass another --out")
    names = [Path(record["file_name"]) for record in records]
    stems = [name.with_suffix("").as_posix() for name in names]
    if any(name.is_absolute() or ".." in name.parts for name in names) or len(set(stems)) != len(stems):
        raise SetupError("YOLO needs relative image paths without '..', and one label file per name (a.jpg and a.png)")
    unlisted = [n for n in names if n.suffix.lower() not in yolo.IMAGE_SUFFIXES]
    if unlisted:
        raise SetupError(f"{len(unlisted)} images have a suffix YOLO does not list as an image (first: {unlisted[0]})")
    if (out / "data.yaml").is_file():  # a split written before: the classes must be the same
        written = yolo.read_names(yolo.load_yaml(out / "data.yaml"), out / "data.yaml")
        if written != list(classes):
            raise SetupError(f"{out / 'data.yaml'} names the classes {written}, this split {list(classes)}")
    copied = 0
    for name, record in zip(names, records):
        (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
        try:  # a link: no disk cost, and the images stay where they are
            (image_dir / name).symlink_to((Path(images) / name).resolve())
        except OSError:  # (Windows without developer mode, some network drives)
            shutil.copy2(Path(images) / name, image_dir / name)
            copied += 1
        width, height = record["width"], record["height"]
        rows = []
        for (x1, y1, x2, y2), label in zip(record["boxes"], record["labels"]):
            values = ((x1 + x2) / (2 * width), (y1 + y2) / (2 * height), (x2 - x1) / width, (y2 - y1) / height)
            rows.append(f"{label} " + " ".join(f"{v:.{YOLO_DIGITS}f}" for v in values) + "\n")
        (label_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (label_dir / name).with_suffix(".txt").write_text("".join(rows))  # empty: a negative
    splits = [s for s in YOLO_SPLITS if (out / "images" / s).is_dir()]
    lines = ["# references/convert_dataset.py; the splits are relative to this file's folder"]
    lines += [f"{s}: images/{s}" for s in splits] + [f"nc: {len(classes)}", f"names: {json.dumps(list(classes))}"]
    (out / "data.yaml").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")  # JSON is valid YAML
    return copied


# ------------------------------------------------------------------------------------------------ checks
def count_boxes(records, num_classes):
    """int64 [K, 2]: per class, the boxes (ignored ones included) and the ignored boxes among them."""
    counts = np.zeros((num_classes, 2), dtype=np.int64)
    for record in records:
        for label, ignore in zip(record["labels"], record["ignore"]):
            counts[label] += (1, ignore)
    return counts


def load_back(to_format, out, classes, images, split):
    """The output through the project's dataset class (no image decoded), and its [K, 2] counts as count_boxes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # drop_and_clip warned already; a difference shows in the counts
        if to_format == "coco":
            ds = CocoDetection(images, out)
            found = [
                {
                    "labels": [ds.category_id_to_label[ann["category_id"]] - 1 for ann in record["anns"]],
                    "ignore": [1 if ann.get("iscrowd") else 0 for ann in record["anns"]],
                }
                for record in ds.images
            ]
        else:
            if to_format == "yolo":
                ds = yolo.YOLODataset(yolo.list_images([Path(out) / "images" / split]), classes)
            else:
                ds = CustomDataset(out, images, classes) if to_format == "custom" else VOCDetection(out, split, classes)
            found = [{"labels": (i["labels"] - 1).tolist(), "ignore": i["iscrowd"].tolist()} for i in ds.items]
    return ds, count_boxes(found, len(classes))


def drop_ignored(record):
    """The record without its ignored boxes."""
    keep = [not ignore for ignore in record["ignore"]]
    return record | {key: [v for v, k in zip(record[key], keep) if k] for key in ("boxes", "labels", "ignore")}


def print_summary(records, classes, counts):
    print(f"{len(records)} images, {counts[:, 0].sum()} boxes, of which {counts[:, 1].sum()} ignored")
    width = max(len("class"), *(len(name) for name in classes))
    print(f"  {'class':<{width}} {'boxes':>7} {'ignored':>7}")
    for name, (boxes, ignored) in zip(classes, counts.tolist()):
        print(f"  {name:<{width}} {boxes:>7} {ignored:>7}")


def tile_dataset(args):
    """--tile: a COCO dataset cut into training tiles (extras/tiling.py), loaded back with CocoDetection."""
    from extras import tiling  # tiles of large images

    images, out = Path(args.data_path or Path(args.ann_file).parent), Path(args.out)
    folder = out.with_suffix("")
    if folder.resolve() == images.resolve():
        raise SetupError(f"the tiles would go into the image folder {images}; pass another --out")
    counts = tiling.cut_coco(
        args.ann_file, images, out, args.tile, args.tile_overlap, args.min_visible, args.max_empty_share, args.seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (tiles without objects are meant)
        ds = CocoDetection(folder, out)
    if len(ds) != counts["tiles"] or sum(len(r["anns"]) for r in ds.images) != counts["annotations"]:
        raise SetupError(f"wrote {out}, but it loads back as {len(ds)} tiles; expected {counts['tiles']}")
    print(
        f"wrote {counts['tiles']} tiles of {args.tile} px ({counts['empty_tiles']} without objects; "
        f"{counts['empty_dropped']} more dropped by --max-empty-share {args.max_empty_share}) and "
        f"{counts['annotations']} annotations to {out}; {counts['remnants']} box remnants under --min-visible "
        f"{args.min_visible} dropped\nimages: {folder} (train.py --train-images)"
    )
    return counts


def main(args):
    check_args(args)
    if args.tile:
        return tile_dataset(args)
    if args.from_format == "voc":
        records, classes, images = read_voc(args.data_path, args.split, args.classes, args.workers)
        source = Path(args.data_path) / "Annotations"
    elif args.from_format == "yolo":
        records, classes, images = read_yolo(args.data_path, args.split or "train", args.workers)
        source = images
    else:
        if args.from_format == "coco":
            records, classes = read_coco(args.ann_file)
        else:
            records, classes = read_custom(args.ann_file, args.classes)
        images, source = Path(args.data_path or Path(args.ann_file).parent), args.ann_file
    print(f"read {len(records)} images from {source}; classes: {', '.join(classes)}")
    # the check after writing loads the output with the dataset classes, which insist on every image being there
    missing = [r["file_name"] for r in records if not (images / r["file_name"]).is_file()]
    if missing:
        fix = "pass --img-prefix DIR, the folder they are relative to"
        fix = "restore them" if args.from_format in ("voc", "yolo") else fix
        raise SetupError(
            f"{len(missing)} of the {len(records)} images are not in {images} (first: {missing[0]}); {fix}: the "
            f"output is checked by loading it with its images"
        )
    records = drop_and_clip(records, source)
    ignored = sum(sum(record["ignore"]) for record in records)
    if args.to_format == "yolo":  # a YOLO row cannot say "ignore": drop them, as Ultralytics' VOC conversion does
        records = [drop_ignored(record) for record in records]
    expected = count_boxes(records, len(classes))

    out = Path(args.out)
    split = args.split or ("train" if args.to_format == "yolo" else DEFAULT_VOC_SPLIT)
    (out if args.to_format in ("voc", "yolo") else out.parent).mkdir(parents=True, exist_ok=True)
    if args.to_format == "coco":
        write_coco(records, classes, out)
    elif args.to_format == "custom":
        write_custom(records, classes, out)
    elif args.to_format == "yolo":
        copied = write_yolo(records, classes, out, split, images)
    else:
        write_voc(records, classes, out, split, images, args.workers)

    try:
        ds, found = load_back(args.to_format, out, classes, images, split)
    except SetupError as e:
        raise SetupError(f"wrote {out}, but it does not load back with the images in {images}: {e}") from None
    if len(ds) != len(records) or not np.array_equal(found, expected):
        differ = [f"{name} {e} -> {f}" for name, e, f in zip(classes, expected.tolist(), found.tolist()) if e != f]
        hint = " (VOC drops boxes 1 px wide or high or less: xmax == xmin reads as a click)" * (args.to_format == "voc")
        raise SetupError(
            f"wrote {out}, but it loads back as {len(ds)} images (input: {len(records)}) and [boxes, ignored] per "
            f"class differ: {'; '.join(differ) or 'none'}{hint}"
        )
    print(f"wrote {out} ({args.to_format}); it loads back with the same images and boxes")
    if args.to_format == "custom":
        print(f"classes: {classes_file_of(out)} (pass it as --classes); images: {images}")
    elif args.to_format == "voc":
        linked = f"a link to {images}" if (out / "JPEGImages").is_symlink() else "already there"
        print(f"classes: {out / 'classes.txt'}; images: {out / 'JPEGImages'} ({linked}; images are never copied)")
    elif args.to_format == "yolo":
        how = f"{copied} copied, {len(records) - copied} linked" if copied else f"links to {images}"
        print(f"data.yaml: {out / 'data.yaml'}; images: {out / 'images' / split} ({how}); train.py --dataset yolo")
        print(f"dropped {ignored} ignored boxes (VOC difficult, COCO iscrowd, bboxes_ignore): YOLO cannot mark them")
    else:
        print(f"images: {images} (file names are relative to it)")
    print_summary(records, classes, expected)
    return records, classes


if __name__ == "__main__":
    cli(main, get_args_parser())
