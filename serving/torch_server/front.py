"""The PyTorch REST server's container command: gunicorn behind nginx, in one container.

    python -m serving.torch_server.front       # Dockerfile.torch's CMD (compose and Kubernetes)

Clients reach nginx on ``MNIST_REST_HOST:MNIST_REST_PORT`` (0.0.0.0:8080), as they reached gunicorn
before; gunicorn listens on ``127.0.0.1:MNIST_REST_UPSTREAM_PORT`` (8081) inside the container and
sees only whole requests (serving/torch_server/proxy.py says why). HTTPS (``MNIST_REST_TLS_CERT`` /
``MNIST_REST_TLS_KEY``) is served by nginx. The MNIST_PROXY_* deadlines and bounds apply
(docs/reliability.md); where nginx listens and forwards comes from the MNIST_REST_* variables above.

Stopping: SIGTERM or SIGINT stops nginx gracefully (SIGQUIT: requests in flight finish) and gunicorn
gracefully (SIGTERM: its graceful_timeout). If either exits on its own, the other is stopped and this
command exits with the first one's status, so the container restarts as a whole. `make serve` runs the
same two processes under its own launcher (stack/servers.py).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from serving.torch_server.config import ConfigError, env_int, env_str
from serving.torch_server.proxy import ENV_PREFIX, ProxySettings, prepare

log = logging.getLogger("serving.torch_server.front")

GUNICORN_CONF = Path(__file__).resolve().parent / "gunicorn_conf.py"
DEFAULT_UPSTREAM_PORT = 8081


def proxy_settings(upstream_port: int) -> ProxySettings:
    """nginx's settings in the container: MNIST_PROXY_* for deadlines and bounds, MNIST_REST_* for where."""
    base = ProxySettings.from_env()
    settings = ProxySettings(**{
        **base.__dict__,
        "host": env_str("HOST", "0.0.0.0"),
        "port": env_int("PORT", 8080, minimum=1),
        "upstream": f"127.0.0.1:{upstream_port}",
        "tls_cert": env_str("TLS_CERT", ""),
        "tls_key": env_str("TLS_KEY", ""),
    })
    settings.check()
    return settings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        upstream_port = env_int("UPSTREAM_PORT", DEFAULT_UPSTREAM_PORT, minimum=1)
        settings = proxy_settings(upstream_port)
        run_dir = Path(os.environ.get(ENV_PREFIX + "RUN_DIR") or tempfile.mkdtemp(prefix="mnist-rest-proxy-"))
        nginx_command = prepare(settings, run_dir.resolve())
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    # nginx writes the access log (MNIST_PROXY_ACCESS_LOG); gunicorn's own would cost about 0.2 ms of
    # CPU per request, so it is off unless MNIST_REST_ACCESS_LOG asks for it.
    gunicorn_env = {"MNIST_REST_ACCESS_LOG": "off", **os.environ, "MNIST_REST_HOST": "127.0.0.1",
                    "MNIST_REST_PORT": str(upstream_port), "MNIST_REST_TLS_CERT": "", "MNIST_REST_TLS_KEY": ""}
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.torch_server.app:create_app()"],
        env=gunicorn_env,
    )
    nginx = subprocess.Popen(nginx_command)
    log.info("nginx on %s:%d (pid %d) in front of gunicorn on 127.0.0.1:%d (pid %d)",
             settings.host, settings.port, nginx.pid, upstream_port, gunicorn.pid)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("stopping: nginx and gunicorn finish the requests in flight")
        for process, signum in ((nginx, signal.SIGQUIT), (gunicorn, signal.SIGTERM)):
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    first_status: int | None = None
    while nginx.poll() is None or gunicorn.poll() is None:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # a signal arrived; its handler ran
            continue
        for process in (nginx, gunicorn):
            if process.pid == pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                if first_status is None:
                    first_status = process.returncode
                    if not stopping:
                        name = "nginx" if process is nginx else "gunicorn"
                        log.error("%s exited with status %s; stopping the other", name, process.returncode)
                stop()
    return 0 if stopping else (first_status or 1)


if __name__ == "__main__":
    sys.exit(main())
