"""``python -m serving.tfs_standin --port=8500 --model_name=mnist --model_base_path=models/tf/mnist ...``

Runs until SIGTERM or SIGINT, then stops gracefully: new calls are refused and
calls in flight get up to --standin_shutdown_grace_seconds to finish.
Exit status: 0 after a clean stop, 2 for a bad flag or configuration file,
1 if the server cannot start.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

import tensorflow as tf

from serving.tfs_standin.config import ConfigError
from serving.tfs_standin.flags import FlagError, parse_flags, usage
from serving.tfs_standin.server import ModelServer, ServerStartError

log = logging.getLogger("serving.tfs_standin")

STANDIN_VERSION = "TF Serving stand-in (serving.tfs_standin), gRPC and REST APIs of TensorFlow Serving"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "-help") for a in args):
        print(usage())
        return 0
    if "--version" in args:
        print(f"{STANDIN_VERSION}\nTensorFlow Library: {tf.__version__}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = parse_flags(args)
        server = ModelServer(options)
    except (FlagError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server.start()
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
