"""Train the MNIST CNN with TensorFlow/Keras and export it as a SavedModel.

    python -m training.train_tf                      # defaults: >= 99% test accuracy
    python -m training.train_tf --quick              # seconds, for tests and smoke checks
    TF_CONFIG='{"cluster": ...}' python -m training.train_tf   # one process per worker

Distribution through ``tf.distribute``: MultiWorkerMirroredStrategy when
``TF_CONFIG`` is set, MirroredStrategy when several local GPUs are visible, the
default strategy otherwise. ``--batch-size`` is per replica; the global batch
is ``batch_size * replicas``. TensorBoard logs go to ``<log-dir>/tf/<run-name>``
and the model (SavedModel and its TFLite copy) to ``<output-dir>/tf/mnist/<version>/``
(see docs/training-tf.md).

The same flags and the same skeleton as ``training/train_torch.py`` (the flags are declared once in
``training/cli.py``): ``build_parser``/``parse_args``, ``train_step``, ``train_epoch``, ``evaluate``,
``TensorBoardLog``, ``main``; here the steps also run through ``on_every_replica`` for tf.distribute.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from mnist_client import contract, mnist_data
from training import cli, recipe
from training.model_tf import build_model, export_saved_model, normalize

log = logging.getLogger("train_tf")

SAMPLE_IMAGES = 16  # test images shown with their predictions in TensorBoard
EVAL_BATCH_SIZE = 1000
SHUFFLE_BUFFER = 10_000


def build_parser() -> argparse.ArgumentParser:
    """The flags both trainers share (training/cli.py), with TensorFlow's words for devices and threads."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train_tf",
        description="Train the MNIST CNN with TensorFlow/Keras and export a SavedModel (and its TFLite copy).",
        formatter_class=cli.DefaultsHelpFormatter,
    )
    cli.add_trainer_arguments(
        parser,
        framework_dir=contract.TF_FRAMEWORK_DIR,
        replica="replica",
        device_help="auto: every visible GPU if any, else the CPU; cpu; cuda: every GPU; cuda:N: GPU N only "
        "(gpu, gpu:N: the same)",
        threads_help="TensorFlow's default, one per core (intra- and inter-op pools)",
    )
    return parser


