"""``python -m bench.gpu_check`` (``make gpu-check``): train, serve and load-test both frameworks on a GPU.

In about five minutes on a machine with an NVIDIA GPU (ten at most), in this order:

1. what each framework sees: PyTorch's CUDA devices, TensorFlow's build and GPUs;
2. one epoch of each trainer on CUDA (``--device cuda``; TensorFlow on its first GPU where its build
   has CUDA, else on the CPU, and the line says why);
3. the GPU memory one REST worker holds, measured in a worker started as gunicorn starts it;
4. the PyTorch REST server, then the TF Serving stand-in, each started alone by the local stack's
   launcher (``stack.servers.running_server``, nginx in front as in ``make serve``) with the GPU
   settings of ``settings.py``, load-tested by the project's load tester at concurrency 1, 16 and 64;
   for each level the figures and the batch sizes the server formed.

Every line printed names the device the part used, as observed where it ran. Without a CUDA device
the check refuses (exit status 2), unless ``--allow-cpu`` is given: then every part runs on the CPU and
every line says so. Exit status 1 when a part failed, answered with errors or wrongly, or ran elsewhere
than it should have. The result, with every line printed, is ``<output-dir>/gpu_check.json``; models,
TensorBoard runs and server logs go to ``<output-dir>/gpu_check/`` (emptied at the start of each run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.gpu_check import observe
from bench.gpu_check.lines import Lines, figures, mib, tag_for
from bench.gpu_check.settings import (
    CONCURRENCY,
    MIN_ACCURACY,
    REPO_ROOT,
    REST_GPU_ENV,
    STANDIN_BATCHING_FILES,
    standin_flags,
)
from bench.results import write_result
from mnist_client import contract
from mnist_client.loadtest import LoadTestConfig, LoadTestError, Target, parse_target, run
from serving.model_repository import model_base_path
from stack.comparison import TORCH_REST
from stack.config import free_port_config
from stack.processes import StackError, tail
from stack.servers import Server, running_server
from training.cli import positive_float, positive_int

log = logging.getLogger("bench.gpu_check")

NAME = "gpu_check"
TIME_BUDGET_S = 600  # what the check is meant to take at most on a GPU machine with the default settings
TF_SERVER = "tf-standin"  # what answers TensorFlow's targets here: the stand-in, never called TF Serving


class PartFailed(RuntimeError):
    """A part of the check could not run; the message says which and why (with its log's last lines)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results",
                        help="gpu_check.json goes here, and the run's models and logs into <output-dir>/gpu_check/")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="where PyTorch sees no CUDA device, run every part on the CPU instead of refusing "
                             "(a rehearsal of the whole path; every line then says CPU)")
    parser.add_argument("--epochs", type=positive_int, default=1, help="epochs of each trainer")
    parser.add_argument("--quick", action="store_true",
                        help="the trainers' --quick (4,096 training images): seconds; for tests and dry runs")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="the four MNIST .gz files (default: as the trainers find them, $MNIST_DATA_DIR first)")
    parser.add_argument("--concurrency", type=positive_int, nargs="+", default=list(CONCURRENCY),
                        help="load levels (requests in flight, closed loop)")
    parser.add_argument("--duration", type=positive_float, default=10.0, help="seconds per level and target")
    parser.add_argument("--warmup", type=positive_int, default=200, help="unmeasured requests before each level")
    parser.add_argument("--part-timeout", type=positive_float, default=600.0,
                        help="seconds a training run or probe may take before the check gives up on it")
    return parser


