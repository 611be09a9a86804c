"""Checkpoints: plain dicts of tensors and plain data (model, optimizer, lr_scheduler, scaler, epoch, args, ...),
written atomically by rank 0 and loaded on the CPU with weights_only=True, so a file cannot run code.
"""

import contextlib
import os

import torch

from utils import SetupError, is_main_process


def atomic_save(obj, path):
    """torch.save that never leaves a half-written file: write a temp file, fsync, then rename over `path`. A kill
    or a full disk at any moment leaves the previous file at `path` intact and loadable."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory; the rename is atomic anyway
        os.fsync(dir_fd)  # makes the rename itself durable
    os.close(dir_fd)


def save_on_master(obj, path):
    if is_main_process():
        atomic_save(obj, path)


def load_checkpoint(path, flag="--resume", fix=None):
    """A checkpoint of this project: only tensors and plain data are unpickled, so a file cannot run code. Errors
    name the file as given with `flag`, and say what to do (`fix`; default: start from its weights)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip, or an old-style pickle
        raise SetupError(f"{flag} {path} is not a PyTorch file; pass a checkpoint.pth written by train.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = next((line.strip() for line in lines if "error" in line.lower()), lines[0])  # weights_only's why
        raise SetupError(f"cannot load checkpoint {path}: {reason}") from e
    if isinstance(checkpoint, dict) and {"model", "epoch"} <= checkpoint.keys():
        return checkpoint
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        what = "holds a bare state dict (weights only)"
    else:
        what = f"holds a {type(checkpoint).__name__}, not a train.py checkpoint (model, optimizer, epoch, ...)"
    raise SetupError(f"{flag} {path} {what}; {fix or f'to start from its weights pass --load-from {path}'}")


def save_checkpoint(state, output_dir, name):
    """Atomic write on rank 0; a full disk stops the run with the fix, the previous file left intact."""
    path = os.path.join(output_dir, name)
    try:
        save_on_master(state, path)
    except OSError as e:
        raise SetupError(
            f"could not write {path} ({e}); the previous {name} is intact. Free disk space, then --resume auto"
        ) from e


def get_checkpoint(args):
    """The --resume checkpoint, or None; it decides the model (a --model that differs gives way, with a note)."""
    if args.resume == "auto":  # the output dir's checkpoint.pth if there is one, else a fresh start
        from extras import preemption  # rank 0 looks, every rank follows

        args.resume = preemption.latest_checkpoint(args.output_dir)
    elif args.resume and not os.path.isfile(args.resume):
        raise SetupError(f"--resume {args.resume}: no such checkpoint")
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    saved = checkpoint and checkpoint.get("model_args", {}).get("name", checkpoint["args"].get("model"))
    if saved and saved != args.model:
        print(f"Note: {args.resume} holds a {saved} model: using that")
        args.model = saved
    return checkpoint


def evaluated_model(run, ddp=False):
    """What is evaluated and saved: the --ema average, else the model (wrapped in DDP with `ddp`)."""
    return run.ema.module if run.ema is not None else run.model if ddp else run.model_without_ddp


def checkpoint_state(run, epoch, step=None):
    """A checkpoint: plain values only, so it loads with weights_only=True; `step` of a stopped epoch."""
    model = evaluated_model(run)  # --ema: the average is "model"
    state = {
        "model": model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(), "scaler": run.scaler and run.scaler.state_dict(),
        "epoch": epoch, "step": step, "rng": None,  # step, rng: where a stopped epoch continues
        "best_ap": run.best_ap, "class_names": list(run.class_names), "args": vars(run.args),
        "model_args": run.model_without_ddp.model_args,  # what models.model_from_checkpoint rebuilds it from
        "best_epoch": run.best_epoch, "score_thresh": run.score_thresh,  # predict.py's default --score-thresh
    }  # fmt: skip
    if step:
        from extras import preemption  # the random streams, so the epoch continues exactly

        state["rng"] = preemption.rng_state()
    if run.ema is not None:  # what --test-only, predict.py and export use is the average; the raw weights resume
        state.update(model_raw=run.model_without_ddp.state_dict(), ema_updates=run.ema.updates)
    return state


def resume_from(checkpoint, run):
    """Continue `run` from `checkpoint`: optimizer, schedule and scaler (not for --test-only), the epoch and step to
    start at, the best AP so far and the --ema average."""
    args = run.args
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


def save_epoch(run, epoch, is_best):
    """The end of an epoch: checkpoint.pth, model_{epoch}.pth every --save-interval epochs, best.pth when `is_best`."""
    state, args = checkpoint_state(run, epoch), run.args
    names = ["checkpoint.pth"] + [f"model_{epoch}.pth"] * ((epoch + 1) % args.save_interval == 0)
    for name in names + ["best.pth"] * is_best:
        save_checkpoint(state, args.output_dir, name)