def parse_args(argv: list[str] | None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    return cli.parse_trainer_args(parser or build_parser(), argv)


# --- devices and distribution -------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """Where this process stands: the strategy, and whether it publishes the results."""

    strategy: tf.distribute.Strategy
    name: str
    is_chief: bool
    num_workers: int

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def set_cpu_threads(count: int) -> None:
    """Pin TensorFlow's intra- and inter-op pools to ``count`` threads (only possible before it starts)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(count)
        tf.config.threading.set_inter_op_parallelism_threads(count)
    except RuntimeError:  # TensorFlow already ran an op in this process (a test calling main twice)
        log.warning("TensorFlow has already started in this process; --num-threads %d is not applied", count)


def select_devices(device: str) -> list[tf.config.PhysicalDevice]:
    """Restrict TensorFlow to the requested devices (``cli.device_spec`` forms); returns the GPUs it may use."""
    gpus = tf.config.list_physical_devices("GPU")
    if device.startswith("cuda") and not gpus:
        raise RuntimeError(f"device {device!r} requested but TensorFlow sees no GPU; use 'auto' or 'cpu'")
    if device == "cpu" or device.startswith("cuda:"):
        index = int(device.partition(":")[2] or -1)
        if index >= len(gpus):
            raise RuntimeError(f"device {device!r} requested but TensorFlow sees only {len(gpus)} GPU(s)")
        keep = [] if device == "cpu" else [gpus[index]]
        try:
            tf.config.set_visible_devices(keep, "GPU")
        except RuntimeError as exc:
            raise RuntimeError(f"device {device!r} must be chosen before TensorFlow initialises its devices") from exc
        return keep
    return gpus


def parse_tf_config(raw: str) -> tuple[dict[str, list[str]], str, int]:
    """``TF_CONFIG`` -> (cluster, task type, task index), with a clear error when it is malformed."""
    example = '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, task_index = str(task["type"]), int(task["index"])
        members = cluster.get("chief", []) + cluster.get("worker", [])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"TF_CONFIG is not valid ({exc!r}); expected JSON like {example}") from exc
    if not members or task_type not in cluster or not 0 <= task_index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG task {task_type}:{task_index} is not in its cluster {cluster}; expected JSON like {example}"
        )
    return cluster, task_type, task_index


def make_cluster(gpus: list[tf.config.PhysicalDevice]) -> Cluster:
    """MultiWorkerMirrored with TF_CONFIG, Mirrored on several local GPUs, else the default strategy."""
    raw = os.environ.get("TF_CONFIG")
    if raw:
        cluster, task_type, task_index = parse_tf_config(raw)
        # The chief publishes; without a "chief" task, worker 0 is the chief.
        is_chief = task_type == "chief" or (task_type == "worker" and task_index == 0 and "chief" not in cluster)
        num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return Cluster(strategy, "MultiWorkerMirroredStrategy", is_chief, num_workers)
    if len(gpus) > 1:
        return Cluster(tf.distribute.MirroredStrategy(), "MirroredStrategy", is_chief=True, num_workers=1)
    return Cluster(tf.distribute.get_strategy(), "default", is_chief=True, num_workers=1)


# --- data ---------------------------------------------------------------------------------------


def preprocess(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 [B, 28, 28] -> pixel/255 -> normalised [B, 28, 28, 1], exactly as the exported model does."""
    return normalize(tf.cast(images, tf.float32) / contract.PIXEL_SCALE), labels


def make_dataset(
    split: mnist_data.Split, batch_size: int, *, shuffle: bool, seed: int, drop_remainder: bool
) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels.astype(np.int64)))
    if shuffle:
        # Same seed on every worker: each sees the same order and takes its own share of every batch.
        ds = ds.shuffle(min(SHUFFLE_BUFFER, len(split)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # In-memory data has no files to shard by; split each global batch between the workers.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def subset(split: mnist_data.Split, count: int) -> mnist_data.Split:
    return mnist_data.Split(images=split.images[:count], labels=split.labels[:count])


# --- training -----------------------------------------------------------------------------------


def make_optimizer(name: str, lr: float, momentum: float, total_steps: int) -> tf.keras.optimizers.Optimizer:
    """Adam or SGD with Nesterov momentum on a one-cycle schedule, as train_torch uses (the same recipe in both).

    The learning rate rises linearly from lr/25 to ``lr`` over the first 15% of the steps, then
    follows a cosine decay to about 0, stepped per batch (torch's OneCycleLR warms up along a cosine;
    the difference is immaterial).
    """
    total_steps = max(total_steps, 1)
    warmup_steps = int(total_steps * recipe.ONE_CYCLE_WARMUP)
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        lr / recipe.ONE_CYCLE_DIV,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=1 / (recipe.ONE_CYCLE_DIV * recipe.ONE_CYCLE_FINAL_DIV),  # relative to the peak
        warmup_target=lr,
        warmup_steps=warmup_steps,
    )
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate=schedule)
    return tf.keras.optimizers.SGD(learning_rate=schedule, momentum=momentum, nesterov=momentum > 0)  # as torch


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    examples: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


# The steps are written out rather than left to ``Model.fit``, which fails under
# MultiWorkerMirroredStrategy in Keras 3 (keras-team/keras#20585): each replica runs ``train_step`` on
# its share of the global batch, the optimizer all-reduces the gradients, and the per-replica sums
# (loss, correct, count) are reduced once per step by ``on_every_replica``.


def _sums(labels: tf.Tensor, logits: tf.Tensor, per_example_loss: tf.Tensor) -> tf.Tensor:
    correct = tf.cast(tf.argmax(logits, axis=1) == labels, tf.float32)
    count = tf.cast(tf.shape(labels)[0], tf.float32)
    return tf.stack([tf.reduce_sum(per_example_loss), tf.reduce_sum(correct), count])  # [3]


