"""Check a detection dataset before a long training run: every annotation as written, and every image decoded.

    python references/check_dataset.py --dataset voc --data-path ../shared/data/BCCD --classes RBC,WBC,Platelets
    python references/check_dataset.py --dataset coco --data-path ../shared/data/tiny_coco --fix fixed/
    python references/check_dataset.py --dataset custom --ann-file train.json --img-prefix IMAGES --classes a,b
    python references/check_dataset.py --dataset pennfudan --data-path ../shared/data/PennFudanPed
    python references/check_dataset.py --dataset yolo --data-path DIR  (DIR/data.yaml, or the yaml itself)

Takes train.py's data flags, so a training command line works as it is. It reads the raw annotations of both splits
(the dataset classes drop zero-size boxes and clip the others, which would hide them): voc every xml in Annotations/
and the --train-split/--val-split files, coco --train-ann and --val-ann, custom --ann-file and --val-ann, pennfudan
the masks, yolo the label txt of every image of data.yaml's splits (malformed rows with file:line, images without a
txt as negatives, txt files without an image; --fix does not rewrite them). Every image is decoded, on --workers
processes: a truncated file opens, and fails only mid-epoch.

Prints each kind of problem with a count and the first files, a summary table and the objects per class. Exit code 0:
no errors (warnings: images without objects, boxes that look drawn twice); 1: errors; 2: the check could not run
(a missing path, a broken json or xml), with one "error: ..." line.

--fix OUT writes a cleaned copy of the annotations into the folder OUT, in the input's format: boxes clipped to their
image, zero-size and outside boxes dropped, annotation sizes set to the real image size, unreadable and missing images
dropped. Labels, duplicates and paths need a human: they are counted, not changed. Images are never copied.
    voc     OUT/Annotations/*.xml (the input xml, edited), OUT/ImageSets/Main/*.txt, OUT/JPEGImages -> the images
    coco    OUT/<each annotation file's name>.json, everything else in it (ids, segmentations) unchanged
    custom  OUT/<each annotation file's name>.json (a .pkl input is written as .json)
"""

import json
import os
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where train.py lives
import common  # noqa: E402
from convert_dataset import coordinate, parallel_map  # noqa: E402  (this script's folder)

from datasets.coco import REQUIRED_FIELDS  # noqa: E402
from datasets.common import load_json, read_classes  # noqa: E402
from datasets.images import SWAPS_SIDES, orientation  # noqa: E402
from extras.formats import yolo  # noqa: E402
from extras.formats.custom import boxes_and_labels, load_middle_format  # noqa: E402
from extras.formats.voc import (  # noqa: E402
    BOX_TAGS,
    VOC_CLASSES,
    find_image,
    list_annotation_ids,
    parse_annotation,
    read_xml,
)
from utils import SetupError, cli  # noqa: E402

# kind -> (severity, name, why it matters, what --fix does or None); the report follows this order
KINDS = {
    "missing": ("error", "missing files", "named by the annotations or a split, not on disk", "dropped"),
    "unreadable": ("error", "unreadable images", "truncated or corrupt: training stops when it reaches one", "dropped"),
    "size": ("error", "size mismatches", "annotated width/height are not the image's", "set to the image's"),
    "mask_size": ("error", "mask size mismatches", "a mask must be as large as its image", None),
    "zero": ("error", "zero-size boxes", "zero or negative width or height: a NaN box regression loss", "dropped"),
    "outside": ("error", "boxes outside the image", "wholly outside: they cover no pixel", "dropped"),
    "crossing": ("error", "boxes crossing the border", "partly outside the image: training clips them", "clipped"),
    "label": ("error", "bad labels", "labels outside 1..K, class names not in --classes, unknown image ids", None),
    "dup_id": ("error", "duplicate image ids", "predictions are matched to image ids: one id twice is ambiguous", None),
    "dup_file": ("error", "duplicate images", "one image listed twice, or in both train and val", None),
    "escape": ("error", "escaping paths", "absolute or with '..': outside the image folder", None),
    "malformed": ("error", "malformed label rows", "YOLO rows training cannot read: dropped (--strict: refused)", None),
    "empty": ("warning", "images without objects", "negatives; fine in moderation", None),
    "orphan": ("warning", "labels without images", "YOLO txt files no image has: renamed or deleted images?", None),
    "twice": ("warning", "boxes drawn twice?", "one class, a large overlap: one object labelled twice?", None),
}
TWICE_IOU = 0.8  # BCCD's double-drawn cells overlap at 0.83-0.93; two distinct objects of one class rarely reach 0.8
EXAMPLES = 10  # files shown per kind
MISSING = "file not found"


