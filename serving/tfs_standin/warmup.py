"""Model warm-up: replay ``assets.extra/tf_serving_warmup_requests`` before a version serves.

As in TF Serving, the file is a TFRecord of ``PredictionLog``s; every record is
run ``num_request_iterations_for_warmup`` times, and a record that fails fails
the load, so a version that cannot answer its own sample requests never serves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from mnist_client import contract
from serving.tfs_standin import predict
from serving.tfs_standin.servable import Servable

log = logging.getLogger(__name__)

# TF Serving refuses warm-up files with more records than this.
MAX_WARMUP_RECORDS = 1000


class WarmupError(RuntimeError):
    """A warm-up record could not be read or replayed."""


def warmup_file(version_dir: Path) -> Path:
    return version_dir / contract.WARMUP_RELATIVE_PATH


def replay_warmup(servable: Servable, runner: predict.Runner, iterations: int) -> int:
    """Replay the version's warm-up records; return how many there were (0 if it has none)."""
    path = warmup_file(servable.path)
    if not path.is_file() or iterations <= 0:
        return 0
    try:
        records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    except tf.errors.OpError as exc:
        raise WarmupError(f"{path}: not a readable TFRecord file: {exc.message}") from exc
    if len(records) > MAX_WARMUP_RECORDS:
        raise WarmupError(f"{path}: {len(records)} warm-up records, more than the maximum {MAX_WARMUP_RECORDS}")
    for index, record in enumerate(records):
        entry = prediction_log_pb2.PredictionLog.FromString(record)
        kind = entry.WhichOneof("log_type")
        if kind != "predict_log":
            raise WarmupError(f"{path}: record {index} is a {kind}; the stand-in replays predict_log records only")
        for _ in range(iterations):
            try:
                predict.predict(entry.predict_log.request, servable, runner, deadline=None, tensor_content=True)
            except Exception as exc:
                raise WarmupError(f"{path}: warm-up record {index} failed: {exc}") from exc
    log.info("model %s version %d: replayed %d warm-up records x%d", servable.name, servable.version,
             len(records), iterations)
    return len(records)