def train_step(
    model: tf.keras.Model, optimizer: tf.keras.optimizers.Optimizer, images: tf.Tensor, labels: tf.Tensor,
    global_batch: int,
) -> tf.Tensor:  # fmt: skip
    """One optimisation step on a replica's share of a batch (normalised ``[B, 28, 28, 1]``, labels ``[B]``).

    Returns the sums ``[loss, correct, count]`` over the share.
    """
    with tf.GradientTape() as tape:
        logits = model(images, training=True)  # [B, 10]
        per_example_loss = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        # Divide by the global batch: the optimizer sums the replicas' gradients.
        loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=global_batch)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return _sums(labels, logits, per_example_loss)


def eval_step(model: tf.keras.Model, images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The sums ``[loss, correct, count]`` of the model on a replica's share of a test batch."""
    logits = model(images, training=False)
    return _sums(labels, logits, tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def on_every_replica(
    strategy: tf.distribute.Strategy, step: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
) -> Callable[[Any], tf.Tensor]:
    """``step(images, labels)`` on every replica's share of a distributed batch, summed: one ``tf.function``."""

    @tf.function
    def run(batch: tuple[Any, Any]) -> tf.Tensor:
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=batch), axis=None)

    return run


def train_epoch(
    run_step: Callable[[Any], tf.Tensor],
    strategy: tf.distribute.Strategy,
    dataset: tf.data.Dataset,
    steps: int,
    epoch: int,
    log_interval: int,
    is_chief: bool,
) -> EpochStats:
    """One pass over the training set; returns the stats summed over every replica and worker."""
    bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", leave=False, disable=None if is_chief else True)
    # Without a bar (output to a file or pipe), progress lines instead; from the chief only.
    log_every = log_interval if bar.disable and is_chief else 0
    started = time.perf_counter()
    totals = tf.zeros(3)
    for step, batch in enumerate(strategy.experimental_distribute_dataset(dataset), start=1):
        totals += run_step(batch)
        bar.update()
        if log_every and step % log_every == 0:
            loss_sum, _, count = totals.numpy()
            log.info("epoch %d  step %d/%d  loss %.4f", epoch, step, steps, loss_sum / count)
    bar.close()
    loss_sum, correct, count = totals.numpy()  # waits for the last step
    return EpochStats(loss_sum / count, correct / count, int(count), time.perf_counter() - started)


def evaluate(
    run_step: Callable[[Any], tf.Tensor], strategy: tf.distribute.Strategy, dataset: tf.data.Dataset
) -> EpochStats:
    """Mean loss and accuracy over the test set; each replica takes its share of every batch."""
    started = time.perf_counter()
    totals = tf.zeros(3)
    for batch in strategy.experimental_distribute_dataset(dataset):
        totals += run_step(batch)
    loss_sum, correct, count = totals.numpy()
    return EpochStats(loss_sum / count, correct / count, int(count), time.perf_counter() - started)


# --- TensorBoard --------------------------------------------------------------------------------


