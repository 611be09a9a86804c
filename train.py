"""Fine-tune a torchvision detector on your data.

    python train.py --dataset pennfudan                                  # tutorial recipe: Mask R-CNN, COCO weights
    python train.py --dataset pennfudan --data-path DIR --weights none   # offline, from random weights
    torchrun --nproc_per_node 2 train.py --dataset pennfudan ...          # several processes (GPUs or CPU)

Everything a run writes goes to --output-dir: checkpoint.pth (latest), model_{epoch}.pth, best.pth, args.json,
log.txt (the console) and log.jsonl (one JSON object per epoch). The extras (extras/: compose.py, speed.py, tta.py,
...) are imported where a flag asks for them.
"""

import argparse
import datetime
import json
import os
import sys
import time
import types

import torch

import datasets
import models
import transforms
import utils
from datasets.group_by_aspect_ratio import GroupedBatchSampler, aspect_ratio_groups
from engine import evaluate, train_one_epoch
from extras import preemption


def get_args_parser(add_help=True):
    # One flag per line or two, so the flags read as a table (ruff format would spread each over five lines).
    # fmt: off
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help
    )

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="pennfudan", choices=sorted(datasets.DATASETS),
                      help="dataset (default pennfudan)")
    data.add_argument("--train-ann", "--ann-file", default=None, help="training annotation file (coco, custom)")
    data.add_argument("--val-ann", default=None, help="validation annotation file (coco; custom: else a split)")
    data.add_argument("--train-images", default=None, help="training image folder (coco, default ROOT/train2017)")
    data.add_argument("--val-images", default=None, help="validation image folder (coco, default ROOT/val2017)")
    data.add_argument("--train-split", default="train", help="voc ImageSets/Main list for training (default train)")
    data.add_argument("--val-split", default="val", help="voc ImageSets/Main list for validation (default val)")
    data.add_argument("--classes", default=None, help="class names: a,b,c or a classes.txt (voc: default the 20 VOC)")
    data.add_argument("--drop-empty", action="store_true", help="coco: skip training images without objects")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="skip samples whose image cannot be read (default: stop)")
    data.add_argument("--strict", action="store_true",
                      help="stop on zero-size or outside boxes instead of dropping them (default off)")
    data.add_argument("--data-path", "--img-prefix", default=None,
                      help="dataset root; for pennfudan it defaults to data/PennFudanPed, downloaded when missing")
    data.add_argument("--val-size", default=None, type=int,
                      help="images held out for validation when the dataset has no official split "
                           "(default 50 above 100 images, else 20%%)")
    data.add_argument("--split-seed", default=0, type=int, help="seed of that train/val split (default 0)")
    data.add_argument("--data-augmentation", default="hflip", choices=transforms.POLICIES,
                      help="training augmentation policy (default hflip, the tutorial's)")
    data.add_argument("-j", "--workers", default=2, type=int, help="data loading processes (default 2)")
    data.add_argument("--cache-images", action="store_true",
                      help="decode every image once and keep it in memory: small datasets, slow disks (default off)")
    data.add_argument("--repeat-factor-thr", default=0.0, type=float,
                      help="draw images of rare classes more often: LVIS's repeat-factor sampling, a class in a share "
                           "f < T of the images repeated sqrt(T/f) times, e.g. 0.1 (default 0: off)")
    data.add_argument("--aspect-ratio-group-factor", default=3, type=int,
                      help="batch images of similar aspect ratio, 2k+1 bins; -1 turns it off (default 3)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="maskrcnn_resnet50_fpn", choices=models.MODELS + models.COMPOSED,
                       help="detector (default maskrcnn_resnet50_fpn)")
    model.add_argument("--backbone", default=None,
                       help="for --model fasterrcnn/maskrcnn/retinanet/fcos: an ImageNet classifier of "
                            "compose.BACKBONES, e.g. resnet18, mobilenet_v3_large, convnext_tiny (default resnet50)")
    model.add_argument("--neck", default=None,
                       help="with those models: none, fpn or pafpn (FPN + PANet's bottom-up path) (default fpn)")
    model.add_argument("--anchor-sizes", default=None, type=lambda s: [int(v) for v in s.split(",")],
                       help="anchor sizes in px at the model's input scale: one per feature map (5 with an FPN), or "
                            "all of them on the one map of --neck none, e.g. 32,64,128,256,512 (default: the model's)")
    model.add_argument("--anchor-ratios", default=None, type=lambda s: [float(v) for v in s.split(",")],
                       help="anchor aspect ratios h/w, on every map, e.g. 0.5,1,2 (default: the model's)")
    model.add_argument("--weights", default="DEFAULT",
                       help="DEFAULT (COCO), a weights enum name, none (random) or a .pth file (default DEFAULT)")
    model.add_argument("--weights-backbone", default="none",
                       help="ImageNet backbone weights when --weights is none: DEFAULT or none (default none)")
    model.add_argument("--trainable-backbone-layers", default=None, type=int,
                       help="backbone stages to train, 0-5 (default: torchvision's, 3 for pretrained models)")
    model.add_argument("--sync-bn", action="store_true",
                       help="synchronise trainable BatchNorm across processes (default off)")
    model.add_argument("--box-score-thresh", default=0.05, type=float,
                       help="detections scoring below this are dropped before evaluation (default 0.05, torchvision's)")
    model.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction,
                       help="NHWC memory layout, faster convolutions on CPU and GPU (default on)")
    model.add_argument("--fold-bn", default=True, action=argparse.BooleanOptionalAction,
                       help="fold frozen BatchNorm into the convolutions before it; same results (default on)")
    model.add_argument("--fast-roi-align", default=True, action=argparse.BooleanOptionalAction,
                       help="on CPU, RoIAlign by multi-threaded torch ops instead of torchvision's one-thread kernel; "
                            "same results to 1e-6 (default on)")
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the backbone: slow first steps, then faster (default off)")
    model.add_argument("--min-size", default=None, type=int,
                       help="shorter image side fed to the model, px (default: the model's, 800; 320 for *_320_fpn)")
    model.add_argument("--max-size", default=None, type=int,
                       help="cap on the longer image side, px (default: the model's, 1333; 640 for *_320_fpn)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("-b", "--batch-size", default=2, type=int, help="images per process and step (default 2)")
    optim.add_argument("--epochs", default=10, type=int, help="training epochs (default 10)")
    optim.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="optimizer (default sgd)")
    optim.add_argument("--lr", default=None, type=float,
                       help="learning rate (default 0.005 x total batch / 2: the tutorial's, scaled linearly)")
    optim.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (default 0.9)")
    optim.add_argument("--weight-decay", "--wd", default=5e-4, type=float, help="weight decay (default 0.0005)")
    optim.add_argument("--lr-scheduler", default="step", choices=("step", "multistep", "cosine"),
                       help="lr schedule over epochs (default step)")
    optim.add_argument("--lr-step-size", default=3, type=int, help="epochs between lr drops for step (default 3)")
    optim.add_argument("--lr-steps", default=[8, 11], nargs="+", type=int,
                       help="epochs of the multistep drops (default 8 11)")
    optim.add_argument("--lr-gamma", default=0.1, type=float, help="lr factor at each drop (default 0.1)")
    optim.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                       help="mixed precision (default on for CUDA; on CPU faster but it cost AP: README, Speed)")
    optim.add_argument("--accumulate", default=1, type=int,
                       help="batches whose gradients add up to one optimizer step: an effective batch N times "
                            "larger in the same memory (default 1)")
    optim.add_argument("--ema", default=0.0, type=float,
                       help="evaluate and save an exponential moving average of the weights with this decay, e.g. "
                            "0.9998 (default 0: off)")
    optim.add_argument("--amp-dtype", default=None, choices=("bf16", "fp16"),
                       help="autocast dtype, turns --amp on (default bf16 on CPU, fp16 with loss scaling on CUDA)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cuda or cpu (default cuda when available)")
    run.add_argument("--output-dir", default="work_dirs/run", help="where the run writes (default work_dirs/run)")
    run.add_argument("--resume", default=None,
                     help="checkpoint to continue from, or auto (output-dir's checkpoint.pth if present)")
    run.add_argument("--load-from", default=None,
                     help="start from this checkpoint's weights (any class count) at epoch 0 with a fresh optimizer")
    run.add_argument("--skip-nonfinite", default=0, type=int,
                     help="skip up to N steps per epoch with a NaN/inf loss instead of stopping (default 0)")
    run.add_argument("--save-interval", default=1, type=int,
                     help="also keep model_{epoch}.pth every N epochs (default 1)")
    run.add_argument("--eval-batch-size", default=1, type=int, help="images per evaluation step (default 1)")
    run.add_argument("--patience", default=0, type=int,
                     help="stop when the validation AP has not improved for N evaluations (default 0: never)")
    run.add_argument("--confusion-thresh", default=0.25, type=float,
                     help="score above which a detection counts in the confusion matrix (default 0.25)")
    run.add_argument("--eval-interval", default=1, type=int,
                     help="validate every N epochs and after the last (default 1)")
    run.add_argument("--test-only", action="store_true", help="evaluate (the --resume checkpoint) and exit")
    run.add_argument("--eval", default=["bbox"], nargs="+", choices=("bbox", "proposal"),
                     help="bbox: COCO AP (and segm/keypoints AP for models that predict them); proposal: the RPN's "
                          "average recall AR@100/300/1000, to tune anchors (default bbox)")
    run.add_argument("--tta", default="none", choices=("none", "hflip"),
                     help="test-time augmentation of the final evaluation, also scored without (default none)")
    run.add_argument("--tta-scales", default=None, type=lambda s: [int(v) for v in s.split(",")],
                     help="test-time shorter sides, e.g. 640,800,1000 px (default: the model's one)")
    run.add_argument("--tta-merge", default="nms", choices=("nms", "vote"),
                     help="merge the views' boxes by per-class NMS or score-weighted voting (default nms)")
    run.add_argument("--tile", default=0, type=int,
                     help="with --test-only: run the model on overlapping tiles of this many px, for large images "
                          "with small objects (default 0: whole images)")
    run.add_argument("--tile-overlap", default=0.2, type=float, help="share of a tile its neighbours see (default 0.2)")
    run.add_argument("--tile-merge", default="nms", choices=("nms", "vote"),
                     help="merge the tiles' boxes by NMS or voting (default nms)")
    run.add_argument("--tile-full-image", action="store_true",
                     help="with --tile: also run each whole image, for objects larger than a tile (default off)")
    run.add_argument("--show-dir", default=None, help="with --test-only: write drawn predictions here (default none)")
    run.add_argument("--val-loss", default=True, action=argparse.BooleanOptionalAction,
                     help="also compute the validation loss at each evaluation (default on)")
    run.add_argument("--report-images", default=4, type=int, help="drawn validation images in report.md (default 4)")
    run.add_argument("--out", default=None, help="write the evaluated detections as COCO results json")
    run.add_argument("--print-freq", default=20, type=int, help="log every N iterations (default 20)")
    run.add_argument("--seed", default=42, type=int, help="random seed (default 42)")
    # fmt: on
    return parser