def get_args_parser():
    # our -j/--workers (processes decoding images) replaces train.py's (data loaders)
    parser = common.parser_with_train_flags(__doc__)
    check = parser.add_argument_group("check")
    check.add_argument("--fix", default=None, type=str, help="write cleaned annotations into this folder (default off)")
    check.add_argument(
        "-j",
        "--workers",
        default=os.cpu_count() or 1,
        type=int,
        help=f"processes decoding images (default os.cpu_count(), here {os.cpu_count()})",
    )
    return parser


def escapes(path):
    """True for a path from an annotation file that leaves the folder it is relative to."""
    return Path(path).is_absolute() or ".." in Path(path).parts


def px(size):
    return f"{size[0]}x{size[1]}"


def obj(cls, label, box, valid, ignore, written, raw=None, mask=None):
    """One object as written: cls its class name (None: unknown), box pixel edges XYXY, valid the format's own box
    test, written the coordinates as in the file (shown in the report), raw what --fix edits, mask (w, h) of an RLE."""
    written = [coordinate(v) for v in written]
    fields = dict(cls=cls, label=label, box=box, valid=valid, ignore=ignore, written=written, raw=raw, mask=mask)
    return fields | {"fix": None}  # check() plans it: "drop" or a clipped box


# ------------------------------------------------------------------------------------------------ readers
# Each returns records, one per image: {"name": shown in the report, "image": Path, "size": (w, h) as annotated or
# None, "objects": [obj(...)], "raw": what --fix edits, "path": the image path as written (checked for escapes)}.
def read_pennfudan(root):
    """Penn-Fudan's annotations are its instance-id masks: check() reads their objects along with the images."""
    images = sorted((root / "PNGImages").glob("*.png"))
    if not images:
        raise SetupError(f"no images in {root / 'PNGImages'}; --data-path is the folder holding PNGImages/")
    masks = [root / "PedMasks" / f"{p.stem}_mask.png" for p in images]
    return [{"name": p.name, "image": p, "size": None, "objects": [], "mask": m} for p, m in zip(images, masks)]


def read_voc(root, classes, splits, problems):
    if not (root / "Annotations").is_dir():
        raise SetupError(f"{root / 'Annotations'} not found; --data-path is the VOC root (Annotations/, JPEGImages/)")
    ids = list_annotation_ids(root)
    listed = {}  # split file name -> its ids; VOCDetection reads JPEGImages/<id>.jpg and Annotations/<id>.xml
    for split in dict.fromkeys(splits):
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if split_file.is_file():
            listed[split_file.name] = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    known = set(ids)
    for name, split_ids in listed.items():
        problems["dup_id"] += [f"{i} is listed {n} times in {name}" for i, n in Counter(split_ids).items() if n > 1]
        for i in split_ids:
            if escapes(i):
                problems["escape"].append(f"{name}: {i}")
            elif i not in known:
                problems["missing"].append(f"{name}: {i} (no Annotations/{i}.xml)")
    if len(listed) == 2:
        (train_name, train_ids), (val_name, val_ids) = listed.items()
        both = sorted(set(train_ids) & set(val_ids))
        problems["dup_id"] += [f"{i} is in both {train_name} and {val_name}" for i in both]
    records = []
    for image_id in ids:
        xml_path = root / "Annotations" / f"{image_id}.xml"
        xml = read_xml(xml_path)
        width, height, parsed = parse_annotation(xml_path, xml)
        objects = []
        for name, (x1, y1, x2, y2), difficult in parsed:
            # VOC is 1-based and includes both ends: pixel edges are x1 = xmin - 1, x2 = xmax (extras/formats/voc.py);
            # xmax == xmin is a click without a drag (VOCDetection drops it), not a 1-pixel object
            box, valid = [x1 - 1, y1 - 1, x2, y2], x2 > x1 and y2 > y1
            objects.append(obj(name if name in classes else None, name, box, valid, difficult, (x1, y1, x2, y2)))
        size = (width, height) if width and height else None  # no <size>: VOCDetection reads the image's
        try:
            image = find_image(root, image_id, xml_path, xml)
        except SetupError:
            image = root / "JPEGImages" / f"{image_id}.jpg"  # reported missing below
        records.append({"name": f"{image_id}.xml", "image": image, "size": size, "objects": objects, "raw": image_id})
    return records


