"""``python -m serving.web.healthcheck``: exit 0 when the page's backend answers ``/healthz``, else 1.

The container healthcheck (docker/loadtest.Dockerfile, stage web). It asks 127.0.0.1 on
``MNIST_WEB_PORT`` with http.client, so no proxy set in the environment can answer for it.
"""

from __future__ import annotations

import http.client
import os
import sys

from mnist_client import contract


def main() -> int:
    port = int(os.environ.get("MNIST_WEB_PORT") or contract.WEB_PORT)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=4.0)
    try:
        connection.request("GET", "/healthz")
        status = connection.getresponse().status
    except OSError as exc:
        print(f"web page on port {port}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"web page on port {port}: /healthz answered HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