def get_datasets(args):
    """(train, val, class names) for --dataset, with the train/eval transforms applied."""
    train_tf = transforms.get_transform(train=True, policy=args.data_augmentation)
    val_tf = transforms.get_transform(train=False)
    split = dict(val_size=args.val_size, split_seed=args.split_seed)
    annotations = dict(train_ann=args.train_ann, val_ann=args.val_ann)
    coco_images = dict(train_images=args.train_images, val_images=args.val_images)
    options = {
        "pennfudan": dict(**split, download=args.data_path is None),
        "coco": dict(
            **annotations, **coco_images, masks=args.model.startswith("maskrcnn"), keep_empty=not args.drop_empty
        ),
        "voc": dict(**split, classes=args.classes, train_split=args.train_split, val_split=args.val_split),
        "custom": dict(**split, **annotations, classes=args.classes),
        "yolo": split,  # data.yaml names the splits (a missing val split: held out as above) and the classes
    }.get(args.dataset, dict(**annotations, classes=args.classes))  # a dataset you add: annotation files, classes
    if args.dataset in ("coco", "voc", "custom", "yolo"):  # (boxes made from Penn-Fudan's masks are never degenerate)
        options["strict"] = args.strict
    coco_paths = args.dataset == "coco" and all(coco_images.values()) and all(annotations.values())
    if args.data_path is None and args.dataset != "pennfudan" and not coco_paths:
        coco = "; or all of --train-ann, --val-ann, --train-images, --val-images" if args.dataset == "coco" else ""
        raise utils.SetupError(
            f"--dataset {args.dataset} needs --data-path DIR (the dataset root / image folder){coco}"
        )
    root = args.data_path or os.path.join("data", "PennFudanPed")
    train_set, val_set, class_names = datasets.get_dataset(args.dataset, root, train_tf, val_tf, **options)
    if args.skip_bad_images:
        from extras import skip_bad_images  # an unreadable image is skipped instead of stopping the run

        train_set, val_set = skip_bad_images.wrap(train_set, val_set)
    return train_set, val_set, class_names


