"""The example this project grew from: fit the exponent of a power function by gradient descent in both frameworks.

Data: ``points`` values of x evenly spaced in ``[x_min, x_max]`` (positive, so x**k is defined for any
real k), ``y = x**exponent`` plus optional Gaussian noise (seeded), float32, generated once with numpy
and handed to both frameworks. Model: ``y_hat = x**k`` with one trainable scalar ``k``. Loss: mean
squared error. Update: plain gradient descent, ``k <- k - lr * dloss/dk``, written out the same way
in both, from the same initial ``k``, for the same number of steps:

- PyTorch, eagerly: autograd records each step as it runs.
- TensorFlow, with ``tf.function``: the step is traced into a graph on its first call, then reused.

Each fit reports the recovered exponent, the steps, the wall time (including TensorFlow's one-off
trace; the first step's time is reported on its own), the final loss (at the recovered exponent)
and the loss before each step::

    python -m training.power_fit                          # both frameworks, the defaults shown by --help
    python -m training.power_fit --exponent 3 --noise 0.01 --json /tmp/power_fit.json

Library use (what ``make demo``'s report calls)::

    from training.power_fit import PowerFitConfig, render_html, run_power_fit
    report = run_power_fit(PowerFitConfig(exponent=2.5))
    report.fits[0].exponent, report.fits[1].loss_curve[:3]
    html_section = render_html(report)                   # a <section> with a loss chart per framework
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("power_fit")

FRAMEWORKS = ("pytorch", "tensorflow")


class FitDivergedError(RuntimeError):
    """The loss became infinite or NaN: the learning rate is too large for this data."""


@dataclass(frozen=True)
class PowerFitConfig:
    """What to fit and how; the same for both frameworks. Invalid values raise ``ValueError`` on creation."""

    exponent: float = 2.5  # the true k of y = x**k
    initial: float = 1.0  # the starting guess for k
    learning_rate: float = 0.05
    steps: int = 200
    points: int = 100
    x_min: float = 0.5
    x_max: float = 2.0
    noise: float = 0.0  # standard deviation of the Gaussian noise added to y
    seed: int = 0  # for the noise

    def __post_init__(self) -> None:
        problems = []
        for name in ("exponent", "initial", "learning_rate", "x_min", "x_max", "noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{name} {value!r}: expected a finite number")
        for name in ("steps", "points", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} {value!r}: expected an integer")
        if problems:
            raise ValueError("; ".join(problems))
        if self.learning_rate <= 0:
            problems.append(f"learning_rate {self.learning_rate}: expected a positive number")
        if self.steps < 1:
            problems.append(f"steps {self.steps}: expected at least 1")
        if self.points < 2:
            problems.append(f"points {self.points}: expected at least 2")
        if self.x_min <= 0:
            problems.append(f"x_min {self.x_min}: expected a positive number (x**k needs x > 0 for a real k)")
        if self.x_max <= self.x_min:
            problems.append(f"x_max {self.x_max}: expected more than x_min {self.x_min}")
        if self.noise < 0:
            problems.append(f"noise {self.noise}: expected 0 or a positive standard deviation")
        if problems:
            raise ValueError("; ".join(problems))

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) as float32 arrays of ``points`` values: y = x**exponent (+ noise)."""
        x = np.linspace(self.x_min, self.x_max, self.points, dtype=np.float64)
        y = x**self.exponent
        if self.noise:
            y = y + np.random.default_rng(self.seed).normal(0.0, self.noise, size=self.points)
        return x.astype(np.float32), y.astype(np.float32)


@dataclass(frozen=True)
class FitResult:
    """One framework's fit."""

    framework: str
    framework_version: str
    style: str  # how the step runs: "eager" or "tf.function"
    exponent: float  # the recovered k
    steps: int
    seconds: float  # wall time of all steps, TensorFlow's trace included
    first_step_seconds: float
    final_loss: float  # the loss at the recovered k
    loss_curve: list[float] = field(repr=False)  # the loss before each step


@dataclass(frozen=True)
class PowerFitReport:
    config: PowerFitConfig
    fits: list[FitResult]

    def fit(self, framework: str) -> FitResult:
        for result in self.fits:
            if result.framework == framework:
                return result
        raise KeyError(f"no {framework!r} fit in this report (have {[r.framework for r in self.fits]})")

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "fits": [asdict(result) for result in self.fits]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PowerFitReport:
        """Read back what :meth:`to_dict` (and ``--json``) wrote, e.g. from a subprocess that ran the fits."""
        try:
            return cls(PowerFitConfig(**data["config"]), [FitResult(**fit) for fit in data["fits"]])
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"not a power-fit report ({type(exc).__name__}: {exc}); expected what --json writes"
            ) from None


