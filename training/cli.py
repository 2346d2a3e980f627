"""The two trainers' command line, declared once: the same flags with the same meaning in both.

Both trainers take the same recipe (training/recipe.py) and the same flags, in the same order, with
the same checks and the same ``--quick``; only the help text says where a framework differs (what
``--device auto`` picks, how ``--num-threads 0`` is shared out). Each trainer's ``build_parser``
calls :func:`add_trainer_arguments`, its ``parse_args`` calls :func:`parse_trainer_args`, and its
``main`` calls :func:`check_before_training` before it loads anything.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from mnist_client import contract
from serving.model_repository import list_versions, model_base_path
from training import recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE_PATTERN = re.compile(r"(?:(auto|cpu)|(cuda|gpu)(?::(\d+))?)")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except for on/off flags and ``None`` ones whose help text explains the default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected 0 or a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text}: expected a positive number")
    return value


def device_spec(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``gpu`` and ``gpu:N`` are aliases of the cuda forms."""
    match = DEVICE_PATTERN.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto, cpu, cuda or cuda:N (gpu, gpu:N: the same)")
    plain, _, index = match.groups()
    if plain:
        return plain
    return "cuda" if index is None else f"cuda:{int(index)}"


def add_recipe_arguments(parser: argparse.ArgumentParser, *, batch_size_help: str) -> None:
    """--epochs, --batch-size, --lr, --optimizer and --momentum, with the shared recipe's defaults."""
    parser.add_argument(
        "--epochs", type=positive_int, default=recipe.DEFAULT_EPOCHS, help="passes over the training set"
    )
    parser.add_argument("--batch-size", type=positive_int, default=recipe.DEFAULT_BATCH_SIZE, help=batch_size_help)
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="peak learning rate of the one-cycle schedule (default: "
        + ", ".join(f"{lr:g} for {name}" for name, lr in recipe.DEFAULT_LR.items())
        + ")",
    )
    parser.add_argument(
        "--optimizer", choices=tuple(recipe.DEFAULT_LR), default="adam", help="adam, or sgd with momentum"
    )
    parser.add_argument("--momentum", type=float, default=0.9, help="momentum for --optimizer sgd only")


def check_recipe_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a momentum the optimizer cannot use; fill in the optimizer's default peak learning rate."""
    if args.optimizer == "adam" and args.momentum != parser.get_default("momentum"):
        parser.error("--momentum applies to --optimizer sgd only")
    if not 0.0 <= args.momentum < 1.0:
        parser.error(f"--momentum {args.momentum}: expected a value in [0, 1)")
    if args.lr is None:
        args.lr = recipe.DEFAULT_LR[args.optimizer]


def add_trainer_arguments(
    parser: argparse.ArgumentParser,
    *,
    framework_dir: str,
    replica: str,
    device_help: str,
    threads_help: str,
) -> None:
    """Every flag of both trainers, in one order. ``replica`` names the unit of --batch-size (process, replica)."""
    add_recipe_arguments(parser, batch_size_help=f"images per step and {replica}")
    parser.add_argument("--seed", type=int, default=1, help="random seed (initial weights, shuffling, dropout)")
    parser.add_argument("--device", type=device_spec, default="auto", help=device_help)
    parser.add_argument(
        "--num-threads", type=non_negative_int, default=0, help=f"CPU threads per process; 0: {threads_help}"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the four MNIST .gz files (default: $MNIST_DATA_DIR, else ../shared/data/mnist "
        "if present, else downloaded into $MNIST_CACHE_DIR)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=REPO_ROOT / "models",
        help=f"model repository root; the export goes to <output-dir>/{framework_dir}/{contract.MODEL_NAME}/<version>",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=REPO_ROOT / "runs",
        help=f"TensorBoard root; this run logs to <log-dir>/{framework_dir}/<run-name>",
    )
    parser.add_argument(
        "--run-name",
        default=None,
        help=f"TensorBoard run folder (default: <date>-<optimizer>-lr<lr>-bs<batch>x<{replica}s>[-quick])",
    )
    parser.add_argument(
        "--log-interval",
        type=non_negative_int,
        default=100,
        help="log the running loss every N steps when no progress bar is shown (output not a terminal); "
        "0: per epoch only",
    )
    parser.add_argument(
        "--version", type=positive_int, default=None, help="version to export (default: next free)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"train on the first {recipe.QUICK_TRAIN_EXAMPLES} training images, evaluate and export on the first "
        f"{recipe.QUICK_TEST_EXAMPLES} test images; changes the defaults of --epochs to "
        f"{recipe.QUICK_DEFAULTS['epochs']} and --batch-size to {recipe.QUICK_DEFAULTS['batch_size']} "
        "(seconds; for tests and smoke checks)",
    )
    parser.add_argument(
        "--skip-if-exists",
        action="store_true",
        help="do nothing if the model is already exported (the given --version, or any version)",
    )


def parse_trainer_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with --quick's defaults applied first, then check the recipe's flags."""
    if quick_requested(argv):
        parser.set_defaults(**recipe.QUICK_DEFAULTS)  # defaults only: values given explicitly still win
    args = parser.parse_args(argv)
    check_recipe_arguments(parser, args)
    return args


def check_before_training(
    parser: argparse.ArgumentParser, args: argparse.Namespace, framework_dir: str
) -> Path | None:
    """The checks that look at the disk, made before anything is loaded (exit status 2 on failure).

    Returns the exported version that ``--skip-if-exists`` finds (the given ``--version``, else the
    latest), or ``None`` when there is nothing to skip for; refuses an existing ``--version`` without
    ``--skip-if-exists`` (versions are immutable) and a ``--data-dir`` that is not a folder.
    """
    base = model_base_path(args.output_dir, framework_dir, contract.MODEL_NAME)
    versions = list_versions(base)
    if args.version is None:
        existing = base / str(versions[-1]) if versions else None
    else:
        existing = base / str(args.version) if args.version in versions else None
    if existing is not None and args.skip_if_exists:
        return existing
    if existing is not None and args.version is not None:
        parser.error(
            f"--version {args.version}: {existing} already exists and versions are immutable; "
            "pass another --version, omit it for the next free one, or add --skip-if-exists"
        )
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a directory (expected the folder with the four MNIST .gz files)")
    return None


def default_run_name(args: argparse.Namespace, replicas: int) -> str:
    """``<date>-<optimizer>-lr<lr>-bs<batch>x<replicas>[-quick]``, unless --run-name names the run."""
    if args.run_name:
        return str(args.run_name)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{args.optimizer}-lr{args.lr:g}-bs{args.batch_size}x{replicas}{'-quick' if args.quick else ''}"


def quick_requested(argv: Sequence[str] | None) -> bool:
    """Whether --quick is among ``argv``, before the full parse (it changes other flags' defaults)."""
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument("--quick", action="store_true")
    return bool(quick.parse_known_args(argv)[0].quick)