def load_data(args, local_rank, checkpoint, world_size):
    """get_datasets, checked against the model; the COCO weights fetched too, so every missing file is reported at
    once. Downloads (Penn-Fudan, COCO weights) run on one process per node; the others wait, then find the files."""
    problems = []
    with utils.local_main_first(local_rank):
        try:
            train_set, val_set, class_names = get_datasets(args)
        except utils.SetupError as e:
            problems.append(str(e))
        if checkpoint is None and not args.load_from and args.model in models.TORCHVISION_MODELS:
            try:
                models.resolve_weights(args.model, args.weights)
            except utils.SetupError as e:
                problems.append(str(e))
    if utils.any_rank(problems):  # every rank stops together, or those that could go on would wait forever
        raise utils.SetupError("\n".join(problems) or "another process could not load the data or weights (above)")
    print(f"{args.dataset}: {len(train_set)} train / {len(val_set)} val images, classes {class_names}")
    check_data(args, train_set, class_names, checkpoint, world_size)
    if args.cache_images:
        from extras import cache_images  # every image decoded once, kept in memory

        cache_images.cache_images(train_set, val_set)
    return train_set, val_set, class_names


def check_data(args, train_set, class_names, checkpoint, world_size):
    """Data the model cannot train on, refused before the model is built."""
    saved = checkpoint and checkpoint.get("class_names")
    if saved is not None and list(saved) != list(class_names):  # its heads would score classes that mean others
        raise utils.SetupError(
            f"{args.resume} was trained on classes {list(saved)}, the dataset has {list(class_names)}.\n"
            f"  Pass the same --classes, or start a new run from its weights with --load-from {args.resume}"
        )
    if args.model.startswith("maskrcnn") and not datasets.has_masks(train_set):
        raise utils.SetupError(
            f"{args.model} needs instance masks and this {args.dataset} dataset has boxes only; "
            f"pick a box model, e.g. --model fasterrcnn_resnet50_fpn"
        )
    if args.model.startswith("keypointrcnn") and not getattr(train_set, "num_keypoints", 0):
        raise utils.SetupError(f"{args.model} needs keypoints: pass a person_keypoints json (--train-ann/--val-ann)")
    if len(train_set) < args.batch_size * world_size:
        raise utils.SetupError(
            f"{len(train_set)} training images cannot fill one batch of {args.batch_size} x {world_size} processes; "
            f"lower --batch-size or --val-size"
        )


