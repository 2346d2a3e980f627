"""Train the MNIST CNN in PyTorch and export it to the model repository as TorchScript.

Single process (CPU, or one GPU with ``--device auto``)::

    python -m training.train_torch                 # defaults reach >= 99.0% test accuracy
    python -m training.train_torch --quick         # seconds; a small subset, for tests

Several processes or GPUs, with DistributedDataParallel (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc_per_node=2 -m training.train_torch

Every run writes TensorBoard logs under ``<log-dir>/torch/<run-name>/{train,test,samples}`` and
publishes ``<output-dir>/torch/mnist/<version>/{model.pt,model.json}``; the
export is loaded back and checked on the test set before it is published.

The same flags and the same skeleton as ``training/train_tf.py`` (the flags are declared once in
``training/cli.py``): ``build_parser``/``parse_args``, ``train_step``, ``train_epoch``, ``evaluate``,
``TensorBoardLog``, ``main``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from mnist_client import contract, mnist_data
from mnist_client.cpus import usable_cpus
from training import cli, recipe
from training.model_torch import Net, export_torchscript, select_device

log = logging.getLogger("train_torch")

SAMPLE_IMAGES = 16  # test images shown with their predictions in TensorBoard
BATCH_LOG_EVERY = 50  # steps between per-batch TensorBoard scalars
EVAL_BATCH_SIZE = 1000


def build_parser() -> argparse.ArgumentParser:
    """The flags both trainers share (training/cli.py), with PyTorch's words for devices and threads."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train_torch",
        description="Train the MNIST CNN in PyTorch and export it as TorchScript.",
        formatter_class=cli.DefaultsHelpFormatter,
    )
    cli.add_trainer_arguments(
        parser,
        framework_dir=contract.TORCH_FRAMEWORK_DIR,
        replica="process",
        device_help="auto: CUDA when available, else the CPU; cpu; cuda or cuda:N (gpu, gpu:N: the same)",
        threads_help="the CPUs available to the process divided by the local processes (torch intra-op threads)",
    )
    return parser