def read_coco(ann_file, img_folder, classes, problems):
    data = load_json(ann_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or "categories" not in data:
        raise SetupError(f"{ann_file} is not a COCO file: expected an object with images, annotations, categories")
    for kind, fields in REQUIRED_FIELDS.items():  # without these nothing about an entry can be checked
        for i, entry in enumerate(data.get(kind, [])):
            if not isinstance(entry, dict) or any(field not in entry for field in fields):
                raise SetupError(f"{ann_file}: {kind}[{i}] lacks one of {', '.join(fields)}; add them")
    names = {c["id"]: c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])}
    if classes and list(names.values()) != classes:
        problems["label"].append(f"{ann_file.name}: categories {list(names.values())} differ from the first file's")
    records, by_id = [], {}
    for im in data["images"]:
        if im["id"] in by_id:
            first = by_id[im["id"]]["name"]
            problems["dup_id"].append(f"{ann_file.name}: id {im['id']} is {first} and {im['file_name']}")
        record = {"name": im["file_name"], "image": img_folder / im["file_name"], "size": (im["width"], im["height"])}
        records.append(record | {"objects": [], "raw": im, "path": im["file_name"]})
        by_id.setdefault(im["id"], records[-1])  # (annotations of a duplicated id go to its first image)
    for ann in data.get("annotations", []):
        where = f"{ann_file.name}: annotation {ann.get('id')}"
        if ann["image_id"] not in by_id:
            problems["label"].append(f"{where} has unknown image_id {ann['image_id']}")
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (TypeError, ValueError):
            raise SetupError(f"{where} has bbox {ann['bbox']}, expected [x, y, width, height]") from None
        rle = ann.get("segmentation") if isinstance(ann.get("segmentation"), dict) else {}  # polygons have no size
        mask = tuple(rle["size"][::-1]) if "size" in rle else None  # an RLE's size is [h, w]
        cls, label = names.get(ann["category_id"]), f"category_id {ann['category_id']}"
        box, crowd = [x, y, x + w, y + h], int(bool(ann.get("iscrowd")))
        by_id[ann["image_id"]]["objects"].append(obj(cls, label, box, w > 0 and h > 0, crowd, ann["bbox"], ann, mask))
    return records, list(names.values()), data


def read_custom(ann_file, img_prefix, classes, problems):
    entries = load_middle_format(ann_file)
    records = []
    for n, entry in enumerate(entries):
        where = f"{ann_file}, entry {n}"
        try:
            filename, width, height = entry["filename"], int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError) as e:
            raise SetupError(f"{where}: every entry needs filename, width and height ({e!r})") from None
        ann = entry.get("ann") or {}  # test-set files have no "ann"
        objects = []
        for key, label_key, ignore in (("bboxes", "labels", 0), ("bboxes_ignore", "labels_ignore", 1)):
            boxes, labels = boxes_and_labels(ann, key, label_key, where, dtype=np.float64)  # float64: as written
            for box, label in zip(boxes.tolist(), labels.tolist()):
                known = 0 <= label < len(classes)  # mmdetection's labels are 0-based: 0..K-1
                shown = f"label {label}" + ("" if known else f" (0-based, expected 0..{len(classes) - 1})")
                valid = box[2] > box[0] and box[3] > box[1]
                objects.append(obj(classes[label] if known else None, shown, box, valid, ignore, box, (key, label)))
        record = {"name": filename, "image": img_prefix / filename, "size": (width, height), "objects": objects}
        records.append(record | {"raw": entry, "path": filename})
    return records, entries


