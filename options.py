"""train.py's flags (`get_args_parser`) and the combinations refused before any work (`check_args`).

Flags of the extras (extras/*.py) are here too, so `python train.py --help` lists everything; each does nothing
until train.py imports its extra, where the flag asks for it.
"""

import argparse

import torch

import datasets
import models
import transforms
from utils import SetupError


def int_list(text):
    return [int(v) for v in text.split(",")]


def get_args_parser(add_help=True):
    # One flag per line or two, so the flags read as a table (ruff format would spread each over five lines).
    # fmt: off
    parser = argparse.ArgumentParser(description="Fine-tune a torchvision detector on your data.", add_help=add_help)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="pennfudan", choices=sorted(datasets.DATASETS), help="(default pennfudan)")
    data.add_argument("--data-path", "--img-prefix", default=None,
                      help="dataset root; for pennfudan it defaults to data/PennFudanPed, downloaded when missing")
    data.add_argument("--train-ann", "--ann-file", default=None, help="training annotation file (coco, custom)")
    data.add_argument("--val-ann", default=None, help="validation annotation file (coco; custom: else a split)")
    data.add_argument("--train-images", default=None, help="training image folder (coco, default ROOT/train2017)")
    data.add_argument("--val-images", default=None, help="validation image folder (coco, default ROOT/val2017)")
    data.add_argument("--train-split", default="train", help="voc ImageSets/Main list for training (default train)")
    data.add_argument("--val-split", default="val", help="voc ImageSets/Main list for validation (default val)")
    data.add_argument("--classes", default=None, help="class names: a,b,c or a classes.txt (voc: default the 20 VOC)")
    data.add_argument("--drop-empty", action="store_true", help="coco: skip training images without objects")
    data.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (default: stop)")
    data.add_argument("--strict", action="store_true",
                      help="stop on zero-size or outside boxes instead of dropping them (default off)")
    data.add_argument("--val-size", default=None, type=int,
                      help="images held out for validation without an official split (default 50 above 100, else 20%%)")
    data.add_argument("--split-seed", default=0, type=int, help="seed of that train/val split (default 0)")
    data.add_argument("--data-augmentation", default="hflip", choices=transforms.POLICIES,
                      help="training augmentation policy (default hflip, the tutorial's)")
    data.add_argument("-j", "--workers", default=2, type=int, help="data loading processes (default 2)")
    data.add_argument("--cache-images", action="store_true", help="keep every decoded image in memory (default off)")
    data.add_argument("--repeat-factor-thr", default=0.0, type=float,
                      help="LVIS repeat factors: a class in a share f < T of images drawn sqrt(T/f)x (default 0: off)")
    data.add_argument("--aspect-ratio-group-factor", default=3, type=int,
                      help="batch images of similar aspect ratio, 2k+1 bins; -1 turns it off (default 3)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="maskrcnn_resnet50_fpn", choices=models.MODELS + models.COMPOSED,
                       help="detector (default maskrcnn_resnet50_fpn)")
    model.add_argument("--backbone", default=None, help="for --model fasterrcnn/maskrcnn/retinanet/fcos: an ImageNet "
                       "classifier of compose.BACKBONES, e.g. resnet18, mobilenet_v3_large (default resnet50)")
    model.add_argument("--neck", default=None, help="with those models: none, fpn or pafpn (default fpn)")
    model.add_argument("--anchor-sizes", default=None, type=int_list, help="anchor sizes in px: one per feature map "
                       "(5 with an FPN), or all on --neck none's one map, e.g. 32,64,128,256,512 (default the model's)")
    model.add_argument("--anchor-ratios", default=None, type=lambda s: [float(v) for v in s.split(",")],
                       help="anchor aspect ratios h/w, on every map, e.g. 0.5,1,2 (default: the model's)")
    model.add_argument("--weights", default="DEFAULT",
                       help="DEFAULT (COCO), a weights enum name, none (random) or a .pth file (default DEFAULT)")
    model.add_argument("--weights-backbone", default="none",
                       help="ImageNet backbone weights when --weights is none: DEFAULT or none (default none)")
    model.add_argument("--trainable-backbone-layers", default=None, type=int,
                       help="backbone stages to train, 0-5 (default: torchvision's, 3 for pretrained models)")
    model.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across processes (default off)")
    model.add_argument("--box-score-thresh", default=0.05, type=float,
                       help="detections scoring below this are dropped before evaluation (default 0.05, torchvision's)")
    model.add_argument("--min-size", default=None, type=int,
                       help="shorter image side fed to the model, px (default: the model's, 800; 320 for *_320_fpn)")
    model.add_argument("--max-size", default=None, type=int,
                       help="cap on the longer image side, px (default: the model's, 1333; 640 for *_320_fpn)")
    speed = dict(default=True, action=argparse.BooleanOptionalAction)  # the speed path: same results, faster
    model.add_argument("--channels-last", **speed, help="NHWC memory layout, faster convolutions (default on)")
    model.add_argument("--fold-bn", **speed, help="fold frozen BatchNorm into the convolutions (default on)")
    model.add_argument("--fast-roi-align", **speed, help="CPU: multi-threaded RoIAlign, same to 1e-6 (default on)")
    model.add_argument("--compile", action="store_true", help="torch.compile the backbone (default off)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("-b", "--batch-size", default=2, type=int, help="images per process and step (default 2)")
    optim.add_argument("--epochs", default=10, type=int, help="training epochs (default 10)")
    optim.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="optimizer (default sgd)")
    optim.add_argument("--lr", default=None, type=float,
                       help="learning rate (default 0.005 x total batch / 2: the tutorial's, scaled linearly)")
    optim.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (default 0.9)")
    optim.add_argument("--weight-decay", "--wd", default=5e-4, type=float, help="weight decay (default 0.0005)")
    optim.add_argument("--lr-scheduler", default="step", choices=("step", "multistep", "cosine"), help="(default step)")
    optim.add_argument("--lr-step-size", default=3, type=int, help="epochs between lr drops for step (default 3)")
    optim.add_argument("--lr-steps", default=[8, 11], nargs="+", type=int, help="multistep drops (default 8 11)")
    optim.add_argument("--lr-gamma", default=0.1, type=float, help="lr factor at each drop (default 0.1)")
    optim.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                       help="mixed precision (default on for CUDA; on CPU faster but it cost AP: README, Speed)")
    optim.add_argument("--amp-dtype", default=None, choices=("bf16", "fp16"),
                       help="autocast dtype, turns --amp on (default bf16 on CPU, fp16 with loss scaling on CUDA)")
    optim.add_argument("--accumulate", default=1, type=int,
                       help="batches whose gradients add up to one optimizer step: N times the batch (default 1)")
    optim.add_argument("--ema", default=0.0, type=float,
                       help="evaluate and save a moving average of the weights, decay e.g. 0.9998 (default 0: off)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default cuda if any)")
    run.add_argument("--output-dir", default="work_dirs/run", help="where the run writes (default work_dirs/run)")
    run.add_argument("--resume", default=None,
                     help="checkpoint to continue from, or auto (output-dir's checkpoint.pth if present)")
    run.add_argument("--load-from", default=None,
                     help="start from this checkpoint's weights (any class count) at epoch 0 with a fresh optimizer")
    run.add_argument("--skip-nonfinite", default=0, type=int,
                     help="skip up to N steps per epoch with a NaN/inf loss instead of stopping (default 0)")
    run.add_argument("--save-interval", default=1, type=int, help="keep model_{epoch}.pth every N epochs (default 1)")
    run.add_argument("--eval-batch-size", default=1, type=int, help="images per evaluation step (default 1)")
    run.add_argument("--eval-interval", default=1, type=int, help="validate every N epochs and at the end (default 1)")
    run.add_argument("--patience", default=0, type=int,
                     help="stop when the validation AP has not improved for N evaluations (default 0: never)")
    run.add_argument("--test-only", action="store_true", help="evaluate (the --resume checkpoint) and exit")
    run.add_argument("--eval", default=["bbox"], nargs="+", choices=("bbox", "proposal"), help="bbox: COCO AP (and "
                     "segm/keypoints AP where predicted); proposal: the RPN's AR@100/300/1000 (default bbox)")
    run.add_argument("--confusion-thresh", default=0.25, type=float,
                     help="score above which a detection counts in the confusion matrix (default 0.25)")
    run.add_argument("--tta", default="none", choices=("none", "hflip"),
                     help="test-time augmentation of the final evaluation, also scored without (default none)")
    run.add_argument("--tta-scales", default=None, type=int_list,
                     help="test-time shorter sides, e.g. 640,800,1000 px (default: the model's one)")
    run.add_argument("--tta-merge", default="nms", choices=("nms", "vote"),
                     help="merge the views' boxes by per-class NMS or score-weighted voting (default nms)")
    run.add_argument("--tile", default=0, type=int, help="with --test-only: the model on overlapping tiles of this "
                     "many px, for small objects in large images (default 0: whole images)")
    run.add_argument("--tile-overlap", default=0.2, type=float, help="share of a tile its neighbours see (default 0.2)")
    run.add_argument("--tile-merge", default="nms", choices=("nms", "vote"), help="merge tiles' boxes (default nms)")
    run.add_argument("--tile-full-image", action="store_true", help="with --tile: also run whole images (default off)")
    run.add_argument("--show-dir", default=None, help="with --test-only: write drawn predictions here (default none)")
    run.add_argument("--val-loss", default=True, action=argparse.BooleanOptionalAction,
                     help="also compute the validation loss at each evaluation (default on)")
    run.add_argument("--report-images", default=4, type=int, help="drawn validation images in report.md (default 4)")
    run.add_argument("--out", default=None, help="write the evaluated detections as COCO results json")
    run.add_argument("--print-freq", default=20, type=int, help="log every N iterations (default 20)")
    run.add_argument("--seed", default=42, type=int, help="random seed (default 42)")
    # fmt: on
    return parser