class GpuCheck:
    """One run of the check; ``run()`` returns its result (also written to the output folder)."""

    def __init__(self, args: argparse.Namespace, torch_devices: dict[str, Any]) -> None:
        self.args = args
        self.cuda = bool(torch_devices["cuda_available"])
        self.kind = "cuda" if self.cuda else "cpu"
        self.lines = Lines(tag_for(self.cuda))
        self.work = args.output_dir.resolve() / NAME
        self.models = self.work / "models"
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.result: dict[str, Any] = {
            "benchmark": NAME,
            "mode": self.kind,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "settings": {
                "epochs": args.epochs, "quick": args.quick, "concurrency": args.concurrency,
                "duration_s": args.duration, "warmup_requests": args.warmup,
                "rest_env": self.rest_env(), "standin_flags": None,
            },
            "devices": {"torch": torch_devices},
        }

    # --- helpers ----------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.lines.say(text)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.say(f"PROBLEM: {text}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.say(f"note: {text}")

    def rest_env(self) -> dict[str, str]:
        return {**REST_GPU_ENV, "MNIST_REST_DEVICE": self.kind, "MNIST_REST_ACCESS_LOG": "off"}

    def child(self, command: str, extra: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
        return run_child(command, self.work / "logs", extra or [], env or {}, self.args.part_timeout)

    def load(self, target: Target, concurrency: int, server: Server) -> dict[str, Any]:
        """One level against one target with the project's load tester; its figures, checked."""
        config = LoadTestConfig(targets=(target,), concurrency=(concurrency,), duration_s=self.args.duration,
                                warmup_requests=self.args.warmup, data_dir=self.args.data_dir,
                                labels={"source": "bench.gpu_check", "mode": self.kind})
        measurement = run(config, server_pids={target.name: server.pids}).measurement(target.name, concurrency)
        summary = measurement.summary()
        kept = {key: summary[key] for key in ("requests", "ok", "errors", "error_rate", "throughput_rps",
                                              "images_per_s", "accuracy", "latency_ms", "flags")}
        kept["concurrency"] = concurrency
        if kept["errors"]:
            self.problem(f"{target.name} at concurrency {concurrency}: {kept['errors']} of {kept['requests']} "
                         f"requests failed ({dict(measurement.errors)})")
        if kept["accuracy"] is not None and kept["accuracy"] < MIN_ACCURACY:
            self.problem(f"{target.name} at concurrency {concurrency}: accuracy {kept['accuracy']:.3f}, below "
                         f"{MIN_ACCURACY}: the device answers wrongly")
        return kept

    # --- the parts --------------------------------------------------------------------------------

    def report_devices(self, tf_devices: dict[str, Any]) -> None:
        torch_devices = self.result["devices"]["torch"]
        build = (f"built for CUDA {torch_devices['cuda_build']}" if torch_devices["cuda_build"]
                 else "a CPU-only build")
        if torch_devices["devices"]:
            seen = "; ".join(f"cuda:{d['index']} {d['name']} ({d['memory_mib']:,} MiB, compute {d['capability']})"
                             for d in torch_devices["devices"])
            self.say(f"devices: PyTorch {torch_devices['version']} ({build}) sees {len(torch_devices['devices'])} "
                     f"CUDA device(s): {seen}")
        else:
            self.say(f"devices: PyTorch {torch_devices['version']} ({build}) sees no CUDA device: its parts run "
                     "on the CPU")
        self.say(f"devices: {describe_tf(tf_devices)}")
        if self.cuda and not tf_devices["gpus"]:
            self.note(f"TensorFlow's parts (its trainer, the stand-in) run on the CPU: {tf_cpu_reason(tf_devices)}")
        if self.cuda and observe.gpu_memory_by_pid() is None:
            self.note("nvidia-smi is missing or failed: the GPU memory of whole processes is not measured "
                      "(the REST worker's allocator figures still are)")

    def train(self, framework: str, device: str) -> dict[str, Any]:
        flags = ["--epochs", str(self.args.epochs), "--device", device, "--version", "1",
                 "--output-dir", str(self.models), "--log-dir", str(self.work / "runs")]
        flags += ["--quick"] if self.args.quick else []
        flags += ["--data-dir", str(self.args.data_dir)] if self.args.data_dir else []
        trained = self.child(f"train-{framework}", flags)
        summary = trained["summary"]
        used = trained["device"]
        name = f" ({trained['device_name']})" if trained.get("device_name") else ""
        images = f"{summary['train_examples']:,} images" if "train_examples" in summary else "the training images"
        peak = (f", peak GPU memory {mib(trained['peak_gpu_memory_mib'])}" if "peak_gpu_memory_mib" in trained
                else ", no GPU memory used")
        self.say(f"train {framework}: device {used}{name}, {self.args.epochs} epoch(s) of {images} in "
                 f"{summary['train_seconds']:.1f} s ({summary['images_per_second']:,.0f} images/s), test accuracy "
                 f"{summary['test_accuracy']:.4f} on {summary['test_examples']:,} images{peak}")
        wanted_gpu = device.startswith("cuda")
        on_gpu = used.startswith("cuda") or used.startswith("GPU")
        if wanted_gpu and not on_gpu:
            self.problem(f"train {framework}: asked for {device}, but it computed on {used}")
        if not wanted_gpu and on_gpu:
            self.problem(f"train {framework}: asked for the CPU, but it used {used}")
        return trained

    def rest_worker_memory(self) -> dict[str, Any]:
        env = {**self.rest_env(), "MNIST_REST_MODEL_BASE_PATH": str(self.torch_base_path())}
        measured = self.child("rest-worker-memory", env=env)
        steps = measured["steps"]
        if measured["device"].startswith("cuda"):
            parts = [f"after {s['after']}: allocated {mib(s['allocated_mib'])}, reserved {mib(s['reserved_mib'])}"
                     for s in steps]
            whole = measured.get("nvidia_smi_process_mib")
            self.say(f"REST worker GPU memory (one worker started as gunicorn starts it, device {measured['device']}, "
                     f"measured with torch.cuda.memory_allocated/memory_reserved): " + "; ".join(parts)
                     + f"; the whole process per nvidia-smi, CUDA context included: {mib(whole)}")
        else:
            parts = [f"after {s['after']}: {mib(s['rss_mib'])}" for s in steps]
            self.say(f"REST worker memory (one worker started as gunicorn starts it, device {measured['device']}): "
                     "no GPU memory on the CPU; resident memory " + "; ".join(parts))
        if not measured["device"].startswith(self.kind):
            self.problem(f"the REST worker loaded its model on {measured['device']}, not {self.kind}")
        return measured

    def torch_base_path(self) -> Path:
        return model_base_path(self.models, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)

    def serve_torch(self) -> dict[str, Any]:
        env = self.rest_env()
        config = free_port_config(self.models, self.work / "torch-rest")
        out: dict[str, Any] = {"env": env, "levels": []}
        with running_server(config, "torch", env=env) as server:
            starts = observe.rest_worker_starts(server.log_path)
            devices = sorted({s.device for s in starts})
            out["worker_devices"] = [s.device for s in starts]
            out["worker_batching"] = [s.batching for s in starts]
            self.say(f"serve torch-rest: device {', '.join(devices) or 'unknown (no worker start line in its log)'} "
                     f"(each worker's start line), {len(starts)} worker(s) x {env['MNIST_REST_THREADS']} request "
                     f"threads, micro-batching {'on' if all(out['worker_batching']) and starts else 'off'} (at most "
                     f"{env['MNIST_REST_BATCH_MAX_SIZE']} images per pass), nginx in front; settings "
                     + " ".join(f"{k}={v}" for k, v in env.items()) + f" (log: {server.log_path})")
            if not starts or any(not d.startswith(self.kind) for d in devices):
                self.problem(f"the REST server's workers serve on {devices or 'an unknown device'}, not {self.kind}")
            target = parse_target(f"{TORCH_REST}={server.rest_url}", "rest")
            for concurrency in self.args.concurrency:
                before = observe.BatchHistogram.parse(observe.fetch_metrics(server.rest_url or ""))
                level = self.load(target, concurrency, server)
                after = observe.BatchHistogram.parse(observe.fetch_metrics(server.rest_url or ""))
                level["batches"] = after.minus(before).summary()
                out["levels"].append(level)
                batches = level["batches"]
                self.say(f"load torch-rest c={concurrency} (device {', '.join(devices)}): {figures(level)}")
                self.say(f"batches torch-rest c={concurrency}: {batches['forward_passes']:,} forward passes of "
                         f"{batches['images']:,} images, {batches['mean_images_per_pass']} images per pass on average, "
                         f"passes by size {batches['passes_by_size']} (its warm-up included)")
            if self.cuda:
                out["gpu_memory_under_load"] = self.process_memory("torch-rest", [server.pid or 0])
        return out

    def serve_tf(self, tf_devices: dict[str, Any]) -> dict[str, Any]:
        on_gpu = self.cuda and bool(tf_devices["gpus"])
        batching_kind = "cuda" if on_gpu else "cpu"
        flags = standin_flags(batching_kind)
        self.result["settings"]["standin_flags"] = flags
        device = "GPU:0" if on_gpu else "CPU"
        why = ("TensorFlow places the model on its first GPU" if on_gpu else tf_cpu_reason(tf_devices))
        out: dict[str, Any] = {"device": device, "flags": flags, "levels": []}
        self.say(f"serve {TF_SERVER}: device {device} ({why}); batching with "
                 f"{STANDIN_BATCHING_FILES[batching_kind].relative_to(REPO_ROOT)}, started afresh for each level "
                 "(it counts its batches only when it stops), nginx in front of its REST API")
        for concurrency in self.args.concurrency:
            config = free_port_config(self.models, self.work / f"tf-standin-c{concurrency}")
            with running_server(config, "tf", flags=flags) as server:
                rest = parse_target(f"{TF_SERVER}-rest={server.rest_url}", "rest")
                grpc = parse_target(f"{TF_SERVER}-grpc={server.grpc_target}", "grpc")
                levels = [self.load(target, concurrency, server) for target in (rest, grpc)]
                memory = self.process_memory(TF_SERVER, [server.pid or 0]) if on_gpu else None
            batches = observe.standin_batches(server.log_path).summary()
            if memory is not None and memory.get("nvidia_smi") and not memory.get("total_mib"):
                self.problem(f"{TF_SERVER}: TensorFlow sees a GPU, but nvidia-smi shows no GPU memory for the stand-in")
            for target, level in zip((rest, grpc), levels, strict=True):
                self.say(f"load {target.name} c={concurrency} (device {device}): {figures(level)}")
            if batches["batching"]:
                self.say(f"batches {TF_SERVER} c={concurrency}: {batches['requests']:,} requests in "
                         f"{batches['batches']:,} batches, {batches['mean_requests_per_batch']} requests per batch on "
                         "average (its REST and gRPC targets together, their warm-up included)")
            else:
                self.problem(f"{TF_SERVER} c={concurrency}: its log does not say batching was on ({server.log_path})")
            out["levels"].append({"concurrency": concurrency, "targets": dict(zip((rest.name, grpc.name), levels,
                                                                                   strict=True)),
                                  "batches": batches, "gpu_memory_under_load": memory})
        return out

    def process_memory(self, name: str, pids: list[int]) -> dict[str, Any]:
        processes = observe.process_tree(pids)
        memory = observe.gpu_memory_of(processes)
        if memory["nvidia_smi"]:
            held = ", ".join(f"pid {pid}: {mib(value)}" for pid, value in memory["by_pid_mib"].items()) or "none"
            self.say(f"GPU memory under load, {name} (per nvidia-smi, CUDA contexts included): {held}")
        return memory

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        tf_devices = self.child("probe-tf")
        self.result["devices"]["tensorflow"] = tf_devices
        self.report_devices(tf_devices)
        tf_device = "cuda:0" if self.cuda and tf_devices["gpus"] else "cpu"
        parts: list[tuple[str, Any]] = [
            ("train_torch", lambda: self.train("torch", self.kind)),
            ("train_tf", lambda: self.train("tf", tf_device)),
            ("rest_worker_memory", self.rest_worker_memory),
            ("serve_torch", self.serve_torch),
            ("serve_tf", lambda: self.serve_tf(tf_devices)),
        ]
        needs = {"rest_worker_memory": "train_torch", "serve_torch": "train_torch", "serve_tf": "train_tf"}
        for name, part in parts:
            if needs.get(name) and needs[name] not in self.result:
                self.problem(f"{name}: skipped, since {needs[name]} failed")
                continue
            try:
                self.result[name] = part()
            except (PartFailed, StackError, LoadTestError) as exc:
                self.problem(f"{name}: {exc}")
            except Exception as exc:  # a check reports what broke and goes on with the parts that can still run
                log.exception("%s failed", name)
                self.problem(f"{name}: {type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - started
        if elapsed > TIME_BUDGET_S:
            self.note(f"the check took {elapsed:.0f} s, over the {TIME_BUDGET_S} s it is meant to take")
        self.say(f"done in {elapsed:.0f} s: {len(self.problems)} problem(s)"
                 + ("" if self.cuda else "; everything ran on the CPU (--allow-cpu): no GPU figure was measured"))
        self.result.update(elapsed_s=round(elapsed, 1), problems=self.problems, notes=self.notes,
                           lines=self.lines.printed)
        return self.result


def describe_tf(tf_devices: dict[str, Any]) -> str:
    distributions = ", ".join(f"{name} {version}" for name, version in tf_devices["distributions"].items())
    build = "built with CUDA" if tf_devices["built_with_cuda"] else "built without CUDA"
    gpus = tf_devices["gpus"]
    seen = (f"sees {len(gpus)} GPU(s): " + "; ".join(f"{g['name']} {g['device_name'] or ''}".strip() for g in gpus)
            if gpus else "sees no GPU")
    return f"TensorFlow {tf_devices['version']} ({distributions or 'distribution unknown'}, {build}) {seen}"


def tf_cpu_reason(tf_devices: dict[str, Any]) -> str:
    """Why TensorFlow runs on the CPU here, in words a user can act on."""
    if tf_devices["gpus"]:
        return "the check runs on the CPU"
    if not tf_devices["built_with_cuda"]:
        return ("TensorFlow here is built without CUDA (make setup's tensorflow-cpu; `make setup TF=cuda` "
                "installs its CUDA build, docs/gpu.md)")
    return "TensorFlow's CUDA build sees no GPU (its CUDA libraries or CUDA_VISIBLE_DEVICES)"


def run_child(command: str, log_dir: Path, extra: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """``python -m bench.gpu_check.child <command>`` with its output in ``log_dir``; its JSON result."""
    log_dir.mkdir(parents=True, exist_ok=True)
    result_file, log_file = log_dir / f"{command}.json", log_dir / f"{command}.log"
    result_file.unlink(missing_ok=True)
    child_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    child_env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the worker's metrics stay in its own process
    argv = [sys.executable, "-m", "bench.gpu_check.child", command, "--result", str(result_file), "--", *extra]
    log.info("running %s (log: %s)", " ".join(argv[2:]), log_file)
    with open(log_file, "wb") as output:
        try:
            status = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=child_env, cwd=REPO_ROOT, timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            raise PartFailed(f"{command} did not finish within {timeout_s:.0f} s; last lines of {log_file}:\n"
                             f"{tail(log_file)}") from None
    if status != 0 or not result_file.is_file():
        raise PartFailed(f"{command} exited with status {status}; last lines of {log_file}:\n{tail(log_file)}")
    return json.loads(result_file.read_text())


def refusal(torch_devices: dict[str, Any]) -> str:
    if torch_devices["cuda_build"]:
        why = (f"PyTorch {torch_devices['version']} is built for CUDA {torch_devices['cuda_build']} but sees no "
               "CUDA device (is there an NVIDIA GPU and driver? nvidia-smi; CUDA_VISIBLE_DEVICES)")
    else:
        why = (f"PyTorch {torch_devices['version']} is a CPU-only build (make setup without TORCH=cpu installs "
               "PyPI's CUDA build)")
    return (f"gpu-check: no CUDA device: {why}. This check is for a machine with an NVIDIA GPU. To rehearse it "
            "here on the CPU, pass --allow-cpu (make gpu-check GPU_CHECK_ARGS=--allow-cpu): every part then runs on "
            "the CPU and every line it prints says so.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    work = args.output_dir.resolve() / NAME
    # This run's models, logs and TensorBoard runs only: a previous run's would be served or mixed in.
    for sub in ("models", "runs", "logs", "torch-rest", *(f"tf-standin-c{c}" for c in args.concurrency)):
        shutil.rmtree(work / sub, ignore_errors=True)
    try:
        torch_devices = run_child("probe-torch", work / "logs", [], {}, args.part_timeout)
    except PartFailed as exc:
        print(f"gpu-check: cannot tell which devices PyTorch sees: {exc}", file=sys.stderr)
        return 1
    if not torch_devices["cuda_available"]:
        if not args.allow_cpu:
            print(refusal(torch_devices), file=sys.stderr)
            return 2
        # Everything on the CPU, TensorFlow's parts included, whatever GPU it might see.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # The TF trainer and the stand-in take GPU memory as they need it, not all of it up front.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    check = GpuCheck(args, torch_devices)
    result = check.run()
    write_result(args.output_dir, NAME, result, summary_table(result, check.lines.tag))
    return 1 if result["problems"] else 0


def summary_table(result: dict[str, Any], tag: str) -> str:
    """The figures again, one line per target and level, each tagged like the lines before it."""
    rows = [f"{'target':<18}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}  batches"]
    for level in result.get("serve_torch", {}).get("levels", []):
        batches = level["batches"]
        rows.append(_row("torch-rest", level, f"{batches['mean_images_per_pass']} images/pass"))
    for level in result.get("serve_tf", {}).get("levels", []):
        per_batch = level["batches"]["mean_requests_per_batch"]
        for name, figures_ in level["targets"].items():
            rows.append(_row(name, figures_, f"{per_batch} requests/batch (both targets)"))
    devices = [f"{part}: {result[key]['device']}" for part, key in (("train torch", "train_torch"),
               ("train tf", "train_tf"), ("REST worker", "rest_worker_memory"), ("stand-in", "serve_tf"))
               if key in result and "device" in result[key]]
    rows.append("devices used: " + ("; ".join(devices) or "none"))
    rows.append(f"problems: {len(result['problems'])}; result: {NAME}.json")
    return "\n".join(f"{tag} {row}" for row in rows)


def _row(name: str, level: dict[str, Any], batches: str) -> str:
    latency = level["latency_ms"]
    return (f"{name:<18}{level['concurrency']:>6}{level['throughput_rps']:>10.0f}{latency['p50']:>9.2f}"
            f"{latency['p99']:>9.2f}{level['errors']:>8}  {batches}")


if __name__ == "__main__":
    raise SystemExit(main())