def read_yolo(root, problems):
    """Every split of data.yaml. Boxes stay fractions 0-1 (record["normalized"]) until check() has the image sizes."""
    yaml_path, classes, splits = yolo.read_data_yaml(root)

    def short(path):  # the names shown in the report: relative to the yaml's folder
        return os.path.relpath(path, yaml_path.parent)

    records, labelled = [], set()
    for sources in splits.values():
        for image in yolo.list_images(sources):
            label = yolo.label_path(image)
            labelled.add(label)
            bad_rows = []
            rows = yolo.read_labels(label, len(classes), bad_rows)
            problems["malformed"] += [row.replace(str(label), short(label), 1) for row in bad_rows]
            objects = []
            for cls, values, line in rows:
                box = yolo.row_box(values)
                written = values if len(values) == 4 else box  # a polygon is shown by its bounds
                objects.append(obj(classes[cls], f"line {line} class {cls}", box, box[2] > box[0] and box[3] > box[1],
                                   0, written))  # fmt: skip
            name = short(label) if label.is_file() else f"{short(image)} (no label file)"
            records.append({"name": name, "image": image, "size": None, "objects": objects, "normalized": True})
        for source in (s for s in sources if s.is_dir()):  # txt files beside the images' labels that no image has
            for label in sorted(yolo.label_path(source / "x.jpg").parent.rglob("*.txt")):
                if label not in labelled and label.name != "classes.txt":  # (labelImg writes classes.txt there)
                    problems["orphan"].append(short(label))
    return records, classes


def read_dataset(args, problems):
    """-> (records, class names, [(annotation file, its parsed content)] for --fix) of both splits."""
    root = Path(args.data_path or os.path.join("data", "PennFudanPed"))
    if args.dataset == "pennfudan":
        return read_pennfudan(root), ["person"], []
    if args.data_path is None:
        raise SetupError(f"--dataset {args.dataset} needs --data-path DIR (the dataset root / image folder)")
    if args.dataset == "voc":
        classes = read_classes(args.classes) if args.classes else list(VOC_CLASSES)
        return read_voc(root, classes, (args.train_split, args.val_split), problems), classes, []
    if args.dataset == "yolo":
        return *read_yolo(root, problems), []
    if args.dataset == "coco":  # annotation file -> its image folder, defaults as in datasets.get_coco
        train_ann = Path(args.train_ann or root / "annotations" / "instances_train2017.json")
        val_ann = Path(args.val_ann or root / "annotations" / "instances_val2017.json")
        folders = {train_ann: args.train_images or "train2017", val_ann: args.val_images or "val2017"}
    elif args.dataset == "custom":
        if not args.train_ann or not args.classes:
            raise SetupError("--dataset custom needs --ann-file FILE (.json or .pkl) and --classes a,b,c")
        classes = read_classes(args.classes)
        folders = dict.fromkeys([Path(f) for f in (args.train_ann, args.val_ann) if f], root)
    else:
        raise SetupError(f"--dataset {args.dataset}: the checker reads pennfudan, voc, coco, custom and yolo")
    records, raw = [], []
    for ann_file, folder in folders.items():
        folder = root / folder  # an absolute folder stays as it is
        if args.dataset == "coco":  # the first file's categories name the classes; the second must agree
            found, classes, data = read_coco(ann_file, folder, classes if raw else None, problems)
        else:
            found, data = read_custom(ann_file, folder, classes, problems)
        if not folder.is_dir():
            raise SetupError(f"image folder {folder} not found; pass the folder the file names in {ann_file} are under")
        records += [r | {"file": ann_file} for r in found]
        raw.append((ann_file, data))
    return records, classes, raw


