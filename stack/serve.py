"""`make serve`: both servers and the web page in the foreground until Ctrl-C or SIGTERM.

Ports, host and the models folder come from environment variables (see
stack/config.py); the defaults are the ports of docs/design.md.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from stack.config import StackConfig
from stack.processes import StackError
from stack.servers import running_stack

log = logging.getLogger("stack.serve")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        config = StackConfig.from_env()
        with running_stack(config) as stack:
            log.info("serving: REST %s/v1/models/mnist  gRPC %s  web page %s/  (Ctrl-C to stop)",
                     config.rest_url, config.grpc_target, config.web_url)  # fmt: skip
            while not stop.wait(1.0):
                for proc in (stack.rest, stack.grpc, stack.web):
                    if not proc.running():
                        raise StackError(f"{proc.name} exited unexpectedly; see {proc.log_path}")
        log.info("both servers and the web page stopped")
        return 0
    except (StackError, ValueError) as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
