"""What the two trainers' command lines share: the recipe's flags, their checks, argument types, --help.

Both trainers take the same recipe (training/recipe.py), so its flags are declared and checked once
here; each trainer adds the flags that are its own (devices, threads, distribution, paths).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from training import recipe


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


def quick_requested(argv: Sequence[str] | None) -> bool:
    """Whether --quick is among ``argv``, before the full parse (it changes other flags' defaults)."""
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument("--quick", action="store_true")
    return bool(quick.parse_known_args(argv)[0].quick)