class TensorBoardLog:
    """Scalars, weight histograms and sample predictions under ``<run_dir>/{train,test,samples}``."""

    def __init__(self, run_dir: Path, sample_images: np.ndarray, sample_labels: np.ndarray) -> None:
        self.train = tf.summary.create_file_writer(str(run_dir / "train"))
        self.test = tf.summary.create_file_writer(str(run_dir / "test"))
        self.samples = tf.summary.create_file_writer(str(run_dir / "samples"))
        self.sample_images = sample_images  # uint8 [N, 28, 28]
        self.sample_labels = sample_labels

    def write_epoch(self, epoch: int, model: tf.keras.Model, train: EpochStats, test: EpochStats, lr: float) -> None:
        with self.train.as_default(step=epoch):
            tf.summary.scalar("loss", train.loss)
            tf.summary.scalar("accuracy", train.accuracy)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("images_per_second", train.images_per_second)
            for weight in model.weights:
                tf.summary.histogram(weight.path, weight)
        with self.test.as_default(step=epoch):
            tf.summary.scalar("loss", test.loss)
            tf.summary.scalar("accuracy", test.accuracy)
        self._write_samples(epoch, model)
        for writer in (self.train, self.test, self.samples):
            writer.flush()

    def _write_samples(self, epoch: int, model: tf.keras.Model) -> None:
        x, _ = preprocess(tf.constant(self.sample_images), tf.constant(self.sample_labels))
        predicted = np.argmax(model(x, training=False).numpy(), axis=1)
        in_order = ", ".join(str(int(p)) for p in predicted)
        rows = "\n".join(
            f"| {i} | {int(y)} | {int(p)} | {'yes' if p == y else '**no**'} |"
            for i, (y, p) in enumerate(zip(self.sample_labels, predicted))
        )
        with self.samples.as_default(step=epoch):
            tf.summary.image(
                "test_images",
                self.sample_images[..., np.newaxis],  # [N, 28, 28, 1] uint8
                max_outputs=len(self.sample_images),
                description=f"Predicted classes, in order: {in_order}",
            )
            tf.summary.text("predictions", "| image | label | predicted | correct |\n|---|---|---|---|\n" + rows)

    def close(self) -> None:
        for writer in (self.train, self.test, self.samples):
            writer.close()


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, log to TensorBoard, export; return a summary (``export_path`` is set on the chief only)."""
    parser = build_parser()
    args = parse_args(argv, parser)

    # Checked before training, not minutes later when the export would fail.
    existing = cli.check_before_training(parser, args, contract.TF_FRAMEWORK_DIR)
    if existing is not None:
        log.info("--skip-if-exists: %s is already exported; nothing to do", existing)
        return {"framework": "tensorflow", "skipped": True, "export_path": str(existing), "version": int(existing.name)}
    if args.num_threads:
        set_cpu_threads(args.num_threads)
    try:
        gpus = select_devices(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    # The strategy must exist before TensorFlow runs any op (MultiWorkerMirroredStrategy insists).
    cluster = make_cluster(gpus)
    tf.keras.utils.set_random_seed(args.seed)

    data_dir = mnist_data.resolve_data_dir(args.data_dir)
    train, test = mnist_data.load_mnist(data_dir)
    if args.quick:
        train, test = subset(train, recipe.QUICK_TRAIN_EXAMPLES), subset(test, recipe.QUICK_TEST_EXAMPLES)
    global_batch = args.batch_size * cluster.replicas
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"global batch {global_batch} (--batch-size {args.batch_size} x {cluster.replicas} replicas) is larger "
            f"than the {len(train)} training images; use a smaller --batch-size"
        )
    train_ds = make_dataset(train, global_batch, shuffle=True, seed=args.seed, drop_remainder=True)
    test_ds = make_dataset(test, EVAL_BATCH_SIZE, shuffle=False, seed=args.seed, drop_remainder=False)
    with cluster.strategy.scope():  # variables become mirrored across replicas and workers
        model = build_model()
        optimizer = make_optimizer(args.optimizer, args.lr, args.momentum, steps_per_epoch * args.epochs)
    train_fn = on_every_replica(
        cluster.strategy, functools.partial(train_step, model, optimizer, global_batch=global_batch)
    )
    eval_fn = on_every_replica(cluster.strategy, functools.partial(eval_step, model))

    name = cli.default_run_name(args, cluster.replicas)
    run_dir = args.log_dir / contract.TF_FRAMEWORK_DIR / name
    tensorboard = (  # only the chief writes TensorBoard logs
        TensorBoardLog(run_dir, test.images[:SAMPLE_IMAGES], test.labels[:SAMPLE_IMAGES]) if cluster.is_chief else None
    )
    log.info(
        "training %d epoch(s) on %d images: %s strategy, %d replica(s) on %d worker(s), global batch %d, %s lr %g, "
        "CPU threads %s",
        args.epochs,
        len(train),
        cluster.name,
        cluster.replicas,
        cluster.num_workers,
        global_batch,
        args.optimizer,
        args.lr,
        tf.config.threading.get_intra_op_parallelism_threads() or "default (one per core)",
    )
    started = time.perf_counter()
    epochs: list[EpochStats] = []
    evaluation = EpochStats(float("nan"), float("nan"), 0, 0.0)
    try:
        for epoch in range(1, args.epochs + 1):
            lr_at_start = float(optimizer.learning_rate)  # the schedule moves it every step
            stats = train_epoch(
                train_fn, cluster.strategy, train_ds, steps_per_epoch, epoch, args.log_interval, cluster.is_chief
            )
            evaluation = evaluate(eval_fn, cluster.strategy, test_ds)
            epochs.append(stats)
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  lr %.2e  %.0f images/s  %.1fs",
                epoch, args.epochs, stats.loss, stats.accuracy, evaluation.loss, evaluation.accuracy, lr_at_start,
                stats.images_per_second, stats.seconds,
            )  # fmt: skip
            if tensorboard:
                tensorboard.write_epoch(epoch, model, stats, evaluation, lr_at_start)
    finally:
        if tensorboard:
            tensorboard.close()
    train_seconds = time.perf_counter() - started
    images_per_second = sum(e.examples for e in epochs) / sum(e.seconds for e in epochs)

    metadata = {
        "data_checksum": mnist_data.dataset_checksum(data_dir),
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(images_per_second, 1),
        "epochs": args.epochs,
        "train_examples": len(train),
        "quick": args.quick,
        "hyperparameters": {
            "batch_size": args.batch_size,
            "global_batch_size": global_batch,
            "lr": args.lr,
            "lr_schedule": recipe.LR_SCHEDULE,
            "optimizer": args.optimizer,
            **({"momentum": args.momentum} if args.optimizer == "sgd" else {}),
            "seed": args.seed,
        },
        "strategy": cluster.name,
        "replicas": cluster.replicas,
        "workers": cluster.num_workers,
        "tensorboard_run": name,
    }
    export_path = export(model, cluster, args, test, metadata)

    summary = {
        "framework": "tensorflow",
        "skipped": False,
        "test_accuracy": evaluation.accuracy,
        "test_examples": evaluation.examples,
        "train_seconds": train_seconds,
        "images_per_second": images_per_second,
        "epochs": args.epochs,
        "strategy": cluster.name,
        "replicas": cluster.replicas,
        "workers": cluster.num_workers,
        "is_chief": cluster.is_chief,
        "export_path": str(export_path) if export_path else None,
        "version": int(export_path.name) if export_path else None,
        "tensorboard_dir": str(run_dir) if cluster.is_chief else None,
    }
    log.info(
        "summary: test accuracy %.4f on %d images after %d epoch(s); %.1f s training at %.0f images/s; %s",
        evaluation.accuracy,
        evaluation.examples,
        args.epochs,
        train_seconds,
        images_per_second,
        f"exported to {export_path}" if export_path else "not the chief, nothing published",
    )
    return summary


def export(
    model: tf.keras.Model,
    cluster: Cluster,
    args: argparse.Namespace,
    test: mnist_data.Split,
    metadata: dict[str, Any],
) -> Path | None:
    """Export on every worker (saving a distributed model is collective); only the chief's copy is published."""
    test_images = test.scaled()
    if cluster.is_chief:
        return export_saved_model(
            model, args.output_dir, test_images, test.labels, version=args.version, extra_metadata=metadata
        )
    scratch = Path(tempfile.mkdtemp(prefix="train_tf-worker-"))
    try:
        export_saved_model(model, scratch, test_images, test.labels, version=args.version, extra_metadata=metadata)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
