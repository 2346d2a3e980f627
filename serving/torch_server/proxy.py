"""nginx in front of gunicorn: the PyTorch REST server's defence against slow and idle clients.

gunicorn's sync workers (and gthread's request threads) read a request in the worker that will
answer it, with no deadline on the headers: two clients trickling headers hold two workers, and
everyone else waits. nginx reads every request whole, with deadlines, on an event loop where a
slow connection costs a few kilobytes, and hands gunicorn only complete requests over loopback.
(gunicorn's documentation recommends exactly this for sync workers.)

    python -m serving.torch_server.proxy       # settings from MNIST_PROXY_* (docs/reliability.md)

It writes nginx.conf into a run folder (``MNIST_PROXY_RUN_DIR``, default a new temporary folder;
nginx's temporary files go there too, so a read-only root file system is fine) and replaces
itself with ``nginx -g 'daemon off;'``: SIGTERM stops at once, SIGQUIT lets requests finish.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.torch_server.config import ConfigError

log = logging.getLogger(__name__)

ENV_PREFIX = "MNIST_PROXY_"
NGINX_MISSING = "nginx is not installed: install the Debian package `nginx` (apt-get install -y nginx)"


@dataclass(frozen=True)
class ProxySettings:
    """Every knob of the front, with its default; ``from_env`` reads MNIST_PROXY_<NAME>."""

    # Where clients connect, and where gunicorn listens (loopback: host:port, or unix:/path).
    host: str = "0.0.0.0"
    port: int = 8080
    upstream: str = "127.0.0.1:8081"
    # Deadlines on the client, in seconds: the whole request head; each read of the body (nginx
    # times the gap between two reads, and the body is capped at max_body_bytes); an idle
    # keep-alive connection; each write of the answer.
    header_timeout_s: int = 10
    body_timeout_s: int = 10
    keepalive_timeout_s: int = 15
    send_timeout_s: int = 10
    # Open client connections at once (nginx's worker_connections, less those it needs towards
    # gunicorn); at the bound nginx closes idle connections (keep-alive, or nothing sent yet) to
    # make room, and if none is idle it closes the new connection at accept.
    max_connections: int = 4096
    # Requests being answered at once (their heads read); past it: 503 with Retry-After.
    max_active_requests: int = 1024
    retry_after_s: int = 1
    # The app's own body limit (MNIST_REST_MAX_BODY_BYTES, 32 MiB): larger bodies get 413 here.
    max_body_bytes: int = 32 * 1024 * 1024
    # How long gunicorn may take to answer (its worker timeout is 30 s).
    upstream_timeout_s: int = 35
    # HTTPS on the client side (both or neither); gunicorn stays plain HTTP on loopback.
    tls_cert: str = ""
    tls_key: str = ""
    # The access log, one line per request with its status and times (nginx's, and gunicorn's answer
    # time): a file path, /dev/stderr, or "off". It is written here rather than by gunicorn, whose
    # Python access logger cost about 0.2 ms of CPU per single-image request (docs/rest-server.md).
    access_log: str = "/dev/stderr"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProxySettings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, default in cls().__dict__.items():
            raw = env.get(ENV_PREFIX + name.upper().removesuffix("_S"))
            if raw is None or raw == "":
                continue
            if isinstance(default, int):
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ConfigError(f"{ENV_PREFIX}{name.upper().removesuffix('_S')}={raw!r}: expected an integer") from None
            else:
                values[name] = raw
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, int) and value < (0 if name == "port" else 1):
                raise ConfigError(f"{ENV_PREFIX}{name.upper().removesuffix('_S')}={value}: expected a positive integer")
        if self.port > 65535:
            raise ConfigError(f"{ENV_PREFIX}PORT={self.port}: expected a port number up to 65535")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"{ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY go together: set both (HTTPS) or neither")
        for name, path in (("TLS_CERT", self.tls_cert), ("TLS_KEY", self.tls_key)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{ENV_PREFIX}{name}={path}: no such file")
        if not self.upstream.startswith("unix:") and ":" not in self.upstream:
            raise ConfigError(f"{ENV_PREFIX}UPSTREAM={self.upstream!r}: expected host:port or unix:/path")


def _json_error(status: int, message: str) -> str:
    return f"return {status} '{{\"error\": \"{message}\"}}';"


def render_config(settings: ProxySettings, run_dir: Path) -> str:
    """The nginx.conf text for ``settings``; nginx's pid and temporary files live in ``run_dir``."""
    listen = f"{settings.host}:{settings.port}" if ":" not in settings.host else f"[{settings.host}]:{settings.port}"
    tls = ""
    if settings.tls_cert:
        listen += " ssl"
        tls = (
            f"        ssl_certificate {Path(settings.tls_cert).resolve()};\n"
            f"        ssl_certificate_key {Path(settings.tls_key).resolve()};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        )
    temp = "\n".join(
        f"    {kind}_temp_path {run_dir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    access_log = "access_log off;" if settings.access_log == "off" else f"access_log {settings.access_log} mnist;"
    # Each proxied request also holds a connection towards gunicorn: size worker_connections for both.
    worker_connections = settings.max_connections + settings.max_active_requests
    return f"""# Written by serving/torch_server/proxy.py: do not edit, set MNIST_PROXY_* instead.
worker_processes 1;
# A graceful stop (SIGQUIT) waits this long for requests in flight, as gunicorn waits for its own.
worker_shutdown_timeout {settings.upstream_timeout_s}s;
pid {run_dir / "nginx.pid"};
error_log stderr warn;
events {{
    worker_connections {worker_connections};
}}
http {{
    log_format mnist '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                     '${{request_time}}s upstream ${{upstream_response_time}}s "$http_user_agent"';
    {access_log}
    server_tokens off;
{temp}
    client_header_timeout {settings.header_timeout_s}s;
    client_body_timeout {settings.body_timeout_s}s;
    keepalive_timeout {settings.keepalive_timeout_s}s;
    send_timeout {settings.send_timeout_s}s;
    reset_timedout_connection on;
    client_max_body_size {settings.max_body_bytes};
    client_body_buffer_size 1m;
    large_client_header_buffers 4 8k;
    default_type application/json;
    limit_conn_zone $server_name zone=active_requests:1m;
    upstream gunicorn {{
        server {settings.upstream};
        # Reused connections to gthread workers save a TCP handshake, accept and close per request
        # (sync workers close each one anyway). Each is closed after 100 requests so that new ones
        # spread over the workers (a gthread worker keeps the connections it accepts), and after 4 s
        # idle, before the server's own keep-alive (5 s) could close it under a request.
        keepalive 32;
        keepalive_requests 100;
        keepalive_timeout 4s;
    }}
    server {{
        listen {listen} backlog=1024;
        server_name mnist-rest;
{tls}        limit_conn active_requests {settings.max_active_requests};
        limit_conn_status 503;
        limit_conn_log_level warn;
        error_page 503 @busy;
        error_page 413 @too_large;
        error_page 502 504 =503 @unavailable;
        location / {{
            proxy_pass http://gunicorn;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            # The whole request is read before gunicorn sees it, and the whole answer taken from
            # gunicorn at once: no worker ever waits on a client.
            proxy_request_buffering on;
            proxy_buffering on;
            proxy_buffers 32 64k;
            proxy_connect_timeout 5s;
            proxy_send_timeout {settings.upstream_timeout_s}s;
            proxy_read_timeout {settings.upstream_timeout_s}s;
        }}
        location @busy {{
            add_header Retry-After {settings.retry_after_s} always;
            {_json_error(503, f"too many requests at once (more than {settings.max_active_requests}); retry")}
        }}
        location @too_large {{
            {_json_error(413, f"request body larger than {settings.max_body_bytes} bytes")}
        }}
        location @unavailable {{
            add_header Retry-After {settings.retry_after_s} always;
            {_json_error(503, "the model server behind the proxy is not answering; retry")}
        }}
    }}
}}
"""


def nginx_argv(conf_path: Path, run_dir: Path, nginx: str = "nginx") -> list[str]:
    # -e stderr: never open the compiled-in error log path (root's, read-only in containers).
    return [nginx, "-e", "stderr", "-p", str(run_dir), "-c", str(conf_path), "-g", "daemon off;"]


def find_nginx() -> str:
    """The nginx binary (PATH, then /usr/sbin, where Debian puts it); ConfigError if absent."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ConfigError(NGINX_MISSING)
    return found


def prepare(settings: ProxySettings, run_dir: Path) -> list[str]:
    """Write nginx.conf into ``run_dir`` and return the command that runs nginx with it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / "nginx.conf"
    conf.write_text(render_config(settings, run_dir))
    return nginx_argv(conf, run_dir, find_nginx())


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = sys.argv[1:] if argv is None else list(argv)
    if args:  # everything comes from the environment
        print(__doc__)
        return 0 if args in (["-h"], ["--help"]) else 2
    try:
        settings = ProxySettings.from_env()
        run_dir = Path(os.environ.get(ENV_PREFIX + "RUN_DIR") or tempfile.mkdtemp(prefix="mnist-rest-proxy-"))
        command = prepare(settings, run_dir.resolve())
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("nginx on %s:%d in front of gunicorn at %s (config: %s)", settings.host, settings.port,
             settings.upstream, run_dir / "nginx.conf")
    os.execv(command[0], command)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