def get_loaders(args, train_set, val_set, class_names, world_size, rank):
    # A DistributedSampler with one replica is a seeded shuffle whose order depends only on (seed, epoch):
    # resuming at epoch k replays exactly the order the uninterrupted run used.
    train_sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed)
    if args.repeat_factor_thr > 0:
        from extras import repeat_factor  # rare classes drawn more often

        factors = dict(threshold=args.repeat_factor_thr, num_replicas=world_size, rank=rank, seed=args.seed)
        train_sampler = repeat_factor.sampler(train_set, class_names, **factors)
    if args.aspect_ratio_group_factor >= 0:
        groups = aspect_ratio_groups(train_set, args.aspect_ratio_group_factor)
        batches = GroupedBatchSampler(train_sampler, groups, args.batch_size)
    else:
        batches = torch.utils.data.BatchSampler(train_sampler, args.batch_size, drop_last=True)
    val_sampler = torch.utils.data.DistributedSampler(val_set, world_size, rank, shuffle=False)
    val_sampler = val_sampler if world_size > 1 else torch.utils.data.SequentialSampler(val_set)
    common = dict(num_workers=args.workers, collate_fn=utils.collate_fn, pin_memory=args.device.startswith("cuda"))
    common["worker_init_fn"] = preemption.ignore_stop_signals  # a signal to the process group must reach main only
    # Its own generator (reseeded per epoch) seeds the workers, so starting an epoch draws nothing from torch's global
    # random stream: a mid-epoch resume restores that stream and continues it exactly.
    batches = preemption.ResumableBatches(batches)  # skips the steps done before a mid-epoch stop
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, generator=torch.Generator(), **common)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.eval_batch_size, sampler=val_sampler, **common)
    return train_loader, val_loader, train_sampler


def get_model(args, num_classes, weights):
    """The --model for `num_classes` from `weights` (--weights, or the --load-from file)."""
    options = {k: getattr(args, k) for k in models.MODEL_OPTIONS if getattr(args, k) is not None}
    options.update(trainable_backbone_layers=args.trainable_backbone_layers)
    backbone = None if args.weights_backbone == "none" else args.weights_backbone
    return models.get_model(args.model, num_classes, weights, backbone, **options)


