"""REST request formats side by side: JSON rows against .npy bodies, by batch size, on the real server.

Starts the PyTorch REST server through the stack's launcher (``stack.servers.running_server``: gunicorn
alone, one sync worker, 127.0.0.1, a free port) on the newest TorchScript export, then for each batch
size measures, for ``RestClient(binary=False)`` and ``RestClient(binary=True)``: the request body size,
the client's encode time (``prepare``), and the median end-to-end ``predict`` latency (encode + HTTP +
server decode + model + client decode). This is the measurement behind ``RestClient``'s default
``binary_threshold``.

    python -m bench.client_rest_formats [--models-dir models] [--batches 1 4 16 64 256] [--calls 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mnist_client.rest import DEFAULT_BINARY_THRESHOLD, RestClient
from stack.config import free_port_config
from stack.servers import running_server

log = logging.getLogger("bench.client_rest_formats")

REPO_ROOT = Path(__file__).resolve().parent.parent
# One sync worker, no nginx: the formats' own cost, with nothing else of the stack in the way.
SERVER_ENV = {"MNIST_REST_WORKERS": "1", "MNIST_REST_DEVICE": "cpu", "MNIST_REST_ACCESS_LOG": "off"}


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def measure(url: str, images: np.ndarray, batches: list[int], calls: int) -> list[dict]:
    rows = []
    with RestClient(url, binary=False) as json_client, RestClient(url, binary=True) as npy_client:
        for batch in batches:
            chunk = images[:batch]
            row: dict = {"batch": batch}
            for name, client in (("json", json_client), ("npy", npy_client)):
                encode = []
                for _ in range(calls):
                    started = time.perf_counter()
                    prepared = client.prepare(chunk)
                    encode.append(time.perf_counter() - started)
                for _ in range(3):  # warm-up
                    client.predict(chunk)
                latency = []
                for _ in range(calls):
                    started = time.perf_counter()
                    client.predict(chunk)
                    latency.append(time.perf_counter() - started)
                row[name] = {
                    "body_bytes": len(prepared.body),
                    "encode_ms": _median_ms(encode),
                    "predict_p50_ms": _median_ms(latency),
                }
            row["npy_speedup"] = round(row["json"]["predict_p50_ms"] / row["npy"]["predict_p50_ms"], 2)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--calls", type=int, default=30, help="timed calls per format and batch size (median)")
    args = parser.parse_args(argv)
    if args.calls < 1 or any(b < 1 for b in args.batches):
        parser.error("--calls and every --batches value must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from mnist_client import mnist_data

    test = mnist_data.load_split("test")
    images = test.images[: max(args.batches)]  # uint8 [N, 28, 28]: what applications usually hold
    with tempfile.TemporaryDirectory(prefix="client-rest-formats-") as folder:
        config = free_port_config(args.models_dir, Path(folder))
        with running_server(config, "torch", env=SERVER_ENV, proxy=False) as server:
            rows = measure(server.rest_url, images, args.batches, args.calls)

    result = {
        "server": "gunicorn, 1 sync worker, 127.0.0.1",
        "calls": args.calls,
        "input_dtype": "uint8",
        "default_binary_threshold": DEFAULT_BINARY_THRESHOLD,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "rows": rows,
    }
    print(
        f"{'batch':>5} | {'JSON bytes':>10} {'encode ms':>9} {'p50 ms':>8} | {'npy bytes':>9} {'encode ms':>9} "
        f"{'p50 ms':>8} | npy speed-up"
    )
    for row in rows:
        j, n = row["json"], row["npy"]
        print(
            f"{row['batch']:>5} | {j['body_bytes']:>10} {j['encode_ms']:>9.3f} {j['predict_p50_ms']:>8.3f} | "
            f"{n['body_bytes']:>9} {n['encode_ms']:>9.3f} {n['predict_p50_ms']:>8.3f} | {row['npy_speedup']:.2f}x"
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "client_rest_formats.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