def parse_args(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    return cli.parse_trainer_args(parser or build_parser(), argv)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (world_size 1 when run directly)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read torchrun's WORLD_SIZE / RANK / LOCAL_RANK / LOCAL_WORLD_SIZE."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            return cls(
                world_size=int(os.environ["WORLD_SIZE"]),
                rank=int(os.environ["RANK"]),
                local_rank=int(os.environ["LOCAL_RANK"]),
                local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
            )
        except (KeyError, ValueError) as exc:
            raise RuntimeError(
                f"WORLD_SIZE is set but the torchrun environment is incomplete or malformed ({exc!r}); "
                "expected integer WORLD_SIZE, RANK and LOCAL_RANK (launch with torchrun)"
            ) from exc


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]`` normalised as the network expects."""
    x = torch.tensor(images, dtype=torch.float32)  # a copy (the loader's array is read-only), then in place
    x.div_(contract.PIXEL_SCALE).sub_(contract.NORMALIZE_MEAN).div_(contract.NORMALIZE_STD)
    return x.unsqueeze(1)


def _all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch (normalised ``[B, 1, 28, 28]``, labels ``[B]``): (loss, logits)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(images)  # [B, 10]
    loss = F.cross_entropy(logits, labels)
    loss.backward()  # under DDP this also all-reduces the gradients
    optimizer.step()
    return loss.detach(), logits.detach()


def train_epoch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sampler: DistributedSampler,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    info: DistInfo,
    board: TensorBoardLog | None,
    global_step: int,
    epoch: int,
    log_interval: int = 0,
) -> tuple[EpochStats, int]:
    """One pass over this process's shard; returns all-reduced stats and the new global step."""
    model.train()
    device = images.device
    indices = torch.tensor(list(sampler), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    steps = math.ceil(len(indices) / batch_size)
    bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", leave=False, disable=None if info.is_main else True)
    # Without a bar (output to a file or pipe), progress lines instead; from the main process only.
    log_every = log_interval if bar.disable and info.is_main else 0
    started = time.perf_counter()
    for step, start in enumerate(range(0, len(indices), batch_size), start=1):
        batch = indices[start : start + batch_size]
        x, y = images[batch], labels[batch]  # [B, 1, 28, 28], [B]
        loss, logits = train_step(model, optimizer, x, y)
        scheduler.step()
        global_step += 1
        # Accumulate on the device; a .item() per step would synchronise a GPU every batch.
        loss_sum += loss.double() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        bar.update()
        if log_every and step % log_every == 0:
            seen = min(start + batch_size, len(indices))
            log.info("epoch %d  step %d/%d  loss %.4f", epoch, step, steps, loss_sum.item() / seen)
        if board is not None and global_step % BATCH_LOG_EVERY == 0:
            board.write_batch(global_step, loss.item(), scheduler.get_last_lr()[0])
    bar.close()
    seconds = time.perf_counter() - started
    loss_total, correct_total, examples = _all_reduce_sum(
        [loss_sum.item(), float(correct.item()), float(len(indices))], device, info
    )
    return EpochStats(loss_total / examples, correct_total / examples, int(examples), seconds), global_step


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, info: DistInfo) -> EpochStats:
    """Mean loss and accuracy over the test set; each process takes every world_size-th image."""
    net.eval()
    started = time.perf_counter()
    shard_x, shard_y = images[info.rank :: info.world_size], labels[info.rank :: info.world_size]
    loss_sum, correct = 0.0, 0
    for start in range(0, len(shard_y), EVAL_BATCH_SIZE):
        x, y = shard_x[start : start + EVAL_BATCH_SIZE], shard_y[start : start + EVAL_BATCH_SIZE]
        logits = net(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum().item())
    loss_total, correct_total, examples = _all_reduce_sum(
        [loss_sum, float(correct), float(len(shard_y))], images.device, info
    )
    return EpochStats(loss_total / examples, correct_total / examples, int(examples), time.perf_counter() - started)