# ------------------------------------------------------------------------------------------------ checks
def inspect_image(task):
    """Worker: (path, is_mask) -> ((width, height) or None, error or None, boxes [[x1, y1, x2, y2]] of a mask's ids)."""
    path, is_mask = task
    try:
        with Image.open(path) as im:
            size = im.size  # from the header, what the annotations must agree with, upright as tools show it
            if orientation(im) in SWAPS_SIDES:
                size = size[::-1]
            im.load()  # decode every pixel: a truncated file opens fine and fails only here
            ids = np.asarray(im.getchannel(0)) if is_mask else None  # Penn-Fudan: 0 background, k = instance k
    except FileNotFoundError:
        return None, MISSING, []
    except (OSError, Image.DecompressionBombError) as e:  # OSError includes PIL.UnidentifiedImageError
        return None, f"{type(e).__name__}: {e}", []
    boxes = []
    for k in np.unique(ids[ids > 0]) if is_mask else []:
        ys, xs = np.nonzero(ids == k)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])  # pixel edges
    return size, None, boxes


def check(records, results, problems):
    """Fill `problems` and plan the fix: record["drop"], record["fix_size"], object["fix"] ("drop" or a clipped box)."""
    images = defaultdict(list)  # resolved image path -> the records naming it
    for r in records:
        images[r["image"].resolve()].append(r["name"])
        size, error, _ = results[r["image"], False]
        r["drop"] = error is not None
        if r.get("normalized") and size:  # YOLO: fractions of the image; 1e-6 px rounds off the float noise
            for o in r["objects"]:
                o["box"] = [round(v * side, 6) for v, side in zip(o["box"], size * 2)]
        if "mask" in r:  # Penn-Fudan: the objects are the mask's instance ids
            mask_size, mask_error, boxes = results[r["mask"], True]
            r["objects"] = [obj("person", "person", box, True, 0, box) for box in boxes]
            if size and mask_size and mask_size != size:
                problems["mask_size"].append(f"{r['mask'].name} is {px(mask_size)}, its image {px(size)}")
        for path, failed in ((r["image"], error), (r.get("mask"), "mask" in r and mask_error)):
            if failed:
                problems["missing" if failed == MISSING else "unreadable"].append(f"{path}: {failed}")
        if r.get("path") and escapes(r["path"]):
            problems["escape"].append(f"{r['file'].name}: {r['path']}")
        if r["size"] and size and tuple(r["size"]) != size:
            problems["size"].append(f"{r['name']}: annotated {px(r['size'])}, the image is {px(size)}")
            r["fix_size"] = size
        if not r["objects"]:
            problems["empty"].append(r["name"])
        width, height = size or r["size"] or (None, None)  # the real size first: it is what training will see
        for o in r["objects"]:
            where = f"{r['name']}: {o['label']} {o['written']}"
            if o["cls"] is None:
                problems["label"].append(where)
            if o["mask"] and size and o["mask"] != size:
                problems["mask_size"].append(f"{where}: its RLE is {px(o['mask'])}, the image {px(size)}")
            if not o["valid"]:
                problems["zero"].append(where)
                o["fix"] = "drop"
            elif width is not None:
                clipped = [min(max(v, 0), limit) for v, limit in zip(o["box"], (width, height) * 2)]
                if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                    problems["outside"].append(f"{where}, image {width}x{height}")
                    o["fix"] = "drop"
                elif clipped != o["box"]:
                    problems["crossing"].append(f"{where}, image {width}x{height}")
                    o["fix"] = clipped
        valid = [o for o in r["objects"] if o["valid"]]
        boxes = torch.tensor([o["box"] for o in valid], dtype=torch.float64).reshape(-1, 4)
        iou = box_iou(boxes, boxes).triu(diagonal=1)  # each pair once
        for i, j in (iou >= TWICE_IOU).nonzero().tolist():
            if valid[i]["cls"] == valid[j]["cls"]:
                pair = f"{valid[i]['label']} {valid[i]['written']} and {valid[j]['written']}"
                problems["twice"].append(f"{r['name']}: {pair}, IoU {iou[i, j]:.2f}")
    for image, names in images.items():
        if len(names) > 1:
            problems["dup_file"].append(f"{image} is listed {len(names)} times ({', '.join(names)})")