def create_model(args, num_classes, checkpoint, device, local_rank, amp_dtype=None):
    """The model, ready on `device`: rebuilt from the --resume checkpoint, else from --load-from or --weights.
    Backbone weights download here, once per node; a failure on any rank stops every rank."""
    model, problem = None, None
    with utils.local_main_first(local_rank):
        try:
            if checkpoint is not None:  # the whole model is in it: no download
                if "model_raw" in checkpoint and not args.test_only:  # --ema saved the average as "model"
                    checkpoint = {**checkpoint, "model": checkpoint["model_raw"]}
                sizes = {k: getattr(args, k) for k in ("min_size", "max_size", "box_score_thresh")}
                model = models.model_from_checkpoint(checkpoint, **{k: v for k, v in sizes.items() if v is not None})
            else:
                model = get_model(args, num_classes, args.load_from or args.weights)
            speed = dict(channels_last=args.channels_last, fold_bn=args.fold_bn, fast_roi_align=args.fast_roi_align)
            multiscale = args.data_augmentation == "multiscale"
            models.prepare_model(model, device, multiscale, **speed, compile=args.compile, amp=amp_dtype is not None)
        except (ValueError, utils.SetupError) as e:  # ValueError: parts that do not fit (anchors, --neck, ...)
            problem = str(e)
    if utils.any_rank(problem):
        raise utils.SetupError(problem or "another process could not build the model (above)")
    return model


def get_amp_dtype(args, device):
    """The autocast dtype of --amp / --amp-dtype, or None for fp32."""
    # default: on for CUDA (or when --amp-dtype asks); off on CPU, where bf16 cost ~1.5 AP in README's short runs
    amp = args.amp if args.amp is not None else device.type == "cuda" or args.amp_dtype is not None
    if args.amp is None and not amp and device.type == "cpu":
        from extras import mixed_precision

        mixed_precision.note_native_bf16()  # says when this CPU would train faster with --amp
    if not amp:
        return None
    dtype = args.amp_dtype or ("bf16" if device.type == "cpu" else "fp16")
    print(f"Mixed precision: {dtype} autocast (--no-amp for fp32)")
    return torch.bfloat16 if dtype == "bf16" else torch.float16


def get_optimizer(args, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.opt == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def get_lr_scheduler(args, optimizer):
    if args.lr_scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    if args.lr_scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_steps, gamma=args.lr_gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)


def find_resume(args):
    """--resume auto -> output-dir/checkpoint.pth when it exists (a fresh start otherwise); else the given path.

    Rank 0 decides and every rank follows: with node-local output dirs, some ranks would otherwise resume and others
    start afresh. A rank that cannot read the chosen file stops every rank with the fix.
    """
    if args.resume != "auto":
        if args.resume and not os.path.isfile(args.resume):
            raise utils.SetupError(f"--resume {args.resume}: no such checkpoint")
        return args.resume
    latest = os.path.join(args.output_dir, "checkpoint.pth")
    resume = utils.broadcast_from_main(latest if os.path.isfile(latest) else None)
    if utils.any_rank(resume is not None and not os.path.isfile(resume)):
        raise utils.SetupError(
            f"--resume auto: rank 0 continues from {resume}, which another process cannot read; give --output-dir "
            f"a folder every node shares"
        )
    return resume


def resume_from(checkpoint, args, run):
    """Continue `run` from `checkpoint`: optimizer, schedule and scaler (not for --test-only), the epoch and step to
    start at, the best AP so far and the --ema average."""
    if not args.test_only:
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        run.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if run.scaler is not None and checkpoint.get("scaler"):
            run.scaler.load_state_dict(checkpoint["scaler"])
    run.first_step, run.rng = checkpoint.get("step") or 0, checkpoint.get("rng")
    run.start_epoch = checkpoint["epoch"] + (0 if run.first_step else 1)  # a stopped epoch continues at its next step
    run.best_ap, run.best_epoch = checkpoint.get("best_ap", -1.0), checkpoint.get("best_epoch")
    run.score_thresh = checkpoint.get("score_thresh")
    if run.ema is not None and "model_raw" in checkpoint:  # --ema: "model" is the average, resumed as such
        run.ema.load(checkpoint["model"], checkpoint["ema_updates"])
    if args.test_only:
        step = f", step {run.first_step}" if run.first_step else ""
        print(f"Testing {args.resume} (epoch {checkpoint['epoch']}{step})")
        return
    print(f"Resumed from {args.resume}: continuing at epoch {run.start_epoch}, step {run.first_step}")
    if args.load_from:
        print(f"Note: --resume auto found a checkpoint, so --load-from {args.load_from} is not used")
    if checkpoint["args"].get("epochs", args.epochs) != args.epochs:
        print(f"Note: the run was planned for {checkpoint['args']['epochs']} epochs and now runs to {args.epochs}")


