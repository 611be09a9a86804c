"""Several processes on CPU (gloo): torchrun, srun on a local SLURM cluster, grouped batches, SLURM env parsing."""

import json
import os
import shutil
import socket
import subprocess
from collections import Counter

import pytest
import torch
from conftest import REPO

import train
import utils
from datasets.group_by_aspect_ratio import GroupedBatchSampler, aspect_ratio_groups

TINY = [
    "--weights",
    "none",
    "--min-size",
    "64",
    "--max-size",
    "96",
    "-j",
    "0",
    "--box-score-thresh",
    "0.0",
    "--model",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sizes:
    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def get_height_and_width(self, idx):
        return self.sizes[idx]


def test_grouped_batches_share_aspect_ratio_and_cover_the_epoch():
    sizes = [(100, 200), (200, 100), (100, 100)] * 7  # landscape, portrait, square
    groups = aspect_ratio_groups(Sizes(sizes), factor=3)
    assert len(set(groups)) == 3
    sampler = torch.utils.data.RandomSampler(range(len(sizes)), generator=torch.Generator().manual_seed(0))
    batches = list(GroupedBatchSampler(sampler, groups, batch_size=2))
    assert len(batches) == len(GroupedBatchSampler(sampler, groups, batch_size=2)) == 10
    used = Counter(i for b in batches for i in b)
    assert len(used) == 20 and max(used.values()) == 1  # 21 images: one left over, none repeated
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the leftovers of the three groups may mix


def test_slurm_environment_is_read(monkeypatch):
    calls = {}

    def fake_init(backend, init_method, world_size, rank):
        calls.update(backend=backend, world_size=world_size, rank=rank)

    # init_distributed_mode exports RANK, MASTER_ADDR, ...: give it a copy of the environment, or later tests
    # (and the processes they start) would believe they are rank 3 of 4 and wait forever for the others.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    # what an sbatch script with 4 tasks sees: no step yet, so a plain `python train.py` there is one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODELIST", "node7")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    assert utils.init_distributed_mode("cpu") == (False, 0, 1, 0) and not calls
    # inside `srun -n 4`: a step, task 3 of 4, the second on its node
    for key, value in dict(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="3", SLURM_LOCALID="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_STEP_NODELIST", "node7")
    assert utils.init_distributed_mode("cpu") == (True, 3, 4, 1)
    assert calls == {"backend": "gloo", "world_size": 4, "rank": 3}
    assert os.environ["MASTER_ADDR"] == "node7" and os.environ["RANK"] == "3" and os.environ["LOCAL_RANK"] == "1"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)  # from the job id: jobs on one node differ
    # one GPU per task (srun --gpus-per-task 1): each task sees one device, cuda:0, whatever its local rank
    devices = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    assert utils.init_distributed_mode("cuda") == (True, 3, 4, 1)
    assert devices == [0] and calls["backend"] == "nccl"


def _single_process_eval(data, ckpt, out):
    argv = ["--data-path", data, "--val-size", 3, "--test-only", "--resume", ckpt, "--output-dir", out, *TINY]
    return train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


def _same_detections(a, b):
    key = lambda d: (d["image_id"], round(d["score"], 4), d["category_id"])  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["image_id"] == y["image_id"] and x["category_id"] == y["category_id"]
        assert x["score"] == pytest.approx(y["score"], abs=1e-4)
        assert x["bbox"] == pytest.approx(y["bbox"], abs=1e-2)


def test_torchrun_two_cpu_processes_train_and_evaluate_like_one(pennfudan_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        "bash",
        str(REPO / "references" / "dist_train.sh"),
        "2",
        "--data-path",
        str(pennfudan_dir),
        "--val-size",
        "3",
        "--epochs",
        "1",
        "-b",
        "1",
        "--output-dir",
        str(out),
        "--out",
        str(out / "dist.json"),
        *TINY,
    ]
    env = {**os.environ, "PORT": str(free_port())}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lr = 0.005 x 2 processes x 1 images / 2 = 0.005" in proc.stdout
    assert proc.stdout.count("Start training") == 1  # only rank 0 prints
    # 3 val images on 2 ranks: the sampler pads one duplicate, which evaluate() must drop
    distributed = json.loads((out / "dist.json").read_text())
    assert {d["image_id"] for d in distributed} <= set(range(8)) and len({d["image_id"] for d in distributed}) == 3
    single = _single_process_eval(pennfudan_dir, out / "checkpoint.pth", out)
    _same_detections(distributed, single["detections"])
    distributed_metrics = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["bbox"]
    assert distributed_metrics == pytest.approx(single["bbox"], abs=1e-6)


def _local_slurm():
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        script = REPO.parent / "shared" / "tools" / "start-local-slurm.sh"
        if not script.is_file() or os.geteuid() != 0:
            pytest.skip(f"no SLURM cluster and cannot start one ({script} needs root and must exist)")
        started = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        if started.returncode != 0 or "idle" not in started.stdout + started.stderr:
            pytest.skip(f"the local SLURM cluster did not start: {started.stderr[-500:]}")


def test_slurm_train_with_two_cpu_tasks(pennfudan_dir, tmp_path):
    _local_slurm()
    out = tmp_path / "slurm_run"
    env = {**os.environ, "GPUS_PER_NODE": "0", "CPUS_PER_TASK": "1", "MASTER_PORT": str(free_port())}
    cmd = [
        "bash",
        str(REPO / "references" / "slurm_train.sh"),
        "dev",
        "pytest-slurm",
        str(out),
        "2",
        "--data-path",
        str(pennfudan_dir),
        "--val-size",
        "3",
        "--epochs",
        "1",
        "-b",
        "1",
        *TINY,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lr = 0.005 x 2 processes" in proc.stdout
    assert (out / "checkpoint.pth").is_file() and (out / "log.jsonl").is_file()


def test_two_nodes_through_dist_train_env(pennfudan_dir, tmp_path):
    # Two "nodes" on this machine: one dist_train.sh each, joined through NNODES / NODE_RANK / MASTER_ADDR / PORT.
    out = tmp_path / "run"
    flags = ["--data-path", str(pennfudan_dir), "--val-size", "3", "--epochs", "1", "-b", "1", "--output-dir", str(out)]
    port = str(free_port())
    nodes = []
    for node_rank in ("0", "1"):
        env = {**os.environ, "NNODES": "2", "NODE_RANK": node_rank, "MASTER_ADDR": "127.0.0.1", "PORT": port}
        cmd = ["bash", str(REPO / "references" / "dist_train.sh"), "1", *flags, *TINY]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "lr = 0.005 x 2 processes x 1 images / 2" in outputs[0][0]  # global rank 0 (node 0) prints
    assert "Start training" not in outputs[1][0]  # the other node's rank stays quiet
    assert (out / "checkpoint.pth").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 1
