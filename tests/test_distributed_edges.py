"""Every rank takes the same steps and joins the same collectives: 2 gloo processes on CPU (torch.multiprocessing),
a rank whose batch is unreadable, a rank with nothing to evaluate, --resume auto on node-local folders, downloads
once per node. And anchors in float32 under bf16 autocast."""

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
from test_distributed import free_port
from test_training_options import MeanColourRegressor

import engine
import models
import train
import utils
from extras import compose, mixed_precision, preemption, val_loss

CPU = torch.device("cpu")


def _entry(rank, fn, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_two(fn, *args, timeout=180):
    """Run fn(rank, *args) in 2 processes of one gloo group; fails (instead of hanging) after `timeout` s."""
    context = torch.multiprocessing.start_processes(
        _entry, args=(fn, free_port(), args), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.time() + timeout
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} hung: a rank waits in a collective the other never joins")


def _sample(image_id):
    target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1]), "image_id": image_id}
    target.update(area=torch.tensor([1920.0]), iscrowd=torch.zeros(1, dtype=torch.int64))
    return torch.rand(3, 80, 100), target


def _unreadable_batches(rank, out):
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
    model = models.get_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=2, weights="none", min_size=64, max_size=96
    )
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    good = tuple(zip(*[_sample(rank)]))
    bad = ((None,), (None,))  # a batch whose every sample SkipBadImages found unreadable
    loader = [good, bad if rank == 1 else good, bad]  # step 2: rank 1's batch is unreadable; step 3: both ranks'
    stats = engine.train_one_epoch(ddp, optimizer, loader, CPU, epoch=1, print_freq=100)
    weights = sum(float(p.double().sum()) for p in model.parameters())
    val = [good] if rank == 0 else [bad]  # rank 1 has nothing to score
    losses = val_loss.validation_loss(model, val, CPU)
    metrics = engine.evaluate(model, val, CPU, class_names=["thing"])
    result = {k: stats[k] for k in ("steps", "unreadable_skipped")}
    result.update(weights=weights, val_loss=losses, bbox=metrics["bbox"], detections=len(metrics["detections"]))
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def test_a_rank_with_an_unreadable_batch_or_nothing_to_evaluate_takes_the_same_steps(tmp_path):
    run_two(_unreadable_batches, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 3
    assert (r0["unreadable_skipped"], r1["unreadable_skipped"]) == (1, 2)
    assert r0["weights"] == pytest.approx(r1["weights"], rel=1e-9)  # the same updates on both
    assert r0["val_loss"] == r1["val_loss"] and set(r0["val_loss"]) >= {"loss", "loss_classifier"}
    assert r0["bbox"] == r1["bbox"]  # scored on rank 0, broadcast
    assert r1["detections"] == 0  # only rank 0 holds the gathered detections


def _resume_and_download(rank, out):
    os.chdir(out / f"node{rank}")  # node-local output folders: "run" is another folder on each rank
    args = train.get_args_parser().parse_args(["--resume", "auto", "--output-dir", "run"])
    outcomes = []
    for case in ("only rank 0", "both", "neither"):
        has = {"only rank 0": rank == 0, "both": True, "neither": False}[case]
        os.makedirs("run", exist_ok=True)
        if has:
            open("run/checkpoint.pth", "w").close()
        elif os.path.exists("run/checkpoint.pth"):
            os.remove("run/checkpoint.pth")
        dist.barrier()
        try:
            outcomes.append(preemption.latest_checkpoint(args.output_dir))
        except utils.SetupError as e:
            outcomes.append(f"error: {e}")
        dist.barrier()
    order = []
    with utils.local_main_first(local_rank=rank):
        if rank == 0:
            time.sleep(0.5)
            (out / "downloaded").write_text("")
        order.append((out / "downloaded").exists())
    (out / f"rank{rank}.json").write_text(json.dumps({"outcomes": outcomes, "found_download": order}))


def test_resume_auto_is_decided_on_rank_0_and_downloads_run_once_per_node_first(tmp_path):
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
    run_two(_resume_and_download, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # only rank 0's folder has a checkpoint: every rank stops with the fix, none trains alone
    assert r0["outcomes"][0].startswith("error: --resume auto: rank 0 continues from run/checkpoint.pth")
    assert r1["outcomes"][0] == r0["outcomes"][0] and "every node shares" in r0["outcomes"][0]
    assert r0["outcomes"][1:] == r1["outcomes"][1:] == ["run/checkpoint.pth", None]
    assert r0["found_download"] == r1["found_download"] == [True]  # rank 1 entered after rank 0 had finished


def test_anchors_are_float32_under_bf16_autocast():
    model = mixed_precision.float32_boxes(models.get_model("fasterrcnn_resnet50_fpn", num_classes=2, weights="none"))
    assert isinstance(model.rpn.anchor_generator, mixed_precision.Float32Anchors)
    generator = mixed_precision.Float32Anchors(((32,),), ((1.0,),))  # one map, one anchor per place
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(1, 3, 64, 1280), [(64, 1280)])
    feature = torch.zeros(1, 256, 16, 320, dtype=torch.bfloat16)  # stride 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (anchors,) = generator(images, [feature])
    assert anchors.dtype == torch.float32
    centres = ((anchors[:, 0] + anchors[:, 2]) / 2).unique()
    beyond = centres[centres >= 1024]
    assert len(beyond) == 64  # (1280 - 1024) / 4 distinct centres; in bf16 most of them merge
    retina = mixed_precision.float32_boxes(
        compose.get_model("retinanet", num_classes=2, weights="none", backbone="resnet18")
    )
    assert isinstance(retina.anchor_generator, mixed_precision.Float32Anchors)


def _toy_samples(count=8):
    generator = torch.Generator().manual_seed(1)
    samples = []
    for i in range(count):
        target = {"boxes": torch.rand(2, 4, generator=generator) * 50, "labels": torch.ones(2, dtype=torch.int64)}
        samples.append((torch.rand(3, 8, 8, generator=generator), {**target, "image_id": i}))
    return samples


def _train_toy(model, batches, accumulate):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return engine.train_one_epoch(model, optimizer, batches, CPU, epoch=1, print_freq=100, accumulate=accumulate)


def _accumulating(rank, out):
    model = MeanColourRegressor()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mine = _toy_samples()[4 * rank : 4 * rank + 4]  # each rank: 2 batches of 2, accumulated into one step
    batches = [tuple(zip(*mine[:2])), tuple(zip(*mine[2:]))]
    stats = _train_toy(ddp, batches, accumulate=2)
    weights = [p.detach().flatten().tolist() for p in model.parameters()]
    (out / f"rank{rank}.json").write_text(json.dumps({"weights": weights, "steps": stats["steps"]}))


def test_accumulation_under_ddp_equals_one_batch_of_every_rank_s_images(tmp_path):
    run_two(_accumulating, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    alone = MeanColourRegressor()  # one process, one batch of the 8 images both ranks saw
    _train_toy(alone, [tuple(zip(*_toy_samples()))], accumulate=1)
    expected = [p.detach().flatten().tolist() for p in alone.parameters()]
    assert r0["steps"] == r1["steps"] == 2 and r0["weights"] == r1["weights"]
    for got, want in zip(r0["weights"], expected):
        assert got == pytest.approx(want, abs=1e-6)
