"""How fast does this machine fine-tune and evaluate? The project's default configuration against a plain one.

    python references/benchmark.py --data-path ../shared/data/PennFudanPed --weights stand-in
    python references/benchmark.py --data-path ../shared/data/PennFudanPed --weights stand-in \\
        --model fasterrcnn_mobilenet_v3_large_fpn --batch-size 2 --repeats 3
    python references/benchmark.py --data-path ../shared/data/PennFudanPed --weights none \\
        --model fasterrcnn_mobilenet_v3_large_fpn --accuracy-epochs 6     # same training, AP of each configuration

Configurations (--configs, in this order, alternating when --repeats > 1; each compared with the first):
    plain    fp32, contiguous (NCHW) layout, frozen BatchNorm as separate layers, torchvision's RoIAlign, evaluation
             pinned to one thread: what torchvision's reference scripts do
    default  train.py's defaults: fp32 on CPU (fp16 autocast on CUDA), channels_last, frozen BatchNorm folded into
             the convolutions, the multi-threaded RoIAlign, evaluation on every thread
    amp      default + --amp: bf16 autocast on CPU (fast where the CPU has native bf16)
    compile  default + --compile (torch.compile of the backbone; its first steps compile, which the warm-up absorbs)
    eval-batch-2  default + --eval-batch-size 2 (two images per evaluation batch)
Each measurement runs in a fresh process (peak memory is that process's), started one after the other so the
configurations see the same machine: timings on a shared machine swing 2-3x, so compare within one run only.

Training img/s: --iters steps after --warmup steps, data loading included (train.py's loader and -j workers).
Evaluation img/s: the whole engine.evaluate() over --eval-images validation images, COCO scoring included.
Peak memory: the process's peak RSS on CPU (DataLoader workers not counted), max allocated on CUDA.
--weights stand-in: random weights laid out as torchvision's COCO file (frozen BatchNorm, 3 trainable backbone
stages), so a machine without internet measures the speed of fine-tuning. Every other train.py flag is passed on.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where train.py lives
import common  # noqa: E402

import engine  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402

# name -> (train.py flags, evaluation threads: None = all)
CONFIGS = {
    "plain": (["--no-amp", "--no-channels-last", "--no-fold-bn", "--no-fast-roi-align"], 1),
    "default": ([], None),
    "amp": (["--amp"], None),
    "compile": (["--compile"], None),
    "eval-batch-2": (["--eval-batch-size", "2"], None),
}


def get_args_parser():
    parser = common.parser_with_train_flags(__doc__)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--configs", default="plain,default,amp", help="configurations to compare (default all three)")
    bench.add_argument("--iters", default=10, type=int, help="timed training steps (default 10)")
    bench.add_argument("--warmup", default=3, type=int, help="untimed training steps before them (default 3)")
    bench.add_argument("--eval-images", default=20, type=int, help="validation images evaluated (default 20)")
    bench.add_argument("--repeats", default=1, type=int, help="measurements of each configuration (default 1)")
    bench.add_argument(
        "--accuracy-epochs",
        default=0,
        type=int,
        help="instead: train each configuration for N epochs with train.py and compare AP (default 0)",
    )
    bench.add_argument("--json", default="work_dirs/benchmark/benchmark.json", help="results file")
    bench.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one measurement, in a child process
    return parser


class Take:
    """`n` batches of a DataLoader, passing over it again when it ends, with a length (MetricLogger prints [i/n])."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        taken = 0
        while taken < self.n:
            for batch in self.loader:
                yield batch
                taken += 1
                if taken == self.n:
                    return


