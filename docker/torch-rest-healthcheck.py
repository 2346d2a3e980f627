"""Healthcheck of the PyTorch REST image: exit 0 when GET /readyz on MNIST_REST_PORT answers 200.

The server answers /readyz with 503 until a model version is loaded, so a container becomes healthy
only once it can serve predictions. The slim Python image has no curl; this uses the standard library
only and imports nothing heavy, so a probe costs a few milliseconds of CPU.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("MNIST_REST_PORT")
    if not port or not port.isdigit():
        print(f"unhealthy: MNIST_REST_PORT is {port!r}; expected the server's port number", file=sys.stderr)
        return 1
    host = os.environ.get("MNIST_REST_HEALTHCHECK_HOST", "127.0.0.1")
    timeout_s = float(os.environ.get("MNIST_REST_HEALTHCHECK_TIMEOUT_S", "4"))
    url = f"http://{host}:{port}/readyz"
    # No proxy: an HTTP(S)_PROXY in the container's environment must not catch a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            print(f"healthy: GET {url} answered {response.status}")
            return 0
    except urllib.error.HTTPError as exc:  # 503 while no model is loaded
        print(f"unhealthy: GET {url} answered {exc.code}: {exc.read(200)!r}", file=sys.stderr)
    except (OSError, ValueError) as exc:  # refused, timed out, reset
        print(f"unhealthy: GET {url} failed: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