def print_report(problems, records, classes):
    for kind, (severity, name, why, _) in KINDS.items():
        found = problems[kind]
        if found:
            share = f" of {len(records)} images ({100 * len(found) / len(records):.1f}%)" if kind == "empty" else ""
            print(f"\n{severity.upper()}: {name}: {len(found)}{share} ({why})")
            print("".join(f"  {example}\n" for example in found[:EXAMPLES]), end="")
            if len(found) > EXAMPLES:
                print(f"  ... and {len(found) - EXAMPLES} more")
    print(f"\nsummary of {len(records)} images\n  {'check':<26} {'severity':<8} {'count':>6}  --fix")
    for kind, (severity, name, _, fix) in KINDS.items():
        print(f"  {name:<26} {severity:<8} {len(problems[kind]):>6}  {fix or '-'}")
    counts = {name: [0, 0, 0] for name in classes}  # objects, of which ignored, images holding one
    for r in records:
        for o in r["objects"]:
            if o["cls"] is not None:  # (a second COCO file may name other classes)
                counts.setdefault(o["cls"], [0, 0, 0])[0] += 1
                counts[o["cls"]][1] += o["ignore"]
        for name in {o["cls"] for o in r["objects"]} - {None}:
            counts[name][2] += 1
    width = max([len("class"), *map(len, counts)])
    print("\nobjects per class (ignored: VOC difficult, COCO iscrowd, bboxes_ignore)")
    print(f"  {'class':<{width}} {'objects':>8} {'ignored':>8} {'images':>7}")
    for name, (objects, ignored, images) in counts.items():
        print(f"  {name:<{width}} {objects:>8} {ignored:>8} {images:>7}")


