"""Logging, batching, seeding and distributed helpers shared by train.py and engine.py.

Every distributed helper is harmless in a single process: `get_world_size()` is 1, `reduce_dict`
returns its input and `all_gather` returns a one-element list.
"""

import builtins
import contextlib
import datetime
import os
import random
import sys
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist


class SmoothedValue:
    """Tracks a series of values: the median/average of a recent window and the global average."""

    def __init__(self, window_size=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.deque, self.total, self.count, self.fmt = deque(maxlen=window_size), 0.0, 0, fmt

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks so `global_avg` is the average of the whole run (the window stays local)."""
        if get_world_size() == 1:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=collective_device())
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def avg(self):
        return float(np.mean(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        stats = dict(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value)
        return self.fmt.format(**stats)


class MetricLogger:
    """A dict of SmoothedValues that prints torchvision's familiar progress line every `print_freq` steps."""

    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value))

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq, header=""):
        """Yield from `iterable`, printing `header [i/N] eta ... meters ... time data max mem` as it goes."""
        total = len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [f"{header} [{i:>{width}}/{total}]", f"eta: {eta}", str(self)]
                parts += [f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total_time = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {total_time} ({(time.time() - start) / max(total, 1):.4f} s / it)")


def collate_fn(batch):
    """Detection batches are lists: images differ in size and targets in box count, so nothing is stacked."""
    return tuple(zip(*batch))


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) so a run can be repeated exactly on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------- distributed
def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def collective_device():
    # nccl only moves CUDA tensors, gloo only CPU ones
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def reduce_dict(input_dict, average=True):
    """Average (or sum) a dict of scalar tensors over all ranks, for logging losses every rank agrees on."""
    world_size = get_world_size()
    if world_size == 1:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict)
        values = torch.stack([input_dict[k].detach().float() for k in names]).to(collective_device())
        dist.all_reduce(values)
        if average:
            values /= world_size
        return {k: v for k, v in zip(names, values)}


def all_gather(obj):
    """Gather any picklable object from every rank; returns the list ordered by rank."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj):
    """Gather any picklable object on rank 0 only (the list ordered by rank); None on the other ranks."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (what the others pass is ignored)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_rank(flag):
    """True on every rank if `flag` is true on any: a decision all processes take together."""
    if get_world_size() == 1:
        return bool(flag)
    tensor = torch.tensor([float(bool(flag))], device=collective_device())
    dist.all_reduce(tensor)
    return tensor.item() > 0


@contextlib.contextmanager
def local_main_first(local_rank):
    """Run the block on each node's local rank 0 first, then on the others: downloads happen once per node, and
    the others find the files. The block must not raise (collect problems instead) or the barrier is missed."""
    if get_world_size() > 1 and local_rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if get_world_size() > 1 and local_rank == 0:
            dist.barrier()


def init_distributed_mode(device="cuda", dist_url="env://"):
    """Join the process group that torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or an srun step (extras/slurm.py) set up;
    returns (distributed, rank, world_size, local_rank). A plain `python train.py` runs as one process, also inside
    an sbatch script of several tasks (not a step: its peers never start). The backend is nccl for CUDA (the local
    rank's GPU, modulo the visible ones) and gloo for CPU."""
    env = os.environ
    torchrun = "RANK" in env and "WORLD_SIZE" in env
    if not torchrun and "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", 1)) > 1:
        from extras import slurm  # an srun step: SLURM's variables become torchrun's

        slurm.set_torchrun_env(env)
    elif not torchrun:
        return False, 0, 1, 0
    rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    backend = "gloo"
    if str(device).startswith("cuda"):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank)
    dist.barrier()
    return True, rank, world_size, local_rank


@contextlib.contextmanager
def distributed_run(device="cuda", output_dir="."):
    """Set up a run: join the process group (torchrun / srun), pick the device, print on rank 0 only (also to
    output_dir/log.txt); yields (device, rank, world_size, local_rank) and undoes it all at the end."""
    distributed, rank, world_size, local_rank = init_distributed_mode(device)
    device = torch.device(device)  # --device cuda:1 in one process is that GPU
    if device.type == "cuda":
        if distributed or device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # the local rank's, set by init
        torch.cuda.set_device(device)
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
    restore_print = setup_logging(rank == 0, os.path.join(output_dir, "log.txt"))
    try:
        yield device, rank, world_size, local_rank
    finally:
        restore_print()
        if distributed:
            dist.destroy_process_group()


class SetupError(Exception):
    """A problem the user fixes (a missing file, a bad flag): `cli` prints it as one message, no traceback."""


def cli(main, parser):
    """Run a script's main(args): a SetupError becomes one "error: ..." line and exit code 2, never a traceback. An
    int returned by main is the exit code (a checker's 1 for "problems found"); anything else means success."""
    try:
        code = main(parser.parse_args())
    except SetupError as e:
        # raised in a DataLoader worker, the message carries the worker's traceback: keep only our own words
        print(f"error: {str(e).rsplit(f'{type(e).__name__}: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def setup_logging(is_master, log_file=None):
    """Only rank 0 prints (others only with print(..., force=True)); rank 0 also appends what it prints to `log_file`.
    Returns a function that puts the original print back (tests call main() many times in one process)."""
    builtin_print = builtins.print
    log = open(log_file, "a", buffering=1) if is_master and log_file else None

    def print(*args, force=False, **kwargs):
        if is_master or force:
            builtin_print(*args, **kwargs)
            if log is not None and kwargs.get("file") is None:
                builtin_print(*args, **kwargs, file=log)

    def restore():
        builtins.print = builtin_print
        if log is not None:
            log.close()

    builtins.print = print
    return restore


def current_rss_mb():
    """Resident memory of this process now, in MiB (Linux's /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None
