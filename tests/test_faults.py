"""Bad days: a preemption signal mid-epoch, a full disk, NaN losses."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_pennfudan

import checkpoints
import engine
import train
import utils
from extras import preemption

TINY = (
    "--weights none --min-size 64 --max-size 96 -j 0 --print-freq 1 --model fasterrcnn_mobilenet_v3_large_320_fpn "
    "--val-size 2 --lr-step-size 1 --no-val-loss"
).split()


def train_cli(data, out, *extra):
    cli = [sys.executable, str(REPO / "train.py"), "--data-path", str(data), "--output-dir", str(out), "--epochs", "2"]
    return cli + TINY + ["--save-interval", "100"] + list(extra)  # no model_{epoch}.pth: ~150 MB each


def test_sigterm_mid_epoch_then_resume_auto_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "pf"
    make_pennfudan(data, num_images=12)  # 10 training images: 5 steps per epoch
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(train_cli(data, tmp_path / "straight"), check=True, capture_output=True, timeout=600, env=env)

    proc = subprocess.Popen(train_cli(data, tmp_path / "stopped"), stdout=subprocess.PIPE, text=True, env=env)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("Epoch: [0] [1/5]"):  # step 1 is done (mid warm-up): preempt in the middle of the epoch
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=600) == 0, "".join(output[-20:])
    printed = "".join(output)
    assert "SIGTERM received" in printed and "Stopped at epoch 0, step" in printed
    stopped = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)
    assert stopped["epoch"] == 0 and 2 <= stopped["step"] < 5

    resumed = subprocess.run(
        train_cli(data, tmp_path / "stopped", "--resume", "auto"), capture_output=True, text=True, timeout=600, env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing at epoch 0, step {stopped['step']}" in resumed.stdout
    assert f"Epoch: [0] [0/{5 - stopped['step']}]" in resumed.stdout  # only the remaining steps are run
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    final = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)
    assert final["epoch"] == straight["epoch"] == 1 and final["step"] is None
    for key, value in straight["model"].items():
        assert torch.equal(value, final["model"][key]), key


def test_full_disk_during_a_checkpoint_write_stops_with_the_fix(pennfudan_dir, tmp_path, monkeypatch):
    def disk_full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "atomic_save", disk_full)
    argv = ["--data-path", pennfudan_dir, "--output-dir", tmp_path, *TINY, "--epochs", "1"]
    with pytest.raises(utils.SetupError, match="(?s)No space left.*previous checkpoint.pth is intact.*--resume auto"):
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


class NaNOnSecondStep(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        scale = float("nan") if self.calls == 2 else 1.0
        return {"loss_classifier": self.w * scale, "loss_box_reg": self.w * 0.5}


def _loader(num_batches):
    items = [
        (torch.zeros(3, 8, 8), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": i})
        for i in range(num_batches)
    ]
    return torch.utils.data.DataLoader(items, batch_size=1, collate_fn=utils.collate_fn)


def test_skip_nonfinite_skips_and_counts_then_stops_when_too_many(capsys):
    model = NaNOnSecondStep()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = engine.train_one_epoch(model, optimizer, _loader(3), torch.device("cpu"), 1, 10, max_nonfinite=1)
    assert stats["nonfinite_skipped"] == 1 and stats["steps"] == 3
    assert "Skipped step 1: loss is nan at epoch 1 on images [1]" in capsys.readouterr().out
    assert model.w.item() == pytest.approx(1 - 2 * 0.1 * 1.5)  # two good steps applied, the NaN one not

    model = NaNOnSecondStep()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="--skip-nonfinite"):
        engine.train_one_epoch(model, optimizer, _loader(3), torch.device("cpu"), 1, 10, max_nonfinite=0)


def test_usr1_asks_to_stop_and_a_second_ctrl_c_stops_at_once():
    stop = preemption.StopSignals()
    try:
        assert not stop()
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning before a time limit (srun --signal=USR1@120)
        assert stop() and stop.received == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: Ctrl-C means now
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated download


def test_a_corrupt_image_stops_with_its_name_or_is_skipped(pennfudan_dir, tmp_path):
    _corrupt(pennfudan_dir / "PNGImages" / "Ped00003.png")
    argv = ["--data-path", pennfudan_dir, "--output-dir", tmp_path, *TINY, "--epochs", "1", "-j", "1"]
    with pytest.raises(utils.SetupError, match="(?s)cannot read image .*Ped00003.png.*--skip-bad-images"):
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))

    cli = subprocess.run(  # a timeout: workers that outlive their main process would hang it at exit
        [sys.executable, str(REPO / "train.py"), *map(str, argv)], capture_output=True, text=True, timeout=300
    )
    assert cli.returncode == 2 and cli.stderr.startswith("error: cannot read image") and "Traceback" not in cli.stderr

    train.main(train.get_args_parser().parse_args([str(a) for a in [*argv, "--skip-bad-images", "-j", "0"]]))
    log = (tmp_path / "log.txt").read_text()
    assert "Skipping sample" in log and "Ped00003.png" in log
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert epochs[-1]["train"]["unreadable_skipped"] == 1  # Ped00003 is in the training split (seed 0)


class Payload:
    """Unpickling this would create a file: what a malicious checkpoint or annotation file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_carrying_a_pickled_object_is_refused(pennfudan_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": Payload(marker), "epoch": 0}, evil)
    argv = ["--data-path", pennfudan_dir, "--output-dir", tmp_path / "run", *TINY, "--resume", evil]
    with pytest.raises(utils.SetupError, match="cannot load checkpoint .*evil.pth"):
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    from predict import load_model

    with pytest.raises(utils.SetupError, match="cannot load checkpoint"):
        load_model(evil)
    assert not marker.exists()  # nothing was executed


def test_memory_does_not_grow_epoch_after_epoch_with_workers(tmp_path):
    data = tmp_path / "pf"
    make_pennfudan(data, num_images=26)
    # A fresh process: inside the test session, earlier tests' allocations make the reading noisy. With bf16
    # autocast, the worst case: oneDNN's per-shape kernel cache grew 50 MB an epoch before the RoI heads were padded.
    cli = train_cli(data, tmp_path / "run", "--epochs", "5", "-j", "2", "--print-freq", "50", "--amp")
    subprocess.run(cli, check=True, capture_output=True, timeout=600)
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    rss = [json.loads(line)["rss_mb"] for line in lines if '"rss_mb"' in line]
    assert len(rss) == 5
    # the first epoch allocates caches (allocator pools, COCO objects); after that memory must stay flat
    assert rss[-1] - rss[1] < 50, rss