@torch.no_grad()
def stand_in_weights(model_name, folder):
    """A torchvision COCO-layout file of random weights: get_model builds from it as from the real download.

    Its BatchNorm statistics are measured on random images, so that activations keep a sane scale through the
    frozen layers, as with trained weights (with the initial mean 0 / variance 1 they grow without bound, and a
    step then costs what NaN and huge proposal sets cost, not what fine-tuning costs).
    """
    torch.manual_seed(0)  # the same stand-in on every run
    model = torchvision.models.get_model(model_name, weights=None, weights_backbone=None, num_classes=91)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    model.backbone.train()
    mean, std = (
        torch.tensor(model.transform.image_mean)[:, None, None],
        torch.tensor(model.transform.image_std)[:, None, None],
    )
    for _ in range(4):
        model.backbone((torch.rand(2, 3, 512, 640) - mean) / std)
    state = model.state_dict()
    path = os.path.join(folder, f"{model_name}_stand_in.pth")
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def measure(args):
    """One configuration, in this process: training and evaluation throughput, peak memory."""
    eval_threads = CONFIGS[args.worker][1]
    train_set, val_set, class_names = train.get_datasets(args)
    val_set = torch.utils.data.Subset(val_set, range(min(args.eval_images, len(val_set))))
    train_loader, val_loader, _ = train.get_loaders(args, train_set, val_set, class_names, 1, 0)
    device = torch.device(args.device)
    # The speed does not depend on the lr; random stand-in heads diverge at the tutorial's 0.005 without warm-up
    args.lr = args.lr or 1e-4
    model = train.get_model(args, len(class_names) + 1, args.weights)
    speed = dict(channels_last=args.channels_last, fold_bn=args.fold_bn, fast_roi_align=args.fast_roi_align)
    amp_dtype = train.get_amp_dtype(args, device)
    multiscale = args.data_augmentation == "multiscale"
    models.prepare_model(model, device, multiscale, **speed, compile=args.compile, amp=amp_dtype is not None)
    optimizer = train.get_optimizer(args, model)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def steps(n):  # epoch 1: no lr warm-up, the steady state
        options = dict(max_nonfinite=n)  # a NaN step is skipped and counted, not fatal, in a speed measurement
        return engine.train_one_epoch(
            model, optimizer, Take(train_loader, n), device, 1, args.print_freq, scaler, amp_dtype, **options
        )

    steps(args.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    stats = steps(args.iters)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - tic

    threads = torch.get_num_threads()
    torch.set_num_threads(eval_threads or threads)
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        model([val_set[0][0].to(device)])  # warm-up: the first call of a kernel at a new size is slow
    tic = time.perf_counter()
    metrics = engine.evaluate(model, val_loader, device, class_names, amp_dtype=amp_dtype, print_freq=1000)
    eval_seconds = time.perf_counter() - tic
    torch.set_num_threads(threads)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in kB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return {
        "train_img_s": args.iters * args.batch_size / train_seconds,
        "eval_img_s": len(val_set) / eval_seconds,
        "peak_mb": peak,
        "bbox_AP": metrics.get("bbox", {}).get("AP"),
        "nan_steps": stats["nonfinite_skipped"],
        "timed_steps": stats["steps"],  # in the JSON, not the table
    }


def run_worker(argv, config):
    """`measure` in a child process (fresh memory, fresh thread pools); returns its JSON line."""
    command = [sys.executable, __file__, *argv, "--worker", config]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise utils.SetupError(f"the {config} measurement failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_for_accuracy(argv, config, args):
    """train.py for --accuracy-epochs in a child process; its final metrics from log.jsonl. Of its checkpoints only
    best.pth stays (a measurement: no model_{epoch}.pth, and checkpoint.pth is removed once the run has finished)."""
    out = os.path.join(os.path.dirname(args.json) or ".", f"accuracy_{config}")
    epochs = ["--epochs", str(args.accuracy_epochs), "--save-interval", str(args.accuracy_epochs + 1)]
    flags = [*argv, *CONFIGS[config][0], *epochs, "--output-dir", out]
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), *flags]
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise utils.SetupError(f"training the {config} configuration failed:\n{done.stderr.strip()[-2000:]}")
    last = json.loads(Path(out, "log.jsonl").read_text().splitlines()[-1])
    Path(out, "checkpoint.pth").unlink()
    result = {"minutes": (time.perf_counter() - tic) / 60}
    result.update({f"{t}_{k}": last[t][k] for t in ("bbox", "segm") if t in last for k in ("AP", "AP50")})
    return result


def own_argv(argv):
    """The command line without the benchmark's own flags: what train.py (and the workers) receive."""
    own = {"--configs", "--iters", "--warmup", "--eval-images", "--repeats", "--accuracy-epochs", "--json"}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=")[0] in own:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def main(args, argv):
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise utils.SetupError(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    passed = own_argv(argv)  # for train.py; a measuring worker also needs how much to measure
    measured = ["--iters", str(args.iters), "--warmup", str(args.warmup), "--eval-images", str(args.eval_images)]
    with tempfile.TemporaryDirectory() as folder:
        if args.weights == "stand-in":  # argparse keeps the last --weights
            passed = [*passed, "--weights", stand_in_weights(args.model, folder)]
        results = {c: [] for c in configs}
        for repeat in range(1 if args.accuracy_epochs else args.repeats):
            for config in configs:
                print(f"[{repeat + 1}/{args.repeats}] {config} ...", flush=True)
                if args.accuracy_epochs:
                    results[config].append(train_for_accuracy(passed, config, args))
                else:
                    results[config].append(run_worker([*passed, *measured, *CONFIGS[config][0]], config))
    # per configuration: the median over repeats of each number
    summary = {
        c: {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in runs[0]}
        for c, runs in results.items()
    }

    print(
        f"\n{args.model} on {args.dataset}, batch {args.batch_size}, device {args.device}, "
        f"{torch.get_num_threads()} threads, median of {len(next(iter(results.values())))} runs"
    )
    keys = [k for k in summary[configs[0]] if k != "timed_steps"]
    print(f"| config | {' | '.join(keys)} |\n|---|{'---|' * len(keys)}")
    for config in configs:
        print(f"| {config} | " + " | ".join(f"{summary[config][k]:.3g}" for k in keys) + " |")
    base = configs[0]  # the others are compared with the first
    for config in configs[1:]:
        ratios = ", ".join(f"{k} x{summary[config][k] / summary[base][k]:.2f}" for k in keys if summary[base][k])
        print(f"{config} / {base}: {ratios}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"command": " ".join([sys.executable, *sys.argv]), "runs": results, "median": summary}, f, indent=2)
    print(f"Wrote {args.json}")


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.worker:  # a child process: one measurement, printed as the last line
        print(json.dumps(measure(parsed)))
    else:
        utils.cli(lambda a: main(a, sys.argv[1:]), get_args_parser())
