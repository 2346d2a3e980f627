"""What an application's single-image ``predict`` costs above the load tester's engine, on the same server.

Two pairs, each with uint8 and float32 input:

- ``RestClient.predict`` against the load tester's REST engine (``loadtest.rest_worker.HttpEngine``) on
  the PyTorch REST server as ``make serve`` runs it (nginx in front of gunicorn);
- ``GrpcClient.predict`` against the load tester's gRPC engine (``loadtest.grpc_worker.GrpcEngine``) on
  the TF Serving stand-in (``serving.tfs_standin``; not TF Serving).

Both sides make sequential single-image calls (concurrency 1) with the same real MNIST test images. The
engine sends requests encoded once by the client library (JSON rows for REST: the format the client
sends one image in) and runs here, in this process, as the load tester runs it in its worker processes;
the client encodes each call from the numpy image, as an application does. Sides alternate, engine then
client, for ``--rounds`` rounds after a warm-up of each; a round's figure is its p50; per side the
median of the rounds is reported with the spread, and the difference of the medians is compared with
the target: at most 0.3 ms (issue 14, "a client that costs little").

    python -m bench.client_cost [--models-dir models] [--rounds 7] [--calls 300]

Servers start through ``stack.servers.running_server`` on free ports; writes ``<output-dir>/client_cost.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.results import write_result
from bench.targets import target
from mnist_client import contract, mnist_data
from mnist_client.grpc_client import GrpcClient
from mnist_client.loadtest.grpc_worker import GrpcEngine
from mnist_client.loadtest.pacer import ClosedLoop
from mnist_client.loadtest.records import RecordBatch, RecordSink
from mnist_client.loadtest.rest_worker import HttpEngine, build_request
from mnist_client.rest import RestClient
from stack.config import free_port_config
from stack.servers import running_server

log = logging.getLogger("bench.client_cost")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "client_cost"
TARGET_MS = 0.3  # the client's p50 may be at most this much above the engine's
DISTINCT_IMAGES = 100
ENGINE_TIMEOUT_S = 10.0

# (name, what answers, stack.servers.running_server's which)
PAIRS = (
    ("torch-rest", "PyTorch REST server (nginx + gunicorn, make serve's defaults)", "torch"),
    ("tf-standin-grpc", "TF Serving stand-in, gRPC (serving.tfs_standin)", "tf"),
)
INPUTS = ("uint8", "float32")
CLIENTS = {"torch-rest": "RestClient", "tf-standin-grpc": "GrpcClient"}


def _p50_ms(latencies_s: list[float]) -> float:
    return statistics.median(latencies_s) * 1e3


def engine_round(engine: HttpEngine | GrpcEngine, calls: int) -> tuple[float, float]:
    """p50 (ms) of ``calls`` sequential single-image calls by the load tester's engine (one slot, closed
    loop), and this process's CPU time per call (ms)."""
    batches: list[RecordBatch] = []
    cpu_started = time.process_time()
    engine.run(ClosedLoop(requests=calls), 1, 0, RecordSink(0, batches.append), record_lag=False)
    cpu_ms = (time.process_time() - cpu_started) * 1e3 / calls
    latencies_us = [us for batch in batches for us in batch.ok_latencies_us]
    errors = [error for batch in batches for error in batch.errors]
    if errors or len(latencies_us) != calls:
        raise RuntimeError(f"the engine's calls failed ({len(errors)} of {calls}): {errors[:1]}")
    return statistics.median(latencies_us) / 1e3, cpu_ms


def client_round(predict: Callable[[np.ndarray], object], images: np.ndarray, calls: int) -> tuple[float, float]:
    """p50 (ms) of ``calls`` sequential ``predict(image)`` calls, one [28, 28] image each, and this
    process's CPU time per call (ms)."""
    latencies = []
    cpu_started = time.process_time()
    for i in range(calls):
        image = images[i % len(images)]
        started = time.perf_counter()
        predict(image)
        latencies.append(time.perf_counter() - started)
    return _p50_ms(latencies), (time.process_time() - cpu_started) * 1e3 / calls


def _engine_and_client(
    pair: str, server, images: np.ndarray
) -> tuple[HttpEngine | GrpcEngine, RestClient | GrpcClient]:
    if pair == "torch-rest":
        client = RestClient(server.rest_url, binary=False, pool_maxsize=1)
        prepared = [client.prepare(image) for image in images]  # the load tester's own payload encoding
        host, port = server.rest_url.rsplit("//", 1)[1].rsplit(":", 1)
        requests = [build_request(host, int(port), p.path, p.content_type, p.body) for p in prepared]
        engine = HttpEngine(host, int(port), requests, [1] * len(requests), ENGINE_TIMEOUT_S, f"POST {server.rest_url}")
        return engine, client
    grpc_client = GrpcClient(server.grpc_target)
    requests = [grpc_client.prepare(image).request for image in images]
    return GrpcEngine(server.grpc_target, requests, [1] * len(requests), ENGINE_TIMEOUT_S), grpc_client


def measure_pair(pair: str, server, images: dict[str, np.ndarray], rounds: int, calls: int, warmup: int) -> dict:
    """Engine and client in alternating rounds, for each input type; p50s per round and their medians."""
    engine, client = _engine_and_client(pair, server, images["uint8"])
    try:
        if warmup:  # connections open, code paths and the server's model warm
            for name in INPUTS:
                client_round(client.predict, images[name], warmup)
            engine_round(engine, warmup)
        results = {}
        for name in INPUTS:
            engine_rounds, client_rounds = [], []
            for _ in range(rounds):
                engine_rounds.append(engine_round(engine, calls))
                client_rounds.append(client_round(client.predict, images[name], calls))
            results[name] = _summary(engine_rounds, client_rounds)
            log.info("%s %s: engine p50 %.3f ms, client p50 %.3f ms", pair, name,
                     results[name]["engine_p50_ms"], results[name]["client_p50_ms"])
        return results
    finally:
        client.close()
        if isinstance(engine, GrpcEngine):
            engine.close()