def check_args(args):
    """Flag combinations that cannot work, refused before any heavy work."""
    if args.test_only and not args.resume and str(args.weights).lower() in ("none", "default"):
        print("Note: --test-only without --resume evaluates the --weights model as built (its heads are untrained)")
    if min(args.batch_size, args.eval_interval, args.save_interval, args.accumulate) < 1 or args.epochs < 0:
        raise utils.SetupError("--batch-size, --accumulate, --eval-interval, --save-interval: 1 or more; --epochs >= 0")
    if not 0 <= args.ema < 1:
        raise utils.SetupError(f"--ema {args.ema}: the decay is below 1, e.g. 0.9998 (0 turns it off)")
    if args.resume and args.resume != "auto" and args.load_from:
        raise utils.SetupError("--resume continues a run, --load-from starts a new one from its weights: pass one")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.SetupError("--device cuda, but torch sees no CUDA GPU; pass --device cpu")
    if args.model in ("retinanet", "fcos") and ("proposal" in args.eval or args.tta != "none" or args.tta_scales):
        raise utils.SetupError(f"--eval proposal and --tta need a two-stage R-CNN; {args.model} has no RPN / RoI heads")
    if args.tile and (not args.test_only or args.tile < 32 or "proposal" in args.eval or args.tta != "none"):
        raise utils.SetupError("--tile N (N >= 32 px) evaluates a trained model: with --test-only, no --tta/proposals")
    if args.amp_dtype == "fp16" and not args.device.startswith("cuda"):
        raise utils.SetupError("--amp-dtype fp16 needs CUDA; on CPU use --amp (bf16) or leave it off (fp32)")
    if args.model.startswith("keypointrcnn") and args.data_augmentation == "lsj":
        raise utils.SetupError("--data-augmentation lsj does not move keypoints; use hflip or photometric")


def main(args):
    check_args(args)
    with utils.distributed_run(args.device, args.output_dir) as (device, rank, world_size, local_rank):
        with preemption.StopSignals() as stop:  # SIGTERM / SIGINT / SIGUSR1: save at the next step, then stop
            if args.lr is None:  # linear scaling rule: the tutorial's 0.005 for 2 images, scaled with the total batch
                args.lr = 0.005 * world_size * args.batch_size * args.accumulate / 2
                accumulated = f" x {args.accumulate} accumulated" if args.accumulate > 1 else ""
                print(f"lr = 0.005 x {world_size} processes x {args.batch_size} images{accumulated} / 2 = {args.lr:g} "
                      f"(linear scaling)")  # fmt: skip
            print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} " + " ".join(sys.argv))
            print(json.dumps(vars(args), sort_keys=True))
            utils.seed_everything(args.seed + rank)

            print("Loading data")
            checkpoint = get_checkpoint(args)  # --resume (auto: the output dir's latest, if any)
            train_set, val_set, class_names = load_data(args, local_rank, checkpoint, world_size)
            loaders = get_loaders(args, train_set, val_set, class_names, world_size, rank)
            train_loader, val_loader, train_sampler = loaders

            print("Creating model")
            amp_dtype = get_amp_dtype(args, device)
            model = create_model(args, len(class_names) + 1, checkpoint, device, local_rank, amp_dtype)  # + background
            if world_size > 1 and args.sync_bn:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # frozen BatchNorm layers are left alone
            model_without_ddp = model
            if world_size > 1:
                model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=None if device.index is None else [device.index]
                )
                model_without_ddp = model.module

            optimizer = get_optimizer(args, model_without_ddp)
            lr_scheduler = get_lr_scheduler(args, optimizer)
            scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
            run = types.SimpleNamespace(  # what evaluation and the epochs need, by name
                args=args, device=device, rank=rank, world_size=world_size, stop=stop, class_names=class_names,
                train_loader=train_loader, train_sampler=train_sampler, val_loader=val_loader, val_set=val_set,
                model=model, model_without_ddp=model_without_ddp, optimizer=optimizer, lr_scheduler=lr_scheduler,
                amp_dtype=amp_dtype, scaler=scaler, ema=None, start_epoch=0, first_step=0, rng=None,  # resume_from's
                best_ap=-1.0, best_epoch=None, score_thresh=None, stopped=None,
            )  # fmt: skip
            if args.ema and not args.test_only:  # --test-only evaluates the checkpoint's "model": the average
                from extras import ema  # a moving average of the weights, evaluated and saved

                run.ema = ema.ModelEMA(model_without_ddp, args.ema)

            if checkpoint is not None:
                resume_from(checkpoint, args, run)

            if args.test_only:
                if args.tile:
                    from extras import tiling  # large images: the model on overlapping tiles, detections merged

                    tiles = dict(merge=args.tile_merge, full_image=args.tile_full_image)
                    run.model = tiling.TiledDetector(model_without_ddp, args.tile, args.tile_overlap, **tiles).eval()
                return run_evaluation(run, final=True, show_dir=args.show_dir)
            return train_epochs(run)