def _check_finite(framework: str, step: int, loss: float, config: PowerFitConfig) -> None:
    if not math.isfinite(loss):
        raise FitDivergedError(
            f"the {framework} fit diverged at step {step} (loss {loss}) with learning rate {config.learning_rate}; "
            f"use a smaller learning rate (or a narrower x range: x_max {config.x_max} makes x**k steep)"
        )


def fit_torch(config: PowerFitConfig) -> FitResult:
    """Gradient descent on k in eager PyTorch."""
    import torch

    x_np, y_np = config.data()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    k = torch.tensor(config.initial, dtype=torch.float32, requires_grad=True)
    losses: list[torch.Tensor] = []
    started = time.perf_counter()
    first_step = 0.0
    for step in range(config.steps):
        loss = torch.mean((x**k - y) ** 2)
        loss.backward()
        with torch.no_grad():
            k -= config.learning_rate * k.grad
        k.grad = None
        losses.append(loss.detach())
        if step == 0:
            first_step = time.perf_counter() - started
    seconds = time.perf_counter() - started
    with torch.no_grad():
        final_loss = float(torch.mean((x**k - y) ** 2))
    curve = [float(v) for v in torch.stack(losses)]
    _check_curve("pytorch", curve + [final_loss], config)
    exponent = float(k.detach())
    return FitResult(
        "pytorch", torch.__version__, "eager", exponent, config.steps, seconds, first_step, final_loss, curve
    )


def fit_tf(config: PowerFitConfig) -> FitResult:
    """Gradient descent on k in TensorFlow, the step compiled with ``tf.function``."""
    import tensorflow as tf

    x_np, y_np = config.data()
    x, y = tf.constant(x_np), tf.constant(y_np)
    k = tf.Variable(config.initial, dtype=tf.float32)
    learning_rate = tf.constant(config.learning_rate, dtype=tf.float32)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((tf.pow(x, k) - y) ** 2)
        k.assign_sub(learning_rate * tape.gradient(loss, k))
        return loss

    losses: list[tf.Tensor] = []
    started = time.perf_counter()
    first_step = 0.0
    for index in range(config.steps):
        losses.append(step())
        if index == 0:
            first_step = time.perf_counter() - started
    seconds = time.perf_counter() - started
    final_loss = float(tf.reduce_mean((tf.pow(x, k) - y) ** 2))
    curve = [float(v) for v in tf.stack(losses).numpy()]
    _check_curve("tensorflow", curve + [final_loss], config)
    return FitResult(
        "tensorflow", tf.__version__, "tf.function", float(k.numpy()), config.steps, seconds, first_step, final_loss,
        curve,
    )  # fmt: skip


def _check_curve(framework: str, curve: Sequence[float], config: PowerFitConfig) -> None:
    for step, loss in enumerate(curve):
        _check_finite(framework, step, loss, config)


FITTERS = {"pytorch": fit_torch, "tensorflow": fit_tf}


def run_power_fit(config: PowerFitConfig | None = None, frameworks: Sequence[str] = FRAMEWORKS) -> PowerFitReport:
    """Fit the exponent in each of ``frameworks`` (default both), same data, start, learning rate and steps."""
    config = config or PowerFitConfig()
    unknown = [name for name in frameworks if name not in FITTERS]
    if unknown or not frameworks:
        raise ValueError(f"frameworks {list(frameworks)}: expected one or more of {list(FRAMEWORKS)}")
    fits = []
    for name in frameworks:
        result = FITTERS[name](config)
        log.info(
            "%s (%s): exponent %.6f after %d steps in %.3f s (first step %.3f s), final loss %.3g",
            name, result.style, result.exponent, result.steps, result.seconds, result.first_step_seconds,
            result.final_loss,
        )  # fmt: skip
        fits.append(result)
    return PowerFitReport(config, fits)


# --- rendering ------------------------------------------------------------------------------------