def _summary(engine_rounds: list[tuple[float, float]], client_rounds: list[tuple[float, float]]) -> dict:
    """Medians over rounds of each side's p50 and CPU per call; the verdict compares the p50 medians."""
    engine_p50s, engine_cpu = [r[0] for r in engine_rounds], [r[1] for r in engine_rounds]
    client_p50s, client_cpu = [r[0] for r in client_rounds], [r[1] for r in client_rounds]
    engine_ms, client_ms = statistics.median(engine_p50s), statistics.median(client_p50s)
    extra = client_ms - engine_ms
    return {
        # This process's CPU per call (the servers run in their own): steadier than latency on a busy machine.
        "engine_cpu_ms_per_call": round(statistics.median(engine_cpu), 3),
        "client_cpu_ms_per_call": round(statistics.median(client_cpu), 3),
        "engine_p50_ms": round(engine_ms, 3),
        "client_p50_ms": round(client_ms, 3),
        "client_minus_engine_ms": round(extra, 3),
        "engine_round_p50s_ms": [round(v, 3) for v in engine_p50s],
        "client_round_p50s_ms": [round(v, 3) for v in client_p50s],
        "round_differences_ms": [round(c - e, 3) for e, c in zip(engine_p50s, client_p50s)],
        "target_ms": TARGET_MS,
        "verdict": "PASS" if extra <= TARGET_MS else "MISS",
    }


def load_images(count: int) -> dict[str, np.ndarray]:
    """The first ``count`` MNIST test images: uint8 as stored, and float32 in [0, 1] (pixel / 255)."""
    test = mnist_data.load_split("test")
    uint8 = np.ascontiguousarray(test.images[:count])
    return {"uint8": uint8, "float32": uint8.astype(contract.INPUT_DTYPE) / np.float32(contract.PIXEL_SCALE)}


def table(result: dict) -> str:
    lines = [
        f"client predict against the load tester's engine, one image per call, concurrency 1 "
        f"({result['rounds']} rounds x {result['calls']} calls; p50 medians over rounds)",
        f"{'target (client)':<28} {'input':<8} {'engine ms':>9} {'client ms':>9} {'extra ms':>8} "
        f"{'rounds min..max extra':>22}  {'vs <= ' + str(TARGET_MS) + ' ms':<13} CPU ms/call engine, client",
    ]
    for pair, data in result["pairs"].items():
        for name, row in data["inputs"].items():
            spread = row["round_differences_ms"]
            lines.append(
                f"{pair + ' (' + CLIENTS[pair] + ')':<28} {name:<8} {row['engine_p50_ms']:>9.3f} "
                f"{row['client_p50_ms']:>9.3f} {row['client_minus_engine_ms']:>8.3f} {min(spread):>10.3f} .. "
                f"{max(spread):>7.3f}  {row['verdict']:<13} "
                f"{row['engine_cpu_ms_per_call']:.3f}, {row['client_cpu_ms_per_call']:.3f}"
            )
    lines += [f"{pair}: {data['served_by']}" for pair, data in result["pairs"].items()]
    lines.append(f"load average (1 min) at the end: {result['load_average_1min']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--rounds", type=int, default=7, help="engine/client rounds per input type (>= 5 for figures)")
    parser.add_argument("--calls", type=int, default=300, help="sequential calls per side and round")
    parser.add_argument("--warmup", type=int, default=100, help="untimed calls per side before the rounds")
    parser.add_argument("--only", choices=[p for p, _, _ in PAIRS], help="measure one pair only")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1 or args.warmup < 0:
        parser.error("--rounds and --calls must be >= 1, --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    images = load_images(DISTINCT_IMAGES)
    result: dict = {"rounds": args.rounds, "calls": args.calls, "target_ms": TARGET_MS, "pairs": {}}
    with tempfile.TemporaryDirectory(prefix="client-cost-") as folder:
        for pair, served, which in PAIRS:
            if args.only and pair != args.only:
                continue
            config = free_port_config(args.models_dir, Path(folder) / pair)
            if which == "tf":  # gRPC only: the stand-in alone, without its REST API and nginx
                config = dataclasses.replace(config, tfs_rest_port=0)
            with running_server(config, which, proxy=which == "torch") as server:  # type: ignore[arg-type]
                inputs = measure_pair(pair, server, images, args.rounds, args.calls, args.warmup)
            result["pairs"][pair] = {"served_by": served, "inputs": inputs}
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    result["targets"] = [
        target(
            f"{CLIENTS[pair]} single-image predict p50 above the load tester's engine, {name} input ({pair})",
            row["client_minus_engine_ms"],
            TARGET_MS,
            better="lower",
            unit=" ms",
            detail=f"client {row['client_p50_ms']:.3f} ms, engine {row['engine_p50_ms']:.3f} ms, "
            f"medians of {args.rounds} rounds",
        )
        for pair, data in result["pairs"].items()
        for name, row in data["inputs"].items()
    ]
    write_result(args.output_dir, NAME, result, table(result))
    return result


if __name__ == "__main__":
    main()