def get_checkpoint(args):
    """The --resume checkpoint, or None; it decides the model (a --model that differs gives way, with a note)."""
    resume = args.resume = find_resume(args)
    checkpoint = utils.load_checkpoint(resume) if resume else None
    saved = checkpoint and checkpoint.get("model_args", {}).get("name", checkpoint["args"].get("model"))
    if saved and saved != args.model:
        print(f"Note: {resume} holds a {saved} model: using that")
        args.model = saved
    return checkpoint


def checkpoint_state(run, epoch, step=None):
    """A checkpoint: plain values only, so it loads with weights_only=True; `step` of a stopped epoch."""
    state = {
        "model": evaluated_model(run).state_dict(), "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(), "scaler": run.scaler and run.scaler.state_dict(),
        "epoch": epoch, "step": step, "rng": preemption.rng_state() if step else None,  # continues a stopped epoch
        "best_ap": run.best_ap, "class_names": list(run.class_names), "args": vars(run.args),
        "model_args": run.model_without_ddp.model_args,  # what models.model_from_checkpoint rebuilds it from
        "best_epoch": run.best_epoch, "score_thresh": run.score_thresh,  # predict.py's default --score-thresh
    }  # fmt: skip
    if run.ema is not None:  # "model" holds the average: what --test-only, predict.py and export use
        state.update(model_raw=run.model_without_ddp.state_dict(), ema_updates=run.ema.updates)
    return state


def evaluated_model(run, ddp=False):
    """What is evaluated and saved: the --ema average, else the model (wrapped in DDP with `ddp`)."""
    return run.ema.module if run.ema is not None else run.model if ddp else run.model_without_ddp


def train_epochs(run):
    """The epoch loop: train, evaluate every --eval-interval epochs, save checkpoints and log.jsonl, report."""
    args, rank, loader = run.args, run.rank, run.train_loader
    log_file = os.path.join(args.output_dir, "log.jsonl")
    if rank == 0:
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    print("Start training")
    start_time, train_seconds, metrics, first_step, images = time.time(), 0.0, {}, run.first_step, 0
    for epoch in range(run.start_epoch, args.epochs):
        run.train_sampler.set_epoch(epoch)
        loader.generator.manual_seed(args.seed + 1000 * epoch + rank)
        if first_step:  # resumed mid-epoch: skip the steps done, continue the random stream where it stopped
            preemption.continue_epoch(loader, first_step, run.rng)
        else:
            # Reseed per epoch so the augmentation stream depends on (seed, epoch) only, not on what ran before:
            # a run resumed at this epoch sees the same random flips as one that never stopped.
            utils.seed_everything(args.seed + 1000 * epoch + rank)
        steps_in_epoch, epoch_start = first_step + len(loader), time.time()
        loop = dict(log_file=log_file, first_step=first_step, should_stop=run.stop, max_nonfinite=args.skip_nonfinite)
        update_ema = (lambda: run.ema.update(run.model_without_ddp)) if run.ema is not None else None
        loop.update(accumulate=args.accumulate, after_step=update_ema)
        train_stats = train_one_epoch(run.model, run.optimizer, loader, run.device, epoch, args.print_freq,
                                      run.scaler, run.amp_dtype, **loop)  # fmt: skip
        images += (train_stats["steps"] - first_step) * args.batch_size * run.world_size
        first_step, train_seconds = 0, train_seconds + time.time() - epoch_start
        if train_stats["steps"] < steps_in_epoch:  # a signal arrived: save where we are and leave
            utils.save_checkpoint(checkpoint_state(run, epoch, train_stats["steps"]), args.output_dir, "checkpoint.pth")
            print(f"Stopped at epoch {epoch}, step {train_stats['steps']} of {steps_in_epoch}: "
                  f"{args.output_dir}/checkpoint.pth saved; continue with --resume auto")  # fmt: skip
            return {}
        run.lr_scheduler.step()

        metrics, val_loss = end_of_epoch(run, epoch)
        # rss_mb: this process's memory after the epoch, so a leak shows as growth from one epoch to the next
        log = {"epoch": epoch, "train": train_stats, "val_loss": val_loss, "rss_mb": utils.current_rss_mb()}
        log.update({k: v for k, v in metrics.items() if k != "detections"})
        if rank == 0:
            with open(log_file, "a") as f:
                f.write(json.dumps(log) + "\n")
        if epoch + 1 < args.epochs and run.stop():  # the signal came with the epoch's last step
            print(f"Stopped after epoch {epoch}: {args.output_dir}/checkpoint.pth saved; continue with --resume auto")
            return metrics
        if args.patience and epoch + 1 < args.epochs:
            from extras import early_stop  # --patience: stop when the validation AP no longer improves

            if early_stop.should_stop(run, epoch):
                break

    total = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total))}")
    if rank == 0 and args.epochs > run.start_epoch:
        from extras import report  # report.md: metrics, curves, drawn validation images, throughput

        sampling = getattr(run.train_sampler, "summary", None)  # --repeat-factor-thr's table
        report.write_report(args, metrics, log_file, images / max(train_seconds, 1e-9), total, run.stopped, sampling)
    return metrics


