"""Draw a dataset's ground truth after its training transforms: check the annotations before you train on them.

    python references/browse_dataset.py --data-path ../shared/data/PennFudanPed --out browse/
    python references/browse_dataset.py --dataset voc --data-path ../shared/data/BCCD --classes RBC,WBC,Platelets \\
        --out browse/ --split val --num-images 50

Takes every train.py flag, so the dataset is built exactly as train.py builds it (--dataset, --data-path, --classes,
--data-augmentation, --seed, ...). Writes OUT/<image_id>.png: the image the model gets, with each object's box and
class name (and its mask) in red. A box off its object, a wrong name or a missing mask shows at a glance.
"""

import sys
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import to_dtype, to_pil_image
from torchvision.utils import draw_segmentation_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where train.py lives
import common  # noqa: E402

import train  # noqa: E402
import utils  # noqa: E402
from extras import draw  # noqa: E402

COLOR = "red"  # the ground truth colour of draw.draw_predictions
NO_PREDICTION = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}


def get_args_parser():
    # our --out (a folder of drawings) replaces train.py's (a detections file)
    parser = common.parser_with_train_flags(__doc__)
    browse = parser.add_argument_group("browse")
    browse.add_argument("--out", required=True, help="folder for the drawings, <image_id>.png")
    browse.add_argument("--num-images", default=20, type=int, help="draw the first N images (default 20)")
    browse.add_argument(
        "--split", default="train", choices=("train", "val"), help="train (random transforms) or val (default train)"
    )
    return parser


def main(args):
    utils.seed_everything(args.seed)  # the same random flips and crops on every call
    train_set, val_set, class_names = train.get_datasets(args)
    dataset = train_set if args.split == "train" else val_set
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    count = min(args.num_images, len(dataset))
    for i in range(count):
        image, target = dataset[i]  # after the transforms: float [3, H, W] in [0, 1], boxes XYXY in its pixels
        image = to_dtype(image, torch.uint8, scale=True)
        if "masks" in target and len(target["masks"]):
            image = draw_segmentation_masks(image, target["masks"].bool(), alpha=0.4, colors=COLOR)
        drawing = draw.draw_predictions(image, NO_PREDICTION, class_names, target=target, gt_color=COLOR)
        to_pil_image(drawing).save(out / f"{target['image_id']}.png")
    print(f"Wrote {count} drawings of the {args.split} set ({len(dataset)} images) to {out}")


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
