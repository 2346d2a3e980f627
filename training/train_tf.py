"""Train the MNIST CNN with TensorFlow/Keras and export it as a SavedModel.

    python -m training.train_tf                      # defaults: >= 99% test accuracy
    python -m training.train_tf --quick              # seconds, for tests and smoke checks
    TF_CONFIG='{"cluster": ...}' python -m training.train_tf   # one process per worker

Distribution through ``tf.distribute``: MultiWorkerMirroredStrategy when
``TF_CONFIG`` is set, MirroredStrategy when several local GPUs are visible, the
default strategy otherwise. ``--batch-size`` is per replica; the global batch
is ``batch_size * replicas``. TensorBoard logs go to ``<log-dir>/tf/<run>``
and the model to ``<output-dir>/tf/mnist/<version>/`` (see docs/training-tf.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from mnist_client import contract
from serving.model_repository import latest_version, model_base_path
from training import cli, mnist_data, recipe
from training.model_tf import build_model, export_saved_model, normalize

log = logging.getLogger("train_tf")

REPO_ROOT = Path(__file__).resolve().parent.parent

# --quick: one epoch of 64 small steps on a training subset, evaluated on the first test images
# (about 88% accuracy in a few seconds: clearly above chance, enough for contract tests).
QUICK_TRAIN_EXAMPLES = 4096
QUICK_TEST_EXAMPLES = 1000
QUICK_DEFAULTS = {"epochs": 1, "batch_size": 64}
# Test images written to TensorBoard with their predictions.
SAMPLE_IMAGES = 8
EVAL_BATCH_SIZE = 1000
SHUFFLE_BUFFER = 10_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.train_tf",
        description="Train the MNIST CNN with TensorFlow/Keras and export a SavedModel.",
        formatter_class=cli.DefaultsHelpFormatter,
    )
    cli.add_recipe_arguments(parser, batch_size_help="images per step and replica")
    parser.add_argument("--seed", type=int, default=1, help="random seed (weights, dropout, shuffling)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu", "cuda"),
        default="auto",
        help="auto: every visible GPU if any, else the CPU; cuda is an alias for gpu",
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=0,
        help="intra- and inter-op CPU threads (0: TensorFlow's default, one per core); "
        "1 lets another job train beside this one on a second core",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="directory with the four MNIST .gz files (default: $MNIST_DATA_DIR, the shared copy, or a download)",
    )
    parser.add_argument(
        "--log-interval", type=int, default=100, help="log the running loss every N steps (0: per epoch only)"
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "models", help="models root")
    parser.add_argument("--log-dir", type=Path, default=REPO_ROOT / "runs", help="TensorBoard root")
    parser.add_argument(
        "--version", type=cli.positive_int, default=None, help="version to export (default: the next free one)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"train on {QUICK_TRAIN_EXAMPLES} images and evaluate on {QUICK_TEST_EXAMPLES}, in seconds; "
        "changes the defaults of --epochs to 1 and --batch-size to 64",
    )
    parser.add_argument(
        "--skip-if-exists",
        action="store_true",
        help="do nothing if the model is already exported (--version if given, else any version)",
    )
    if cli.quick_requested(argv):
        parser.set_defaults(**QUICK_DEFAULTS)  # defaults only: values given explicitly still win
    args = parser.parse_args(argv)
    cli.check_recipe_arguments(parser, args)
    if args.num_threads < 0:
        parser.error(f"--num-threads {args.num_threads}: expected 0 (TensorFlow's default) or a positive count")
    if args.log_interval < 0:
        parser.error(f"--log-interval {args.log_interval}: expected 0 or a positive number of steps")
    return args


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
    """Restrict TensorFlow to the requested devices; returns the GPUs it may use."""
    gpus = tf.config.list_physical_devices("GPU")
    if device in ("gpu", "cuda") and not gpus:
        raise RuntimeError(f"--device {device} requested but TensorFlow sees no GPU; use --device auto or cpu")
    if device == "cpu" and gpus:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError as exc:
            raise RuntimeError("--device cpu must be applied before TensorFlow initialises its devices") from exc
        return []
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
    """Adam or SGD with momentum on a one-cycle schedule, as train_torch uses (the same recipe in both).

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
    return tf.keras.optimizers.SGD(learning_rate=schedule, momentum=momentum)


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float
    examples: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


class Trainer:
    """The model, its optimizer and the distributed train/eval steps (the tf.distribute custom-loop pattern).

    Keras 3's ``Model.fit`` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so the
    steps are written out: each replica computes its share of the global batch, the optimizer
    all-reduces the gradients, and the per-replica sums (loss, correct, count) are reduced once.
    """

    def __init__(self, cluster: Cluster, args: argparse.Namespace, global_batch: int, total_steps: int) -> None:
        self.strategy = cluster.strategy
        self.global_batch = global_batch
        with self.strategy.scope():  # variables become mirrored across replicas and workers
            self.model = build_model()
            self.optimizer = make_optimizer(args.optimizer, args.lr, args.momentum, total_steps)
        self.loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def _sums(self, labels: tf.Tensor, logits: tf.Tensor, per_example_loss: tf.Tensor) -> tf.Tensor:
        correct = tf.cast(tf.argmax(logits, axis=1) == labels, tf.float32)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return tf.stack([tf.reduce_sum(per_example_loss), tf.reduce_sum(correct), count])  # [3]

    @tf.function
    def train_step(self, batch: tuple[Any, Any]) -> tf.Tensor:
        def step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                logits = self.model(images, training=True)
                per_example_loss = self.loss_fn(labels, logits)
                # Divide by the global batch: the optimizer sums the replicas' gradients.
                loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=self.global_batch)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return self._sums(labels, logits, per_example_loss)

        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(step, args=batch), axis=None)

    @tf.function
    def eval_step(self, batch: tuple[Any, Any]) -> tf.Tensor:
        def step(images: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
            logits = self.model(images, training=False)
            return self._sums(labels, logits, self.loss_fn(labels, logits))

        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, self.strategy.run(step, args=batch), axis=None)

    def train_epoch(self, dataset: tf.data.Dataset, epoch: int, log_interval: int) -> EpochResult:
        started = time.perf_counter()
        totals = tf.zeros(3)
        for step, batch in enumerate(self.strategy.experimental_distribute_dataset(dataset), start=1):
            totals += self.train_step(batch)
            if log_interval and step % log_interval == 0:
                loss_sum, _, count = totals.numpy()
                log.info("epoch %d  step %d  loss %.4f", epoch, step, loss_sum / count)
        loss_sum, correct, count = totals.numpy()  # waits for the last step
        return EpochResult(loss_sum / count, correct / count, int(count), time.perf_counter() - started)

    def evaluate(self, dataset: tf.data.Dataset) -> EpochResult:
        started = time.perf_counter()
        totals = tf.zeros(3)
        for batch in self.strategy.experimental_distribute_dataset(dataset):
            totals += self.eval_step(batch)
        loss_sum, correct, count = totals.numpy()
        return EpochResult(loss_sum / count, correct / count, int(count), time.perf_counter() - started)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.learning_rate)


