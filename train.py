"""Fine-tune a torchvision detector on your data.

    python train.py --dataset pennfudan                                  # tutorial recipe: Mask R-CNN, COCO weights
    python train.py --dataset pennfudan --data-path DIR --weights none   # offline, from random weights
    torchrun --nproc_per_node 2 train.py --dataset pennfudan ...          # several processes (GPUs or CPU)

Everything a run writes goes to --output-dir: checkpoint.pth (latest), model_{epoch}.pth, best.pth, args.json,
log.txt (the console) and log.jsonl (one JSON object per epoch). The flags are in options.py; the extras (extras/:
compose.py, speed.py, tta.py, ...) are imported where a flag asks for them.
"""

import datetime
import json
import os
import sys
import time
import types

import torch

import checkpoints
import datasets
import models
import transforms
import utils
from checkpoints import evaluated_model
from datasets.group_by_aspect_ratio import GroupedBatchSampler, aspect_ratio_groups
from engine import evaluate, train_one_epoch
from extras import preemption
from options import check_args, get_args_parser


def get_datasets(args):
    """(train, val, class names) for --dataset, with the train/eval transforms applied."""
    train_tf = transforms.get_transform(train=True, policy=args.data_augmentation)
    val_tf = transforms.get_transform(train=False)
    split = dict(val_size=args.val_size, split_seed=args.split_seed)
    annotations = dict(train_ann=args.train_ann, val_ann=args.val_ann)
    coco = dict(train_images=args.train_images, val_images=args.val_images, masks=args.model.startswith("maskrcnn"))
    options = {
        "pennfudan": dict(**split, download=args.data_path is None),
        "coco": dict(**annotations, **coco, keep_empty=not args.drop_empty),
        "voc": dict(**split, classes=args.classes, train_split=args.train_split, val_split=args.val_split),
        "custom": dict(**split, **annotations, classes=args.classes),
        "yolo": split,  # data.yaml names the splits (a missing val split: held out as above) and the classes
    }.get(args.dataset, dict(**annotations, classes=args.classes))  # a dataset you add: annotation files, classes
    if args.dataset in ("coco", "voc", "custom", "yolo"):  # (boxes made from Penn-Fudan's masks are never degenerate)
        options["strict"] = args.strict
    train_set, val_set, class_names = datasets.get_dataset(args.dataset, args.data_path, train_tf, val_tf, **options)
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
    saved = checkpoint and checkpoint.get("class_names")
    if saved is not None and list(saved) != list(class_names):  # its heads would score classes that mean others
        raise utils.SetupError(
            f"{args.resume} was trained on classes {list(saved)}, the dataset has {list(class_names)}.\n"
            f"  Pass the same --classes, or start a new run from its weights with --load-from {args.resume}"
        )
    datasets.check_for_model(train_set, args.model, args.batch_size, world_size)
    if args.cache_images:
        from extras import cache_images  # every image decoded once, kept in memory

        cache_images.cache_images(train_set, val_set)
    return train_set, val_set, class_names


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
    # Its own generator (reseeded per epoch) seeds the workers, so an epoch's start draws nothing from torch's global
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
            checkpoint = checkpoints.get_checkpoint(args)  # --resume (auto: the output dir's latest, if any)
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
                device_ids = None if device.index is None else [device.index]  # None on CPU (gloo)
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

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
                checkpoints.resume_from(checkpoint, run)

            if args.test_only:
                if args.tile:
                    from extras import tiling  # large images: the model on overlapping tiles, detections merged

                    tiles = dict(merge=args.tile_merge, full_image=args.tile_full_image)
                    run.model = tiling.TiledDetector(model_without_ddp, args.tile, args.tile_overlap, **tiles).eval()
                return run_evaluation(run, final=True, show_dir=args.show_dir)
            return train_epochs(run)


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
            state = checkpoints.checkpoint_state(run, epoch, train_stats["steps"])
            checkpoints.save_checkpoint(state, args.output_dir, "checkpoint.pth")
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
        show_dir = os.path.join(args.output_dir, "val_images") if last and run.rank == 0 else None  # for report.md
        metrics = run_evaluation(run, last, show_dir)
        if args.val_loss:
            from extras import val_loss as validation  # the training losses on the validation set

            val_loss = validation.validation_loss(evaluated_model(run), run.val_loader, run.device, run.amp_dtype)
            print("Validation loss: " + "  ".join(f"{k}: {v:.4f}" for k, v in val_loss.items()))
    ap = metrics.get("bbox", {}).get("AP", metrics.get("proposal", {}).get("AR@1000", -1.0))
    is_best, run.best_ap = ap > run.best_ap, max(run.best_ap, ap)
    run.best_epoch = epoch if is_best else run.best_epoch
    checkpoints.save_epoch(run, epoch, is_best)
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
    run.score_thresh = error_analysis.recommended_threshold(metrics)  # saved: predict.py's default --score-thresh
    if final and args.out:
        from extras import results_json  # the detections as a COCO results json

        results_json.write_detections(args.out, metrics, run.val_set)
    return metrics


if __name__ == "__main__":
    utils.cli(main, get_args_parser())
