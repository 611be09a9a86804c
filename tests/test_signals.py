"""Stop signals sent to the whole process group (SLURM at its time limit, `timeout`, systemd, Ctrl-C) reach the
DataLoader workers too: the run must still finish its step, save and exit 0, and --resume auto continue it."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, make_pennfudan

FLAGS = ["--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none", "--min-size", "64"]
FLAGS += ["--max-size", "96", "-j", "2", "--val-size", "2", "--print-freq", "1", "--no-val-loss", "-b", "1"]
FLAGS += ["--save-interval", "1000"]  # checkpoint.pth and best.pth only: ~150 MB each


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_to_the_process_group_saves_the_run_and_resume_continues_it(tmp_path, name):
    make_pennfudan(tmp_path / "pf", num_images=8)
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "train.py"), "--data-path", str(tmp_path / "pf"), "--output-dir", str(out)]
    # its own session: the signal goes to train.py and its workers, not to pytest
    run = subprocess.Popen(
        [*command, *FLAGS, "--epochs", "100"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, cwd=REPO,
    )  # fmt: skip
    lines = []
    for line in run.stdout:
        lines.append(line)
        if "Epoch: [1]" in line:  # epoch 0 is saved; epoch 1 is under way, its workers running
            os.killpg(run.pid, getattr(signal, name))
            break
    lines += run.stdout.readlines()
    output = "".join(lines)
    assert run.wait(timeout=120) == 0, output[-3000:]
    assert "is killed by signal" not in output and f"{name} received" in output
    assert "Stopped at epoch 1" in output and (out / "checkpoint.pth").is_file()

    resumed = subprocess.run(
        [*command, *FLAGS, "--epochs", "2", "--resume", "auto"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "continuing at epoch 1, step" in resumed.stdout
    assert "Training time" in resumed.stdout
    # 6 training images in batches of 1: the resumed epoch runs the steps after the stop, not the whole epoch again
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[1]["train"]["steps"] == 6
