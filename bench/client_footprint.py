"""Footprint of the client package: install size in a fresh virtualenv, and import time.

Install size: ``pip install ./clients`` into a new venv, then the growth of its site-packages (total and
per top-level package). Import time: wall time of ``python -c "import ..."`` minus that of
``python -c pass``, median of ``--repeats`` runs, for the client modules (in the fresh venv when one was
made, so nothing but the client's own dependencies is importable) and, for comparison, for the official
``tensorflow_serving.apis`` stubs (in the project venv).

    python -m bench.client_footprint [--no-install] [--repeats 7] [--output-dir bench/results]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

log = logging.getLogger("bench.client_footprint")

REPO_ROOT = Path(__file__).resolve().parent.parent
CLIENT_IMPORTS = {
    "mnist_client": "import mnist_client",
    "mnist_client.rest": "from mnist_client.rest import RestClient",
    "mnist_client.grpc_client": "from mnist_client.grpc_client import GrpcClient",
    "both clients": "from mnist_client import RestClient, GrpcClient; RestClient; GrpcClient",
}
OFFICIAL_IMPORT = {
    "tensorflow_serving.apis (official stubs)": (
        "from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc"
    ),
}


def _du_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def measure_install(workdir: Path) -> tuple[dict, Path]:
    """Create a venv, install ./clients into it, return (figures, venv python)."""
    env_dir = workdir / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    before = {entry.name: _du_bytes(entry) if entry.is_dir() else entry.stat().st_size for entry in purelib.iterdir()}
    started = time.monotonic()
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO_ROOT / "clients")],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    added: dict[str, int] = {}
    for entry in purelib.iterdir():
        if entry.name in before:
            continue
        size = _du_bytes(entry) if entry.is_dir() else entry.stat().st_size
        top = entry.name.split("-")[0].split(".")[0] if entry.name.endswith((".dist-info", ".libs")) else entry.name
        added[top] = added.get(top, 0) + size
    packages = subprocess.check_output([python, "-m", "pip", "list", "--format=freeze"], text=True).split()
    return {
        "site_packages_added_bytes": sum(added.values()),
        "by_package_bytes": dict(sorted(added.items(), key=lambda kv: -kv[1])),
        "installed": [p for p in packages if not p.startswith(("pip==", "setuptools=="))],
        "pip_install_seconds": round(seconds, 1),
    }, python


def _timed_run(python: Path | str, code: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one ``python -c code`` child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([str(python), "-c", code], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure_imports(python: Path | str, statements: dict[str, str], repeats: int, env: dict[str, str]) -> dict:
    """Median wall and CPU milliseconds of each import, minus those of a bare interpreter start.

    CPU time is reported beside wall time because it is far less disturbed by other load on the machine.
    """
    base_runs = [_timed_run(python, "pass", env) for _ in range(repeats)]
    base_wall = statistics.median(run[0] for run in base_runs)
    base_cpu = statistics.median(run[1] for run in base_runs)
    figures: dict = {"interpreter_start": {"wall_ms": round(base_wall * 1e3, 1), "cpu_ms": round(base_cpu * 1e3, 1)}}
    for label, code in statements.items():
        runs = [_timed_run(python, code, env) for _ in range(repeats)]
        figures[label] = {
            "wall_ms": round((statistics.median(run[0] for run in runs) - base_wall) * 1e3, 1),
            "cpu_ms": round((statistics.median(run[1] for run in runs) - base_cpu) * 1e3, 1),
        }
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--models-dir", type=Path, help="unused (accepted for bench.run_all)")
    parser.add_argument("--repeats", type=int, default=7, help="runs per import measurement (median)")
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="skip the fresh-venv install; time imports in this interpreter with PYTHONPATH=clients",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats is {args.repeats}; expected at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean_env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    result: dict = {
        "python": sys.version.split()[0],
        "platform": sysconfig.get_platform(),
        "repeats": args.repeats,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="client-footprint-") as tmp:
        if args.no_install:
            client_python: Path | str = sys.executable
            client_env = dict(clean_env, PYTHONPATH=str(REPO_ROOT / "clients"))
            result["client_imports_in"] = "this interpreter, PYTHONPATH=clients"
        else:
            log.info("installing ./clients into a fresh venv (uses the configured package index)")
            result["install"], client_python = measure_install(Path(tmp))
            client_env = clean_env
            result["client_imports_in"] = "fresh venv with only the client and its dependencies"
        result["import_ms"] = measure_imports(client_python, CLIENT_IMPORTS, args.repeats, client_env)
        result["import_ms"].update(
            {
                label: figures
                for label, figures in measure_imports(sys.executable, OFFICIAL_IMPORT, args.repeats, clean_env).items()
                if label != "interpreter_start"
            }
        )

    lines = []
    if "install" in result:
        install = result["install"]
        lines.append(f"install: {install['site_packages_added_bytes'] / 2**20:.1f} MiB added to site-packages")
        for name, size in install["by_package_bytes"].items():
            if size >= 2**18:
                lines.append(f"  {name:<28} {size / 2**20:8.1f} MiB")
    start = result["import_ms"]["interpreter_start"]
    lines.append(
        f"import time, median of {args.repeats}, minus a bare interpreter start "
        f"({start['wall_ms']} ms wall, {start['cpu_ms']} ms CPU); load average {os.getloadavg()[0]:.1f}"
    )
    lines.append(f"  {'import':<42} {'wall ms':>8} {'CPU ms':>8}")
    for label, figures in result["import_ms"].items():
        if label != "interpreter_start":
            lines.append(f"  {label:<42} {figures['wall_ms']:8.1f} {figures['cpu_ms']:8.1f}")
    print("\n".join(lines))

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "client_footprint.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
