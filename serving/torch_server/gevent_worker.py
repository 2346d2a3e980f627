"""What a gevent worker changes in the app: gunicorn_conf.post_worker_init calls ``adapt(state)``.

A gevent worker runs all its requests as greenlets on one event loop in one thread. Three things
would otherwise go wrong or cost more than they must:

- batching: requests queue only while the loop runs, so the request about to run a forward pass
  first yields until the loop is idle (``gevent.idle``), and every request already received joins
  the pass (``MicroBatcher.gather``);
- large passes: a pass holds the loop's thread, so a pass of ``OFFLOAD_MIN_IMAGES`` or more images
  (a 1024-image request takes a few hundred milliseconds on a CPU) runs in gevent's native thread
  pool instead, and the loop goes on answering probes and metrics and reading the next requests;
  smaller passes run inline, where a thread hand-over would cost more than it frees;
- loading a version (seconds of torch work) runs in that thread pool too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gevent
import numpy as np

from serving.torch_server.batching import Prediction, Predicts

if TYPE_CHECKING:
    from serving.torch_server.app import ServerState

# Passes of at least this many images leave the event loop: on a CPU that is one chunk of the
# model's chunked execution (model_store.CPU_CHUNK), about 15 ms of model time on the 2-core machines.
OFFLOAD_MIN_IMAGES = 64


def run_pass(model: Predicts, images: np.ndarray) -> Prediction:
    """``model.predict(images)``: inline for small passes, in gevent's thread pool for large ones."""
    if len(images) < OFFLOAD_MIN_IMAGES:
        return model.predict(images)
    return gevent.get_hub().threadpool.apply(model.predict, (images,))


def adapt(state: ServerState) -> None:
    """Set the app's hooks for a gevent worker (see the module docstring)."""
    hub = gevent.get_hub()
    state.predictor.run_pass = run_pass
    if state.batcher is not None:
        state.batcher.gather = gevent.idle
        state.batcher.run_pass = run_pass
    state.store.run_loader = lambda load, *args: hub.threadpool.apply(load, args)