def check_args(args):
    """Flag combinations that cannot work, refused before any heavy work."""
    if args.test_only and not args.resume and str(args.weights).lower() in ("none", "default"):
        print("Note: --test-only without --resume evaluates the --weights model as built (its heads are untrained)")
    if min(args.batch_size, args.eval_interval, args.save_interval, args.accumulate) < 1 or args.epochs < 0:
        raise SetupError("--batch-size, --accumulate, --eval-interval, --save-interval: 1 or more; --epochs >= 0")
    if not 0 <= args.ema < 1:
        raise SetupError(f"--ema {args.ema}: the decay is below 1, e.g. 0.9998 (0 turns it off)")
    if args.resume and args.resume != "auto" and args.load_from:
        raise SetupError("--resume continues a run, --load-from starts a new one from its weights: pass one")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError("--device cuda, but torch sees no CUDA GPU; pass --device cpu")
    if args.model in ("retinanet", "fcos") and ("proposal" in args.eval or args.tta != "none" or args.tta_scales):
        raise SetupError(f"--eval proposal and --tta need a two-stage R-CNN; {args.model} has no RPN / RoI heads")
    if args.tile and (not args.test_only or args.tile < 32 or "proposal" in args.eval or args.tta != "none"):
        raise SetupError("--tile N (N >= 32 px) evaluates a trained model: with --test-only, no --tta/proposals")
    if args.amp_dtype == "fp16" and not args.device.startswith("cuda"):
        raise SetupError("--amp-dtype fp16 needs CUDA; on CPU use --amp (bf16) or leave it off (fp32)")
    if args.model.startswith("keypointrcnn") and args.data_augmentation == "lsj":
        raise SetupError("--data-augmentation lsj does not move keypoints; use hflip or photometric")