# ------------------------------------------------------------------------------------------------ --fix
def fix_voc(records, root, out):
    """OUT/Annotations/<id>.xml: the input xml with the planned edits only; split files keep the ids written."""
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    for r in records:
        if r["drop"]:
            continue
        tree = ET.parse(root / "Annotations" / r["name"])
        for tag, value in zip(("width", "height"), r.get("fix_size", ())):
            tree.find(f"size/{tag}").text = str(value)
        for element, o in zip(tree.getroot().findall("object"), r["objects"]):  # parse_annotation's order
            if o["fix"] == "drop":
                tree.getroot().remove(element)
            elif o["fix"]:
                x1, y1, x2, y2 = o["fix"]  # pixel edges back to VOC's 1-based numbering
                for tag, value in zip(BOX_TAGS, (x1 + 1, y1 + 1, x2, y2)):
                    element.find(f"bndbox/{tag}").text = str(coordinate(value))
        (out / "Annotations" / r["name"]).write_text(ET.tostring(tree.getroot(), encoding="unicode") + "\n")
    # split entries without an xml or a readable image go (VOCDetection stops on them); escaping ones are left as is
    kept = {r["raw"] for r in records if not r["drop"]}
    (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split_file in sorted((root / "ImageSets" / "Main").glob("*.txt")):
        lines = [line for line in split_file.read_text().splitlines() if line.strip()]
        lines = [line for line in lines if line.split()[0] in kept or escapes(line.split()[0])]
        (out / "ImageSets" / "Main" / split_file.name).write_text("".join(f"{line}\n" for line in lines))
    link = out / "JPEGImages"
    if not link.exists() and not link.is_symlink():  # a link, not a copy: OUT is a complete VOC root at no disk cost
        link.symlink_to((root / "JPEGImages").resolve(), target_is_directory=True)


def fix_file(dataset, records, data, out_file):
    """The parsed COCO json or list of dicts with the planned edits, written as json."""
    for r in [r for r in records if not r["drop"]]:
        if "fix_size" in r:
            r["raw"]["width"], r["raw"]["height"] = r["fix_size"]
        for o in r["objects"]:
            if dataset == "coco" and o["fix"] not in (None, "drop"):
                x1, y1, x2, y2 = o["fix"]
                o["raw"]["bbox"] = [coordinate(v) for v in (x1, y1, x2 - x1, y2 - y1)]
        ann = r["raw"].get("ann") if dataset == "custom" else None
        for key, label_key in (("bboxes", "labels"), ("bboxes_ignore", "labels_ignore")) if ann else ():
            kept = [o for o in r["objects"] if o["raw"][0] == key and o["fix"] != "drop"]
            if key in ann:
                ann[key] = [[coordinate(v) for v in o["fix"] or o["box"]] for o in kept]
                ann[label_key] = [o["raw"][1] for o in kept]
    if dataset == "coco":
        gone = {id(o["raw"]) for r in records for o in r["objects"] if r["drop"] or o["fix"] == "drop"}
        data["images"] = [r["raw"] for r in records if not r["drop"]]
        data["annotations"] = [ann for ann in data.get("annotations", []) if id(ann) not in gone]
    else:
        data = [r["raw"] for r in records if not r["drop"]]
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(data, f, default=lambda array: array.tolist())  # numpy arrays and scalars from a .pkl


def fix_targets(args, raw):
    """{input: what --fix writes}: the VOC root, or each annotation file; never over an input."""
    out = Path(args.fix)
    targets = {Path(args.data_path): out} if args.dataset == "voc" else {f: out / f"{f.stem}.json" for f, _ in raw}
    for source, target in targets.items():
        if target.resolve() == source.resolve():
            raise SetupError(f"--fix {args.fix} would overwrite {source}; pass another folder")
    if len(set(targets.values())) < len(targets):
        raise SetupError("--fix: the two annotation files have the same name; check them one at a time")
    return targets


def main(args):
    """Check the dataset of the data flags -> the exit code, 1 when any error was found."""
    if args.workers < 1:
        raise SetupError("--workers must be >= 1")
    if args.fix and args.dataset == "pennfudan":
        raise SetupError("--fix: Penn-Fudan's annotations are its masks; fix them in an image editor")
    if args.fix and args.dataset == "yolo":
        raise SetupError("--fix does not rewrite YOLO labels: fix the rows the report lists (file:line) by hand")
    problems = defaultdict(list)
    records, classes, raw = read_dataset(args, problems)
    targets = fix_targets(args, raw) if args.fix else {}
    tasks = sorted({(r["image"], False) for r in records} | {(r["mask"], True) for r in records if "mask" in r})
    results = dict(zip(tasks, parallel_map(inspect_image, tasks, args.workers, "images decoded")))
    check(records, results, problems)
    print_report(problems, records, classes)
    errors = sum(len(problems[kind]) for kind, (severity, *_) in KINDS.items() if severity == "error")
    print(f"\n{errors} errors" + (": fix them, or run with --fix OUT" if errors and not args.fix else ""))
    if args.fix:
        Path(args.fix).mkdir(parents=True, exist_ok=True)
        if args.dataset == "voc":
            fix_voc(records, Path(args.data_path), Path(args.fix))
        for ann_file, data in raw:
            fix_file(args.dataset, [r for r in records if r["file"] == ann_file], data, targets[ann_file])
        print(f"\n--fix wrote {', '.join(map(str, targets.values()))}:")
        for kind, (severity, name, _, fix) in KINDS.items():
            if problems[kind] and severity == "error":
                done = f"{fix}, first: {problems[kind][0]}" if fix else "left as they are: a human must decide"
                print(f"  {name}: {len(problems[kind])} {done}")
    return 1 if errors else 0


if __name__ == "__main__":
    cli(main, get_args_parser())
