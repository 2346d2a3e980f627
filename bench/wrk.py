"""What the benches that drive wrk share."""

from __future__ import annotations

import argparse


def whole_seconds(text: str) -> int:
    """argparse type for a wrk run's ``--duration``: wrk's ``-d`` takes whole seconds.

    A fraction such as ``0.5`` would not be rounded by wrk; it ends in wrk's usage text, not a figure.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of seconds >= 1 (wrk's -d)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number of seconds >= 1 (wrk's -d)")
    return int(value)