def format_table(report: PowerFitReport) -> str:
    """A plain-text table: one row per framework."""
    c = report.config
    header = f"{'framework':<12}{'step runs':<13}{'exponent':>12}{'steps':>7}{'seconds':>10}{'first step s':>14}"
    header += f"{'final loss':>12}"
    title = f"fit y = x**k: true k {c.exponent:g}, start {c.initial:g}, learning rate {c.learning_rate:g}"
    rows = [title, header, "-" * len(header)]
    for r in report.fits:
        rows.append(
            f"{r.framework:<12}{r.style:<13}{r.exponent:>12.6f}{r.steps:>7}{r.seconds:>10.3f}"
            f"{r.first_step_seconds:>14.3f}{r.final_loss:>12.3g}"
        )
    return "\n".join(rows)


def render_html(report: PowerFitReport) -> str:
    """An HTML ``<section>``: the settings, a table of both fits, and an inline SVG loss chart per framework."""
    from mnist_client.loadtest.printers.charts import line_chart

    c = report.config
    settings = (
        f"y = x<sup>{c.exponent:g}</sup>{f' + N(0, {c.noise:g}²)' if c.noise else ''} on {c.points} points in "
        f"[{c.x_min:g}, {c.x_max:g}]; k starts at {c.initial:g}; plain gradient descent, learning rate "
        f"{c.learning_rate:g}, {c.steps} steps, mean squared error."
    )
    rows = "".join(
        f"<tr><td>{escape(r.framework)} {escape(r.framework_version)}</td><td>{escape(r.style)}</td>"
        f"<td>{r.exponent:.6f}</td><td>{r.steps}</td><td>{r.seconds * 1000:.1f}</td>"
        f"<td>{r.first_step_seconds * 1000:.1f}</td><td>{r.final_loss:.3g}</td></tr>"
        for r in report.fits
    )
    charts = "".join(
        line_chart(
            [(f"{r.framework} loss", list(enumerate(r.loss_curve)))],
            title=f"{r.framework} ({r.style}): loss per step",
            x_label="step",
            y_label="mean squared error",
        )
        for r in report.fits
    )
    return (
        '<section id="power-fit"><h2>Power-function fit: the exponent by gradient descent</h2>'
        f"<p>{settings} The time includes TensorFlow's one-off trace of the step (see the first step).</p>"
        "<table><thead><tr><th>framework</th><th>step runs</th><th>recovered exponent</th><th>steps</th>"
        "<th>time (ms)</th><th>first step (ms)</th><th>final loss</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{charts}</section>"
    )


# --- command line ---------------------------------------------------------------------------------


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    from training.cli import DefaultsHelpFormatter, non_negative_int, positive_float, positive_int

    defaults = PowerFitConfig()
    parser = argparse.ArgumentParser(
        prog="python -m training.power_fit",
        description="Fit the exponent k of y = x**k by gradient descent in PyTorch (eager) and "
        "TensorFlow (tf.function): same data, start, learning rate and steps.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--exponent", type=_finite, default=defaults.exponent, help="the true exponent k")
    parser.add_argument("--initial", type=_finite, default=defaults.initial, help="the starting guess for k")
    parser.add_argument("--lr", type=positive_float, default=defaults.learning_rate, help="learning rate")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="gradient-descent steps")
    parser.add_argument("--points", type=positive_int, default=defaults.points, help="data points (at least 2)")
    parser.add_argument("--x-min", type=positive_float, default=defaults.x_min, help="smallest x (positive)")
    parser.add_argument("--x-max", type=positive_float, default=defaults.x_max, help="largest x")
    parser.add_argument("--noise", type=_finite, default=defaults.noise, help="std of Gaussian noise added to y")
    parser.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="seed of the noise")
    parser.add_argument(
        "--framework", choices=FRAMEWORKS, action="append", default=None, help="fit in this one only (repeatable; "
        "default: both)"
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the report (loss curves included) here")
    parser.add_argument("--html", type=Path, default=None, help="also write an HTML page with the loss charts here")
    return parser


def main(argv: list[str] | None = None) -> PowerFitReport:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = PowerFitConfig(
            exponent=args.exponent, initial=args.initial, learning_rate=args.lr, steps=args.steps,
            points=args.points, x_min=args.x_min, x_max=args.x_max, noise=args.noise, seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        report = run_power_fit(config, args.framework or FRAMEWORKS)
    except FitDivergedError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.html:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        page = f'<!doctype html><html><head><meta charset="utf-8"><title>power fit</title></head><body>'
        args.html.write_text(page + render_html(report) + "</body></html>\n")
    return report


if __name__ == "__main__":
    main()