# --- TensorBoard --------------------------------------------------------------------------------


class TensorBoardLog:
    """Scalars, weight histograms and sample predictions under ``<run_dir>/{train,test,samples}``."""

    def __init__(self, run_dir: Path, sample_images: np.ndarray, sample_labels: np.ndarray) -> None:
        self.train = tf.summary.create_file_writer(str(run_dir / "train"))
        self.test = tf.summary.create_file_writer(str(run_dir / "test"))
        self.samples = tf.summary.create_file_writer(str(run_dir / "samples"))
        self.sample_images = sample_images  # uint8 [N, 28, 28]
        self.sample_labels = sample_labels

    def write_epoch(self, epoch: int, model: tf.keras.Model, train: EpochResult, test: EpochResult, lr: float) -> None:
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


def run_name(args: argparse.Namespace) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{args.optimizer}-lr{args.lr:g}-bs{args.batch_size}{'-quick' if args.quick else ''}"


# --- main ---------------------------------------------------------------------------------------


def existing_export(args: argparse.Namespace) -> Path | None:
    """The already exported version that --skip-if-exists / --version refer to, if any."""
    base = model_base_path(args.output_dir, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    if args.version is not None:
        path = base / str(args.version)
        return path if path.exists() else None
    latest = latest_version(base)
    return None if latest is None else base / str(latest)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    existing = existing_export(args)
    if existing is not None and args.skip_if_exists:
        log.info("--skip-if-exists: %s is already exported, nothing to do", existing)
        return {"framework": "tensorflow", "skipped": True, "export_path": str(existing), "version": int(existing.name)}
    if existing is not None and args.version is not None:
        raise FileExistsError(
            f"{existing} already exists and versions are immutable; "
            "choose another --version, omit it for the next free one, or pass --skip-if-exists"
        )

    if args.num_threads:
        set_cpu_threads(args.num_threads)
    # The strategy must exist before TensorFlow runs any op (MultiWorkerMirroredStrategy insists).
    cluster = make_cluster(select_devices(args.device))
    tf.keras.utils.set_random_seed(args.seed)

    data_dir = mnist_data.resolve_data_dir(args.data_dir)
    train, test = mnist_data.load_mnist(data_dir)
    if args.quick:
        train, test = subset(train, QUICK_TRAIN_EXAMPLES), subset(test, QUICK_TEST_EXAMPLES)
    global_batch = args.batch_size * cluster.replicas
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"global batch {global_batch} (--batch-size {args.batch_size} x {cluster.replicas} replicas) is larger "
            f"than the {len(train)} training images; use a smaller --batch-size"
        )
    train_ds = make_dataset(train, global_batch, shuffle=True, seed=args.seed, drop_remainder=True)
    test_ds = make_dataset(test, EVAL_BATCH_SIZE, shuffle=False, seed=args.seed, drop_remainder=False)
    trainer = Trainer(cluster, args, global_batch, total_steps=steps_per_epoch * args.epochs)

    name = run_name(args)
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
    epochs, evaluation = fit(trainer, train_ds, test_ds, args.epochs, args.log_interval, tensorboard)
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
    export_path = export(trainer.model, cluster, args, test, metadata)

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


def fit(
    trainer: Trainer,
    train_ds: tf.data.Dataset,
    test_ds: tf.data.Dataset,
    epochs: int,
    log_interval: int,
    tensorboard: TensorBoardLog | None,
) -> tuple[list[EpochResult], EpochResult]:
    """Train for ``epochs``, evaluating on the test set after each; returns (per-epoch results, last evaluation)."""
    results = []
    try:
        for epoch in range(1, epochs + 1):
            lr = trainer.learning_rate  # at the start of the epoch; the schedule decays it per step
            result = trainer.train_epoch(train_ds, epoch, log_interval)
            evaluation = trainer.evaluate(test_ds)
            results.append(result)
            log.info(
                "epoch %d/%d  loss %.4f  accuracy %.4f  test loss %.4f  test accuracy %.4f  lr %.2e  %.0f images/s",
                epoch,
                epochs,
                result.loss,
                result.accuracy,
                evaluation.loss,
                evaluation.accuracy,
                lr,
                result.images_per_second,
            )
            if tensorboard:
                tensorboard.write_epoch(epoch, trainer.model, result, evaluation, lr)
    finally:
        if tensorboard:
            tensorboard.close()
    return results, evaluation


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
    main()
