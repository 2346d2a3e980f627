"""``python -m serving.web``: the page's backend under gunicorn, settings from ``MNIST_WEB_*`` (docs/web.md).

gunicorn is embedded (its documented custom-application pattern) so that the bind address, workers and
threads come from the same validated settings as the app; the app is built in each worker after the
fork, so no client connection crosses a fork. Exit status 2 for a bad setting.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from serving.web.config import ConfigError, WebConfig

log = logging.getLogger("serving.web")


class _WebApplication(BaseApplication):  # type: ignore[misc]  # gunicorn ships no type hints
    def __init__(self, config: WebConfig) -> None:
        self.web_config = config
        super().__init__()

    def load_config(self) -> None:
        config = self.web_config
        settings = {
            "bind": [f"{config.host}:{config.port}"],
            "workers": config.workers,
            "threads": config.threads,
            "worker_class": "gthread",
            # Each page request waits for up to three targets, each bounded by timeout_s.
            "timeout": max(30, int(config.timeout_s * 3) + 10),
            "proc_name": "mnist-web",
            "accesslog": "-",
            "control_socket_disable": True,
        }
        for key, value in settings.items():
            if key in self.cfg.settings:  # a setting this gunicorn does not know is left out
                self.cfg.set(key, value)

    def load(self) -> Flask:
        from serving.web.app import create_app

        return create_app()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        config = WebConfig.load()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("web page at http://%s:%d/", "127.0.0.1" if config.host == "0.0.0.0" else config.host, config.port)
    _WebApplication(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