def end_of_epoch(run, epoch):
    """Evaluate when due (every --eval-interval epochs and after the last), then save checkpoint.pth, model_{epoch}.pth
    (every --save-interval epochs) and best.pth (best bbox AP, or proposal recall); returns (metrics, val_loss)."""
    args, metrics, val_loss, last = run.args, {}, {}, epoch + 1 == run.args.epochs
    if (epoch + 1) % args.eval_interval == 0 or last:
        metrics = run_evaluation(
            run, last, os.path.join(args.output_dir, "val_images") if last and run.rank == 0 else None
        )
        if args.val_loss:
            from extras import val_loss as validation  # the training losses on the validation set

            val_loss = validation.validation_loss(evaluated_model(run), run.val_loader, run.device, run.amp_dtype)
            print("Validation loss: " + "  ".join(f"{k}: {v:.4f}" for k, v in val_loss.items()))
    ap = metrics.get("bbox", {}).get("AP", metrics.get("proposal", {}).get("AR@1000", -1.0))
    is_best, run.best_ap = ap > run.best_ap, max(run.best_ap, ap)
    run.best_epoch = epoch if is_best else run.best_epoch
    if metrics:
        from extras import error_analysis

        run.score_thresh = error_analysis.recommended_threshold(metrics)
    state = checkpoint_state(run, epoch)
    names = ["checkpoint.pth"] + [f"model_{epoch}.pth"] * ((epoch + 1) % args.save_interval == 0)
    for name in names + ["best.pth"] * is_best:
        utils.save_checkpoint(state, args.output_dir, name)
    return metrics, val_loss


def run_evaluation(run, final, show_dir=None):
    """The --eval metrics; on the `final` evaluation the --tta ones too, under "tta", with the AP they change, and the
    detections written to --out."""
    args, model, val_loader, device, metrics = run.args, evaluated_model(run, ddp=True), run.val_loader, run.device, {}
    from extras import error_analysis  # confusion matrix, per-class precision / recall, a recommended --score-thresh

    scorers = [error_analysis.scorer(args.confusion_thresh)]
    if args.dataset == "voc":
        from extras import voc_eval  # VOC's mAP@0.5 next to COCO's AP

        scorers.append(voc_eval.score)
    options = dict(class_names=run.class_names, amp_dtype=run.amp_dtype, scorers=scorers)
    if "bbox" in args.eval:
        on_image = None
        if show_dir:
            from extras import draw  # drawn predictions: --show-dir, report.md's images

            on_image = draw.ImageSaver(show_dir, run.class_names, None if args.test_only else args.report_images)
        metrics = evaluate(model, val_loader, device, **options, on_image=on_image)
    if "proposal" in args.eval:
        from extras import proposals  # the RPN's recall, to tune anchors

        metrics["proposal"] = proposals.evaluate_proposals(model, val_loader, device, amp_dtype=run.amp_dtype)
    if final and "bbox" in args.eval and (args.tta != "none" or args.tta_scales):
        from extras import tta  # test-time augmentation

        views = dict(hflip=args.tta == "hflip", scales=args.tta_scales, merge=args.tta_merge)
        tta.evaluate_with_tta(evaluated_model(run), val_loader, device, metrics, **views, **options)
    if final and args.out:
        from extras import results_json  # the detections as a COCO results json

        results_json.write_detections(args.out, metrics, run.val_set)
    return metrics


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
