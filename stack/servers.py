"""Start and stop the two servers of the local stack as child processes: the one launcher.

``make serve``, ``make demo``, the benchmarks and the tests all start gunicorn and the stand-in through
this module (``running_server``, ``running_stack``, or ``rest_process``/``grpc_process``); no other
module builds their command lines, environments or readiness waits (tests/test_one_launcher.py).

- the PyTorch REST server: gunicorn with ``serving/torch_server/gunicorn_conf.py`` on a loopback
  port, behind nginx (``python -m serving.torch_server.proxy``) on the public one, so that slow or
  idle clients never hold a gunicorn worker (docs/reliability.md)
- the TF Serving stand-in: ``python -m serving.tfs_standin`` with TF Serving's flags
- the draw-a-digit web page: ``python -m serving.web`` (docs/web.md), asking both servers

The production stack runs the real ``tensorflow/serving`` image instead of the
stand-in (see docker-compose.yml); ports and model paths are the same.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mnist_client import contract
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import RestClient
from serving.model_repository import latest_version
from serving.torch_server.config import ConfigError
from serving.torch_server.proxy import find_nginx
from stack.config import REPO_ROOT, StackConfig
from stack.processes import ManagedProcess, StackError, ensure_port_free, free_port, tail

log = logging.getLogger(__name__)

GUNICORN_CONF = REPO_ROOT / "serving" / "torch_server" / "gunicorn_conf.py"


@dataclass
class RunningStack:
    config: StackConfig
    rest: Server
    grpc: Server
    web: ManagedProcess


def check_models(config: StackConfig) -> None:
    """Raise StackError unless both frameworks have an exported version."""
    missing = [str(p) for p in (config.torch_base_path, config.tf_base_path) if latest_version(p) is None]
    if missing:
        raise StackError(
            "no exported model in " + " or ".join(missing) + "; run `make train` first "
            "(or point MNIST_MODELS_DIR at a models folder)"
        )


def check_base_path(base_path: Path, make_target: str) -> None:
    """Raise StackError unless ``base_path`` holds an exported version."""
    if latest_version(base_path) is None:
        raise StackError(f"no exported model in {base_path}; run `make {make_target}` first "
                         "(or point MNIST_MODELS_DIR at a models folder)")


class Server:
    """A server of the stack, started, watched and stopped as one: gunicorn (the PyTorch REST server) or
    the TF Serving stand-in, with the nginx in front of its HTTP port unless it was launched with
    ``proxy=False``.

    It has ManagedProcess's interface: ``pid`` is the server's own (gunicorn's master, whose children are
    the workers; the stand-in), ``pids`` all of its processes with nginx's (for CPU and memory accounting),
    ``log_path`` the server's log (nginx logs beside it), ``send_signal``/``wait`` act on the server
    process itself. Where clients reach it: ``rest_url`` (None for a stand-in without REST API) and
    ``grpc_target`` (the stand-in's; None for gunicorn), both from the config's host and ports.
    """

    def __init__(
        self,
        server: ManagedProcess,
        proxy: ManagedProcess | None,
        *,
        rest_url: str | None,
        grpc_target: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.server = server
        self.proxy = proxy
        self.name = server.name
        self.log_path = server.log_path
        self.rest_url = rest_url
        self.grpc_target = grpc_target
        self.ca_file = ca_file  # the certificate to verify rest_url with, when it is https

    @property
    def pid(self) -> int | None:
        return self.server.pid

    @property
    def pids(self) -> tuple[int, ...]:
        """The server's and nginx's: together, with their children, the whole server."""
        return self.server.pids + (self.proxy.pids if self.proxy else ())

    def start(self) -> None:
        self.server.start()
        if self.proxy:
            self.proxy.start()

    def running(self) -> bool:
        return self.server.running() and (self.proxy is None or self.proxy.running())

    def ready(self) -> bool:
        """One readiness probe: the model loaded and answering on every API the server was given."""
        if self.grpc_target is not None:
            with GrpcClient(self.grpc_target, timeout=2.0) as grpc_client:
                if not grpc_client.ready():
                    return False
        if self.rest_url is not None:
            with RestClient(self.rest_url, timeout=2.0, ca_file=self.ca_file) as rest_client:
                return rest_client.ready()
        return True

    def wait_ready(self, probe: Callable[[], bool] | None = None, timeout_s: float = 120.0) -> float:
        """Poll ``probe`` (default: ``ready``) until it is true; return the seconds it took. StackError with
        the log's last lines if the server or its nginx exits first, or on timeout."""
        check = probe or self.ready
        if self.proxy is None:
            return self.server.wait_ready(check, timeout_s)
        proxy = self.proxy
        # An nginx that exited (a taken port, a bad setting) ends the wait at once, then is reported.
        took = self.server.wait_ready(lambda: not proxy.running() or check(), timeout_s)
        if not proxy.running():
            raise StackError(f"{proxy.name} exited before the server became ready; last lines of "
                             f"{proxy.log_path}:\n{tail(proxy.log_path)}")
        return took

    def send_signal(self, signum: int) -> None:
        """Signal the server process (SIGTERM: a graceful stop; gunicorn's master passes it to its workers)."""
        self.server.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """The server process's exit status, waiting up to ``timeout_s`` (subprocess.TimeoutExpired after)."""
        return self.server.wait(timeout_s)

    def stop(self, grace_s: float = 30.0) -> int | None:
        proxy_status = self.proxy.stop(grace_s) if self.proxy else None
        status = self.server.stop(grace_s)
        # The server's failure first, else nginx's, else the server's own status (0, or None if never started).
        return proxy_status if status in (None, 0) and proxy_status not in (None, 0) else status


def _require_nginx(what: str) -> None:
    try:
        find_nginx()
    except ConfigError as exc:
        raise StackError(f"{what} runs behind nginx, but {exc}; `make setup` lists it") from None


# Settings the launcher derives from the StackConfig; a caller changes them through the config instead.
_LAUNCHER_REST_ENV = ("MNIST_REST_HOST", "MNIST_REST_PORT")
_LAUNCHER_STANDIN_FLAGS = ("port", "rest_api_port", "standin_host")


def rest_process(
    config: StackConfig,
    *,
    env: Mapping[str, str] | None = None,
    proxy: bool = True,
    ca_file: str | os.PathLike[str] | None = None,
) -> Server:
    """The PyTorch REST server (gunicorn with ``serving/torch_server/gunicorn_conf.py``), not started yet.

    ``proxy=True`` (``make serve``): gunicorn on a free loopback port, nginx on ``config.host:config.rest_port``;
    HTTPS (MNIST_REST_TLS_CERT and MNIST_REST_TLS_KEY, from ``env`` or this process's environment) is served
    by nginx. ``proxy=False``: gunicorn alone on ``config.host:config.rest_port``, serving HTTPS itself when
    ``env`` sets MNIST_REST_TLS_CERT/KEY. The readiness probe verifies that certificate with ``ca_file``
    (default: the certificate itself, as for a self-signed one).

    ``env``: more MNIST_REST_* settings for gunicorn (docs/rest-server.md: MNIST_REST_WORKERS,
    MNIST_REST_ACCESS_LOG, MNIST_REST_DEVICE, MNIST_REST_MODEL_BASE_PATH...), over the defaults; its host
    and port come from ``config`` (a ValueError says so if ``env`` names them).
    """
    extra = dict(env or {})
    if taken := [name for name in _LAUNCHER_REST_ENV if name in extra]:
        raise ValueError(f"{', '.join(taken)}: the launcher sets these from the StackConfig "
                         "(config.host, config.rest_port); change the config instead")
    tls_cert = extra.get("MNIST_REST_TLS_CERT", os.environ.get("MNIST_REST_TLS_CERT", "") if proxy else "")
    tls_key = extra.get("MNIST_REST_TLS_KEY", os.environ.get("MNIST_REST_TLS_KEY", "") if proxy else "")
    if proxy:
        _require_nginx("the PyTorch REST server")
        host, port = "127.0.0.1", free_port("127.0.0.1")
        extra.update(MNIST_REST_TLS_CERT="", MNIST_REST_TLS_KEY="")  # nginx terminates TLS
        # nginx writes the access log; gunicorn's own would cost about 0.2 ms of CPU per request.
        extra.setdefault("MNIST_REST_ACCESS_LOG", os.environ.get("MNIST_REST_ACCESS_LOG") or "off")
    else:
        host, port = config.host, config.rest_port
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.torch_server.app:create_app()"]
    child_env: dict[str, str | None] = {
        "MNIST_REST_HOST": host,
        "MNIST_REST_PORT": str(port),
        "MNIST_REST_MODEL_BASE_PATH": str(config.torch_base_path),
        "MNIST_REST_TLS_CERT": "",
        "MNIST_REST_TLS_KEY": "",
        "PYTHONPATH": str(REPO_ROOT),
        # A folder inherited from another gunicorn (a test's, a shell's) would mix its metrics with ours:
        # gunicorn_conf.py makes a fresh one when none is set.
        "PROMETHEUS_MULTIPROC_DIR": None,
        **extra,
    }
    server = ManagedProcess("PyTorch REST server", argv, config.log_dir / "rest-server.log", child_env)
    scheme = "https" if tls_cert else "http"
    rest_url = f"{scheme}://{config.host}:{config.rest_port}"
    front = None
    if proxy:
        tls = {"MNIST_PROXY_TLS_CERT": tls_cert, "MNIST_PROXY_TLS_KEY": tls_key}
        front = _nginx(config, "rest-proxy", config.rest_port, port, tls)
    return Server(server, front, rest_url=rest_url, ca_file=(str(ca_file) if ca_file else tls_cert) or None)


def _nginx(config: StackConfig, name: str, port: int, upstream_port: int, extra: dict[str, str]) -> ManagedProcess:
    """nginx (serving.torch_server.proxy) on ``config.host:port`` in front of ``127.0.0.1:upstream_port``."""
    env = {
        "MNIST_PROXY_HOST": config.host,
        "MNIST_PROXY_PORT": str(port),
        "MNIST_PROXY_UPSTREAM": f"127.0.0.1:{upstream_port}",
        "MNIST_PROXY_RUN_DIR": str(config.log_dir / name),
        "PYTHONPATH": str(REPO_ROOT),
        **extra,
    }
    argv = [sys.executable, "-m", "serving.torch_server.proxy"]
    return ManagedProcess(f"nginx ({name})", argv, config.log_dir / f"{name}.log", env)


def _flag_name(flag: str) -> str:
    if not flag.startswith("--"):
        raise ValueError(f"{flag!r}: expected a stand-in flag written --name=value (or --name)")
    return flag[2:].split("=", 1)[0]


def grpc_process(config: StackConfig, *, flags: Sequence[str] = (), proxy: bool = True) -> Server:
    """The TF Serving stand-in (``python -m serving.tfs_standin``), not started yet: gRPC on
    ``config.host:config.grpc_port``, its REST API on ``config.tfs_rest_port``.

    ``proxy=True`` (``make serve``): the REST API on a free loopback port behind nginx on
    ``config.tfs_rest_port``, so that slow HTTP clients cannot hold its request threads (its gRPC side has
    its own deadlines and bounds: serving/tfs_standin/connection_limits.py). ``proxy=False``: the stand-in
    alone, its REST API on ``config.tfs_rest_port`` itself, or none when that port is 0.

    ``flags``: more of TF Serving's flags (``--enable_batching``, ``--batching_parameters_file=...``, ...);
    one the launcher also sets (``--model_name``, ``--model_base_path``) replaces the launcher's; the ports
    and the bind address come from ``config`` (a ValueError says so if ``flags`` names them).
    """
    names = [_flag_name(flag) for flag in flags]
    if taken := [name for name in names if name in _LAUNCHER_STANDIN_FLAGS]:
        raise ValueError(f"--{', --'.join(taken)}: the launcher sets these from the StackConfig "
                         "(config.host, config.grpc_port, config.tfs_rest_port); change the config instead")
    if proxy:
        if not config.tfs_rest_port:
            raise ValueError("proxy=True puts nginx on config.tfs_rest_port, which is 0; give it a port "
                             "or launch with proxy=False for a stand-in without REST API")
        _require_nginx("the TF Serving stand-in's REST API")
        rest_port = free_port("127.0.0.1")
    else:
        rest_port = config.tfs_rest_port
    defaults = {
        "model_name": contract.MODEL_NAME,
        "model_base_path": str(config.tf_base_path),
    }
    argv = [
        sys.executable, "-m", "serving.tfs_standin",
        f"--port={config.grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--standin_host={config.host}",  # MNIST_HOST, as for the other servers (127.0.0.1 by default)
        *(f"--{name}={value}" for name, value in defaults.items() if name not in names),
        *flags,
    ]  # fmt: skip
    env = {"PYTHONPATH": str(REPO_ROOT)}
    server = ManagedProcess("TF Serving stand-in", argv, config.log_dir / "tfs-standin.log", env)
    front = _nginx(config, "tfs-rest-proxy", config.tfs_rest_port, rest_port, {}) if proxy else None
    rest_url = config.tfs_rest_url if config.tfs_rest_port else None
    return Server(server, front, rest_url=rest_url, grpc_target=config.grpc_target)


def web_process(config: StackConfig, tfs_rest_url: str | None = None) -> ManagedProcess:
    """The web page, asking the PyTorch REST server and the stand-in; its TF REST target only when
    ``tfs_rest_url`` is given (the stand-in's REST API), else that target is left out."""
    env = {
        "MNIST_WEB_HOST": config.host,
        "MNIST_WEB_PORT": str(config.web_port),
        # Named as make demo's load test names them: the stand-in for what it is, never TF Serving.
        "MNIST_WEB_PYTORCH_REST": f"torch-rest={config.rest_url}",
        "MNIST_WEB_TENSORFLOW_REST": f"tf-standin-rest={tfs_rest_url}" if tfs_rest_url else "off",
        "MNIST_WEB_TENSORFLOW_GRPC": f"tf-standin-grpc={config.grpc_target}",
        "MNIST_WEB_REPORTS_DIR": str(config.report_dir),
        "PYTHONPATH": str(REPO_ROOT),
    }
    return ManagedProcess("web page", [sys.executable, "-m", "serving.web"], config.log_dir / "web.log", env)


def _web_ready(config: StackConfig) -> bool:
    # http.client, not urllib: a proxy set in the environment must not answer for a local probe.
    connection = http.client.HTTPConnection(config.host, config.web_port, timeout=2.0)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    finally:
        connection.close()


@contextlib.contextmanager
def running_server(
    config: StackConfig,
    which: Literal["torch", "tf"],
    *,
    env: Mapping[str, str] | None = None,
    flags: Sequence[str] = (),
    proxy: bool = True,
    ca_file: str | os.PathLike[str] | None = None,
) -> Iterator[Server]:
    """One server of the stack alone, ready for the block and stopped after (on errors too): the PyTorch
    REST server (``torch``) or the TF Serving stand-in with its gRPC and REST APIs (``tf``). Benchmarks
    and tests start servers only through this (or ``rest_process``/``grpc_process`` and ``Server.wait_ready``).

    ``env`` (torch: extra MNIST_REST_* settings), ``flags`` (tf: extra TF Serving flags), ``proxy``
    (False: no nginx in front) and ``ca_file`` (torch over HTTPS) are ``rest_process``'s and
    ``grpc_process``'s. Ports, host, models folder, log folder and readiness timeout come from ``config``
    (``stack.config.free_port_config`` for free ports). Raises StackError, with the log's last lines, if the server exits or is not ready in time.

        with running_server(config, "torch", env={"MNIST_REST_WORKERS": "1"}, proxy=False) as server:
            RestClient(server.rest_url).predict(images)     # server.pids: for CPU accounting
    """
    if which == "torch":
        if flags:
            raise ValueError("flags are the stand-in's; the PyTorch REST server takes env settings")
        check_base_path(Path((env or {}).get("MNIST_REST_MODEL_BASE_PATH", config.torch_base_path)), "train-torch")
        ensure_port_free(config.host, config.rest_port, "PyTorch REST server")
        server = rest_process(config, env=env, proxy=proxy, ca_file=ca_file)
    elif which == "tf":
        if env:
            raise ValueError("env settings are the PyTorch REST server's; the stand-in takes flags")
        base_flag = next((f for f in flags if f.startswith("--model_base_path=")), None)
        if not any(f.startswith("--model_config_file") for f in flags):  # else the models are that file's
            check_base_path(Path(base_flag.split("=", 1)[1]) if base_flag else config.tf_base_path, "train-tf")
        ensure_port_free(config.host, config.grpc_port, "TF Serving gRPC stand-in")
        if config.tfs_rest_port:
            ensure_port_free(config.host, config.tfs_rest_port, "TF Serving stand-in's REST API")
        server = grpc_process(config, flags=flags, proxy=proxy)
    else:
        raise ValueError(f"which={which!r}: expected 'torch' or 'tf'")
    try:
        server.start()
        took = server.wait_ready(timeout_s=config.ready_timeout_s)
        log.info("%s ready after %.1f s", server.name, took)
        yield server
    finally:
        status = server.stop()
        if status not in (None, 0):
            log.warning("%s exited with status %s (log: %s)", server.name, status, server.log_path)


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[RunningStack]:
    """Both servers and the web page up and ready for the block; stopped cleanly after, on errors too."""
    check_models(config)
    ensure_port_free(config.host, config.rest_port, "PyTorch REST server")
    ensure_port_free(config.host, config.grpc_port, "TF Serving gRPC stand-in")
    ensure_port_free(config.host, config.tfs_rest_port, "TF Serving stand-in's REST API")
    ensure_port_free(config.host, config.web_port, "web page")
    rest, grpc, web = rest_process(config), grpc_process(config), web_process(config, config.tfs_rest_url)
    try:
        rest.start()
        grpc.start()
        web.start()
        took = rest.wait_ready(timeout_s=config.ready_timeout_s)
        log.info("PyTorch REST server ready at %s after %.1f s", config.rest_url, took)
        took = grpc.wait_ready(timeout_s=config.ready_timeout_s)
        log.info("TF Serving stand-in ready at %s (gRPC) and %s (REST) after %.1f s", config.grpc_target,
                 config.tfs_rest_url, took)
        web.wait_ready(lambda: _web_ready(config), config.ready_timeout_s)
        log.info("web page: open %s/ in a browser (draw a digit; the load-test report at %s/#report)",
                 config.web_url, config.web_url)  # fmt: skip
        yield RunningStack(config, rest, grpc, web)
    finally:
        for proc in (rest, grpc, web):
            status = proc.stop()
            if status not in (None, 0):
                log.warning("%s exited with status %s (log: %s)", proc.name, status, proc.log_path)
