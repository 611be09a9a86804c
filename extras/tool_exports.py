"""What annotation tools put in COCO files that is not a class, found and left out of training.

labelme's COCO export lists "_background_" as category 0; Roboflow's lists the dataset's name as category 0, the
supercategory of every real class, with no objects. Trained as classes, they waste a logit and skew per-class means.
datasets.get_coco calls `check_categories`; without this file those entries are classes like the others, and a class
with no training object goes unnoticed.
"""

import warnings

import torch

BACKGROUND_NAMES = ("_background_", "background", "__background__")  # labelme's COCO export has _background_ as id 0


def placeholder_categories(categories, objects_per_category):
    """Categories that are not classes: one named background (labelme), or one without objects whose name is the
    supercategory of others (Roboflow's exports list the dataset's name as category 0). Returns {id: reason}."""
    supercategories = {c.get("supercategory") for c in categories if c.get("supercategory") != c["name"]}
    found = {}
    for c in categories:
        if c["name"].lower() in BACKGROUND_NAMES:
            found[c["id"]] = "a background placeholder"
        elif not objects_per_category.get(c["id"]) and c["name"] in supercategories:
            found[c["id"]] = "the supercategory of the others, with no objects"
    return found


def drop_placeholder_categories(train, val):
    """Leave the placeholder categories of two CocoDetection sets (train, val) out of both, with a note."""
    categories = train.categories
    placeholders = placeholder_categories(categories, train.objects_per_category + val.objects_per_category)
    if placeholders:
        dropped = [
            f"{c['name']!r} (id {c['id']}, {placeholders[c['id']]})" for c in categories if c["id"] in placeholders
        ]
        print(f"Note: not a class, left out: {', '.join(dropped)}")
        kept = [c["id"] for c in categories if c["id"] not in placeholders]
        for dataset in (train, val):
            keep_categories(dataset, kept)


def keep_categories(dataset, category_ids):
    """Train a CocoDetection set on these categories only: labels 1..K follow their sorted ids; annotations of the
    others go."""
    kept = [c for c in dataset.categories if c["id"] in set(category_ids)]
    dataset.classes = [c["name"] for c in kept]
    dataset.label_to_category_id = {k: c["id"] for k, c in enumerate(kept, start=1)}
    dataset.category_id_to_label = {cid: k for k, cid in dataset.label_to_category_id.items()}
    for record in dataset.images:
        keep = [a["category_id"] in dataset.category_id_to_label for a in record["anns"]]
        record["anns"] = [a for a, k in zip(record["anns"], keep) if k]
        record["boxes"] = record["boxes"][torch.tensor(keep, dtype=torch.bool)]


def check_categories(train, val):
    """Drop the placeholder categories of two CocoDetection sets, and warn of classes no training image shows."""
    drop_placeholder_categories(train, val)
    learned = train.category_id_to_label
    never = [c["name"] for c in train.categories if c["id"] in learned and not train.objects_per_category[c["id"]]]
    if never:
        warnings.warn(
            f"{train.ann_file}: no training objects of {len(never)} categories, which the model can never learn: "
            f"{', '.join(never)}. Annotate some, or remove them from the categories",
            stacklevel=3,
        )
