"""gunicorn configuration for the PyTorch REST server (every value from MNIST_REST_* variables).

    gunicorn -c serving/torch_server/gunicorn_conf.py 'serving.torch_server.app:create_app()'

Each worker builds the app (and loads the model) after the fork: ``preload_app``
stays off, so no torch state or watcher thread crosses a fork. docs/rest-server.md
lists every variable; the main ones:

MNIST_REST_HOST / MNIST_REST_PORT      bind address (0.0.0.0:8080)
MNIST_REST_WORKERS                     worker processes (default: one per GPU, else one per usable CPU)
MNIST_REST_WORKER_CLASS                gevent, gthread or sync (default: gevent on CPUs, gthread on a GPU;
                                       with THREADS set: gthread when THREADS > 1, else sync)
MNIST_REST_THREADS                     request threads per gthread worker (default 64, on a GPU)
MNIST_REST_WORKER_CONNECTIONS          connections each gevent worker serves at once (1000)
MNIST_REST_BATCHING                    micro-batching of requests queued behind a forward pass (on)
MNIST_REST_TIMEOUT                     seconds a request may take before its worker is replaced (30)
MNIST_REST_GRACEFUL_TIMEOUT            seconds in-flight requests get after SIGTERM (30)
MNIST_REST_KEEPALIVE                   keep-alive seconds (gthread only; sync closes each connection) (5)
MNIST_REST_TLS_CERT / MNIST_REST_TLS_KEY   serve HTTPS with this certificate and key (both or neither)
MNIST_REST_ACCESS_LOG                  '-' (stdout, default), a file path, or 'off'
MNIST_REST_MAX_REQUESTS                recycle a worker after this many requests (0: never)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

# gunicorn executes this file by path: make the repository importable from any working directory.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from mnist_client.cpus import usable_cpus  # noqa: E402
from serving.torch_server.config import ConfigError, ServerConfig, env_int, env_str  # noqa: E402
from serving.torch_server.gpus import least_used_gpu, visible_gpus  # noqa: E402

# Validate the app's settings in the master, so a bad value stops the server at
# once with a clear message instead of failing in every worker.
ServerConfig.load()


bind = [f"{env_str('HOST', '0.0.0.0')}:{env_int('PORT', 8080, minimum=0)}"]
# The defaults differ by device (docs/rest-server.md has the figures behind them):
# - CPU: one gevent worker per usable CPU, each running one torch thread, with micro-batching: its
#   requests are greenlets on one event loop, and the one that runs a forward pass first lets the
#   loop take in every request already received (batching.MicroBatcher.gather). On the 2-core
#   machines that beat gthread workers with 8 request threads (the previous default, GIL-bound at
#   about 2 images per pass) and sync workers in requests/s and in tail latency at concurrency 16;
# - GPU: one gthread worker per GPU (each worker holds a CUDA context and a copy of the model), with
#   GPU_THREADS request threads feeding micro-batches of up to GPU_BATCH_MAX_SIZE images (a GPU's
#   pass of 64 images costs about what one of a single image does, and threads decode the next
#   requests while the GPU runs).
WORKER_CLASSES = ("gevent", "gthread", "sync")
GPU_THREADS = 64
GPU_BATCH_MAX_SIZE = 64
_device = env_str("DEVICE", "auto")
gpus = visible_gpus(_device)
if gpus:  # the app reads its settings in each worker, from the environment it inherits
    os.environ.setdefault("MNIST_REST_BATCH_MAX_SIZE", str(GPU_BATCH_MAX_SIZE))
workers = env_int("WORKERS", gpus or usable_cpus(), minimum=1)
# gevent: keep-alive connections, up to worker_connections requests at a time per worker, one thread;
# gthread: keep-alive connections, and THREADS requests at a time per worker, on threads;
# sync: one request at a time per worker, each connection closed after its answer.
_threads_given = env_str("THREADS", "") != ""
threads = env_int("THREADS", GPU_THREADS if gpus else 1, minimum=1)
if _threads_given:  # MNIST_REST_THREADS alone picks gthread (> 1) or sync (1), as it always has
    _default_class = "gthread" if threads > 1 else "sync"
else:
    _default_class = "gthread" if gpus else "gevent"
worker_class = env_str("WORKER_CLASS", _default_class)
if worker_class not in WORKER_CLASSES:
    raise ConfigError(f"MNIST_REST_WORKER_CLASS={worker_class!r}: expected one of {', '.join(WORKER_CLASSES)}")
if worker_class in ("sync", "gevent") and threads > 1:
    raise ConfigError(
        f"MNIST_REST_THREADS={threads} needs MNIST_REST_WORKER_CLASS=gthread ({worker_class} runs one thread)"
    )
worker_connections = env_int("WORKER_CONNECTIONS", 1000, minimum=1)
timeout = env_int("TIMEOUT", 30, minimum=1)
graceful_timeout = env_int("GRACEFUL_TIMEOUT", 30, minimum=1)
keepalive = env_int("KEEPALIVE", 5, minimum=0)
max_requests = env_int("MAX_REQUESTS", 0, minimum=0)
max_requests_jitter = max_requests // 10
preload_app = False
proc_name = "mnist-rest"
# The control socket is an admin interface (and one default path per user clashes
# between several servers on one host): off unless a path is given.
_control_socket = env_str("CONTROL_SOCKET", "")
control_socket_disable = _control_socket == ""
if _control_socket:
    control_socket = _control_socket
# Heartbeat files on tmpfs: a container's overlay disk can stall the heartbeat.
if Path("/dev/shm").is_dir():
    worker_tmp_dir = "/dev/shm"

# Request size limits at the HTTP layer (the app limits bodies: MNIST_REST_MAX_BODY_BYTES).
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190

# TLS, off by default.
certfile = env_str("TLS_CERT", "") or None
keyfile = env_str("TLS_KEY", "") or None
if (certfile is None) != (keyfile is None):
    raise ConfigError("MNIST_REST_TLS_CERT and MNIST_REST_TLS_KEY go together: set both (HTTPS) or neither (HTTP)")
for _name, _path in (("TLS_CERT", certfile), ("TLS_KEY", keyfile)):
    if _path is not None and not Path(_path).is_file():
        raise ConfigError(f"MNIST_REST_{_name}={_path}: no such file")

# Access log with the request latency in milliseconds (%(M)s) and the worker pid.
_access_log = env_str("ACCESS_LOG", "-")
accesslog = None if _access_log.lower() == "off" else _access_log
access_log_format = '%(h)s %(t)s "%(r)s" %(s)s %(B)s %(M)sms pid=%(p)s "%(a)s"'
errorlog = "-"
loglevel = env_str("LOG_LEVEL", "info").lower()

# Prometheus multiprocess mode. The variable must be set before any worker imports
# prometheus_client (the value class is chosen at import), so it is set here, in the
# master, at config load. An operator-given folder is used as is; otherwise a
# private temporary folder, removed when the master exits.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWN_PREFIX = "mnist-rest-metrics-"
if _MULTIPROC_ENV not in os.environ:  # (on a HUP reload the master already has it: reuse it)
    os.environ[_MULTIPROC_ENV] = tempfile.mkdtemp(prefix=_OWN_PREFIX)


def _own_metrics_dir(folder: Path) -> bool:
    return folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith(_OWN_PREFIX)


def on_starting(server: object) -> None:
    # Samples of a previous run in a reused folder would be added to this run's.
    folder = Path(os.environ[_MULTIPROC_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


def pre_fork(server: object, worker: object) -> None:
    # With several GPUs and no device pinned, each new worker takes the GPU with the fewest workers.
    if gpus > 1 and _device in ("auto", "cuda"):
        in_use = [w.mnist_gpu for w in server.WORKERS.values() if hasattr(w, "mnist_gpu")]  # type: ignore[attr-defined]
        worker.mnist_gpu = least_used_gpu(gpus, in_use)  # type: ignore[attr-defined]


def post_fork(server: object, worker: object) -> None:
    if worker_class == "gevent":
        # gevent's monkey-patching reads every loaded module's attributes, torch's deprecated aliases
        # included (torch is loaded when the master counted GPUs): their FutureWarnings are noise here.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"gevent\.monkey")
    gpu = getattr(worker, "mnist_gpu", None)
    if gpu is not None:  # in the worker, before the app reads its settings
        os.environ["MNIST_REST_DEVICE"] = f"cuda:{gpu}"


def post_worker_init(worker: object) -> None:
    # A forward pass that never returns holds the worker's model: gthread workers would go on
    # accepting requests that can only time out, so the worker stops (alive = False ends its loop,
    # and the master replaces it, killing it after `timeout` if the stuck thread keeps it alive).
    state = getattr(worker.wsgi, "extensions", {}).get("mnist")  # type: ignore[attr-defined]
    if state is None:
        return
    if state.batcher is not None:
        state.batcher.on_stuck = lambda: setattr(worker, "alive", False)
    if worker_class == "gevent":  # batching gathers, large passes and loads leave the event loop
        from serving.torch_server import gevent_worker

        gevent_worker.adapt(state)


def child_exit(server: object, worker: object) -> None:
    # Drop the dead worker's live gauges (in-flight requests, model version).
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    folder = Path(os.environ[_MULTIPROC_ENV])
    if _own_metrics_dir(folder):
        shutil.rmtree(folder, ignore_errors=True)