class TensorBoardLog:
    """Scalars, weight histograms and sample predictions under ``<run_dir>/{train,test,samples}``.

    The same run layout and tag names as the TensorFlow trainer, so that one
    ``tensorboard --logdir runs`` draws both frameworks' curves in the same charts.
    """

    def __init__(self, run_dir: Path, hyperparameters: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.train = SummaryWriter(str(run_dir / "train"))
        self.test = SummaryWriter(str(run_dir / "test"))
        self.samples = SummaryWriter(str(run_dir / "samples"))
        self.train.add_text("hyperparameters", "\n".join(f"- {k}: {v}" for k, v in hyperparameters.items()), 0)

    def write_batch(self, step: int, loss: float, lr: float) -> None:
        self.train.add_scalar("batch_loss", loss, step)
        self.train.add_scalar("batch_learning_rate", lr, step)

    def write_epoch(
        self, epoch: int, net: nn.Module, train: EpochStats, test_loss: float, test_accuracy: float, lr: float
    ) -> None:
        self.train.add_scalar("loss", train.loss, epoch)
        self.train.add_scalar("accuracy", train.accuracy, epoch)
        self.train.add_scalar("learning_rate", lr, epoch)
        self.train.add_scalar("images_per_second", train.images_per_second, epoch)
        for name, param in net.named_parameters():
            self.train.add_histogram(name, param.detach().cpu(), epoch)
        self.test.add_scalar("loss", test_loss, epoch)
        self.test.add_scalar("accuracy", test_accuracy, epoch)
        for writer in (self.train, self.test):
            writer.flush()

    def write_samples(self, epoch: int, net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
        """The first test images as one grid, and a table of what the model predicts for each."""
        net.eval()
        with torch.no_grad():
            predicted = net(images).argmax(dim=1).tolist()
        pixels = images * contract.NORMALIZE_STD + contract.NORMALIZE_MEAN  # back to [0, 1] for display
        self.samples.add_images("test_images", pixels.clamp(0, 1).cpu(), epoch)  # NCHW, a grid of 8 a row
        rows = "\n".join(
            f"| {i} | {y} | {p} | {'yes' if p == y else '**no**'} |"
            for i, (y, p) in enumerate(zip(labels.tolist(), predicted))
        )
        self.samples.add_text(
            "predictions",
            "Images of test_images, left to right and top to bottom.\n\n"
            "| image | label | predicted | correct |\n|---|---|---|---|\n" + rows,
            epoch,
        )
        self.samples.flush()

    def close(self) -> None:
        for writer in (self.train, self.test, self.samples):
            writer.close()


def _num_threads(requested: int, info: DistInfo) -> int:
    if requested > 0:
        return requested
    return max(1, usable_cpus() // info.local_world_size)


def _load_data(
    args: argparse.Namespace, info: DistInfo, device: torch.device
) -> tuple[Path, mnist_data.Split, mnist_data.Split]:
    # Rank 0 resolves (and, where needed, downloads) first so ranks never race on the cache.
    if info.is_main:
        data_dir = mnist_data.resolve_data_dir(args.data_dir)
    if info.enabled and device.type == "cuda":
        dist.barrier(device_ids=[device.index])  # NCCL wants to know which GPU this rank uses
    elif info.enabled:
        dist.barrier()
    if not info.is_main:
        data_dir = mnist_data.resolve_data_dir(args.data_dir)
    train = mnist_data.load_split("train", data_dir)
    test = mnist_data.load_split("test", data_dir)
    if args.quick:
        train, test = subset(train, recipe.QUICK_TRAIN_EXAMPLES), subset(test, recipe.QUICK_TEST_EXAMPLES)
    return data_dir, train, test


def subset(split: mnist_data.Split, count: int) -> mnist_data.Split:
    return mnist_data.Split(images=split.images[:count], labels=split.labels[:count])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, log to TensorBoard, export; return a summary (``export_path`` is set on rank 0 only)."""
    started = time.perf_counter()
    parser = build_parser()
    args = parse_args(argv, parser)
    lr = args.lr
    info = DistInfo.from_env()

    # Checked before training, not minutes later when the export would fail.
    existing = cli.check_before_training(parser, args, contract.TORCH_FRAMEWORK_DIR)
    if existing is not None:
        if info.is_main:
            log.info("--skip-if-exists: %s is already exported; nothing to do", existing)
        return {"framework": "pytorch", "skipped": True, "export_path": str(existing), "version": int(existing.name)}
    try:
        device = select_device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        torch.set_num_threads(_num_threads(args.num_threads, info))
    if info.enabled:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        summary = _train_and_export(args, lr, info, device)
    finally:
        if info.enabled:
            dist.destroy_process_group()
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    if info.is_main:
        log.info(
            "done in %.0fs: test accuracy %.4f on %d images, %.0fs training (%.0f images/s), version %d at %s",
            summary["wall_seconds"], summary["test_accuracy"], summary["test_examples"], summary["train_seconds"],
            summary["images_per_second"], summary["version"], summary["export_path"],
        )
    return summary


def _train_and_export(args: argparse.Namespace, lr: float, info: DistInfo, device: torch.device) -> dict[str, Any]:
    data_dir, train, test = _load_data(args, info, device)
    train_x, train_y = normalize(train.images).to(device), torch.tensor(train.labels, dtype=torch.long).to(device)
    test_x, test_y = normalize(test.images).to(device), torch.tensor(test.labels, dtype=torch.long).to(device)

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    net = Net().to(device)
    torch.manual_seed(args.seed + info.rank)  # but independent dropout masks per process
    model: nn.Module = net
    if info.enabled:  # all-reduces gradients during backward()
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    if args.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=args.momentum, nesterov=args.momentum > 0)
    # DistributedSampler also serves one process (num_replicas=1): one code path for both.
    sampler = DistributedSampler(
        range(len(train)), num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed
    )
    steps_per_epoch = math.ceil(len(sampler) / args.batch_size)
    # One-cycle: a short warm-up to the peak LR, then cosine annealing to ~0; stepped per batch.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=args.epochs * steps_per_epoch, pct_start=recipe.ONE_CYCLE_WARMUP,
        div_factor=recipe.ONE_CYCLE_DIV, final_div_factor=recipe.ONE_CYCLE_FINAL_DIV,
    )

    hyperparameters = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size * info.world_size,
        "optimizer": args.optimizer,
        "lr": lr,
        "lr_schedule": recipe.LR_SCHEDULE,
        "momentum": args.momentum if args.optimizer == "sgd" else None,
        "seed": args.seed,
        "quick": args.quick,
    }
    board = None
    if info.is_main:
        run_name = cli.default_run_name(args, info.world_size)
        board = TensorBoardLog(Path(args.log_dir) / contract.TORCH_FRAMEWORK_DIR / run_name, hyperparameters)
        log.info(
            "training on %d images (%d per process), %d test images; device %s, world size %d, %d threads, %s",
            len(train), len(sampler), len(test), device, info.world_size, torch.get_num_threads(), hyperparameters,
        )

    global_step, train_seconds = 0, 0.0
    stats = EpochStats(float("nan"), float("nan"), 0, 0.0)
    test_loss = test_accuracy = float("nan")
    for epoch in range(1, args.epochs + 1):
        sampler.set_epoch(epoch)
        lr_at_start = scheduler.get_last_lr()[0]
        stats, global_step = train_epoch(
            model, train_x, train_y, sampler, optimizer, scheduler, args.batch_size, info, board, global_step, epoch,
            args.log_interval,
        )
        train_seconds += stats.seconds
        evaluation = evaluate(net, test_x, test_y, info)
        test_loss, test_accuracy = evaluation.loss, evaluation.accuracy
        if board is not None:
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  lr %.2e  %.0f images/s  %.1fs",
                epoch, args.epochs, stats.loss, stats.accuracy, test_loss, test_accuracy, lr_at_start,
                stats.images_per_second, stats.seconds,
            )
            board.write_epoch(epoch, net, stats, test_loss, test_accuracy, lr_at_start)
            board.write_samples(epoch, net, test_x[:SAMPLE_IMAGES], test_y[:SAMPLE_IMAGES])

    summary: dict[str, Any] = {
        "framework": "pytorch",
        "skipped": False,
        "world_size": info.world_size,
        "rank": info.rank,
        "device": str(device),
        "train_examples": len(train),
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(len(train) * args.epochs / train_seconds, 1) if train_seconds else 0.0,
        "final_train_loss": stats.loss,
        "final_train_accuracy": stats.accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "test_examples": len(test),
        "hyperparameters": hyperparameters,
        "export_path": None,
        "version": None,
        "tensorboard_dir": None,
    }
    if board is None:
        return summary

    board.close()
    summary["tensorboard_dir"] = str(board.run_dir)
    export_path = export_torchscript(
        net.cpu(),
        args.output_dir,
        test.scaled(),
        test.labels,
        version=args.version,
        extra_metadata={
            "data_checksum": mnist_data.dataset_checksum(data_dir),
            "train_seconds": summary["train_seconds"],
            "train_examples": len(train),
            "images_per_second": summary["images_per_second"],
            "epochs": args.epochs,
            "hyperparameters": hyperparameters,
            "world_size": info.world_size,
            "device": str(device),
        },
    )
    # The export's own load-back accuracy is the figure of record (same images as evaluate()).
    metadata = json.loads((export_path / contract.METADATA_FILENAME).read_text())
    summary.update(export_path=str(export_path), version=metadata["version"], test_accuracy=metadata["test_accuracy"])
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
