"""--patience N: stop training when the validation AP has not improved for N evaluations in a row.

The best weights are already in best.pth (train.py saves it at each new best); when the run stops here, best.pth and
report.md say at which epoch the best came and why training stopped. The count is taken from the epoch of the best
(kept in every checkpoint), so a resumed run stops where the uninterrupted one would have. Delete this file and its
call in train.py and every run trains for --epochs.
"""

import os

import torch

import checkpoints
import utils


def evaluations_since(best_epoch, epoch, eval_interval):
    """Evaluations after `best_epoch` up to `epoch`: train.py evaluates after every epoch e with (e+1) % interval 0."""
    first = -1 if best_epoch is None else best_epoch
    return sum((e + 1) % eval_interval == 0 for e in range(first + 1, epoch + 1))


def should_stop(run, epoch):
    """True when --patience evaluations have passed without a better AP; then best.pth and run.stopped say why."""
    args = run.args
    stale = evaluations_since(run.best_epoch, epoch, args.eval_interval)
    if stale < args.patience:
        return False
    best = f"the best AP, {run.best_ap:.4f}, came at epoch {run.best_epoch}" if run.best_epoch is not None else ""
    run.stopped = f"stopped early after epoch {epoch}: {stale} evaluations without a better AP (--patience "
    run.stopped += f"{args.patience}); {best or 'no evaluation scored'}"
    print(f"Early stop: {run.stopped}")
    best_file = os.path.join(args.output_dir, "best.pth")
    if utils.is_main_process() and os.path.isfile(best_file):
        state = torch.load(best_file, map_location="cpu", weights_only=True)
        state["stopped"] = run.stopped
        checkpoints.save_checkpoint(state, args.output_dir, "best.pth")
    return True
