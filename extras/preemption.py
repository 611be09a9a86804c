"""Stop and resume mid-epoch: SLURM's preemption, a time limit, Ctrl-C or `kill` end a run with a checkpoint of the
step it reached, and --resume auto continues from that step with the same batches and random augmentations.

train.py runs inside `with StopSignals() as stop` (train_one_epoch asks stop() after each step), builds its loaders on
ResumableBatches with ignore_stop_signals in the workers, saves rng_state() with a stopped epoch's checkpoint and
continues it with continue_epoch(). Without this file a run stops only between epochs (Ctrl-C loses the epoch).
"""

import itertools
import os
import random
import signal
import threading

import numpy as np
import torch

import utils


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 (what SLURM, torchrun and Ctrl-C send) ask the run to stop after the current step.

    Calling the object tells whether any rank got one, so all ranks stop at the same step; a second Ctrl-C stops
    at once. `restore()` puts the previous handlers back.
    """

    NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self):
        self.received = None
        self.previous = {name: signal.signal(getattr(signal, name), self._handle) for name in self.NAMES}

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"{self.received} received: stopping after this step, with a checkpoint to resume from", flush=True)

    def __call__(self):
        flag = self.received is not None
        if utils.get_world_size() > 1:
            flag_tensor = torch.tensor([float(flag)], device=utils.collective_device())
            torch.distributed.all_reduce(flag_tensor)
            flag = flag_tensor.item() > 0
        return flag

    def restore(self):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def ignore_stop_signals(worker_id=None):
    """DataLoader workers' worker_init_fn: stop signals are the main process's to handle. SLURM, `timeout`, systemd
    and Ctrl-C signal the whole process group, and torch's workers die of SIGTERM, which ends the run without a
    checkpoint; ignoring the signals here, the main process finishes its step, saves and shuts the workers down.

    The main process itself ends workers with SIGTERM (at exit, after an error), and that one must still work. A
    Python handler cannot see who sent a signal, so SIGTERM is blocked and a thread reads each one with its sender.
    """
    for name in ("SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the block

    def wait_for_sigterm():
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == os.getppid():
                os._exit(0)  # what torch's own worker handler does when its parent asks

    threading.Thread(target=wait_for_sigterm, daemon=True).start()


class ResumableBatches(torch.utils.data.Sampler):
    """A batch sampler whose next pass starts `skip` batches in: a run resumed mid-epoch continues where it stopped,
    with the epoch's order unchanged and without loading the batches it skips (only indices are drawn)."""

    def __init__(self, batch_sampler):
        self.batch_sampler, self.skip = batch_sampler, 0

    def __iter__(self):
        # A generator: this body runs at the first batch, not at iter(). With workers, the DataLoader calls iter()
        # twice and draws from the second iterator only; consuming the skip at iter() would lose it to the first.
        skip, self.skip = self.skip, 0
        yield from itertools.islice(self.batch_sampler, skip, None)

    def __len__(self):
        return len(self.batch_sampler) - self.skip


def rng_state():
    """Python, NumPy and torch CPU generator states as tensors and plain data (a checkpoint loads weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos}
    numpy_state.update(has_gauss=has_gauss, cached=cached)
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])


def continue_epoch(loader, step, rng):
    """Resume a stopped epoch: `loader` (built on ResumableBatches) skips its first `step` batches, and the random
    stream continues from the checkpoint's `rng`."""
    loader.batch_sampler.skip = step
    set_rng_state(rng)


def latest_checkpoint(output_dir):
    """--resume auto: output_dir/checkpoint.pth when it exists, else None (a fresh start).

    Rank 0 decides and every rank follows: with node-local output dirs, some ranks would otherwise resume and others
    start afresh. A rank that cannot read the chosen file stops every rank with the fix.
    """
    latest = os.path.join(output_dir, "checkpoint.pth")
    resume = utils.broadcast_from_main(latest if os.path.isfile(latest) else None)
    if utils.any_rank(resume is not None and not os.path.isfile(resume)):
        raise utils.SetupError(
            f"--resume auto: rank 0 continues from {resume}, which another process cannot read; give --output-dir "
            f"a folder every node shares"
        )
    return resume
