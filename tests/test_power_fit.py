"""The power-function fit: both frameworks recover a known exponent; bad settings are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import power_fit
from training.power_fit import FitDivergedError, PowerFitConfig, run_power_fit


@pytest.fixture(scope="module")
def default_report() -> power_fit.PowerFitReport:
    return run_power_fit(PowerFitConfig(exponent=2.5, initial=1.0, learning_rate=0.05, steps=200))


@pytest.mark.parametrize("framework", power_fit.FRAMEWORKS)
def test_each_framework_recovers_the_exponent(default_report: power_fit.PowerFitReport, framework: str) -> None:
    result = default_report.fit(framework)
    assert result.exponent == pytest.approx(2.5, abs=1e-3)
    assert result.steps == 200 and len(result.loss_curve) == 200
    assert result.final_loss < 1e-6 < result.loss_curve[0]
    assert result.seconds >= result.first_step_seconds > 0
    assert result.style == {"pytorch": "eager", "tensorflow": "tf.function"}[framework]


def test_both_start_from_the_same_loss_on_the_same_data(default_report: power_fit.PowerFitReport) -> None:
    torch_fit, tf_fit = default_report.fit("pytorch"), default_report.fit("tensorflow")
    # y = x**2.5 on 100 points in [0.5, 2], k = 1: the mean squared error of x against x**2.5.
    x = [0.5 + 1.5 * i / 99 for i in range(100)]
    expected = sum((v - v**2.5) ** 2 for v in x) / len(x)
    assert torch_fit.loss_curve[0] == pytest.approx(expected, rel=1e-5)
    assert tf_fit.loss_curve[0] == pytest.approx(expected, rel=1e-5)


def test_a_noisy_fractional_exponent_from_above(tmp_path: Path) -> None:
    config = PowerFitConfig(exponent=0.5, initial=2.0, noise=0.01, seed=3, steps=300)
    report = run_power_fit(config)
    for result in report.fits:
        assert result.exponent == pytest.approx(0.5, abs=0.01)  # the noise moves the optimum a little
    assert report.fits[0].exponent == pytest.approx(report.fits[1].exponent, abs=1e-4)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"learning_rate": 0.0}, "learning_rate 0.0: expected a positive number"),
        ({"steps": 0}, "steps 0: expected at least 1"),
        ({"points": 1}, "points 1: expected at least 2"),
        ({"x_min": -1.0}, r"x_min -1.0: expected a positive number \(x\*\*k needs x > 0"),
        ({"x_min": 2.0, "x_max": 1.0}, "x_max 1.0: expected more than x_min 2.0"),
        ({"noise": -0.1}, "noise -0.1: expected 0 or a positive standard deviation"),
        ({"exponent": float("nan")}, "exponent nan: expected a finite number"),
        ({"steps": 2.5}, "steps 2.5: expected an integer"),
    ],
)
def test_bad_settings_are_clear_errors(changes: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PowerFitConfig(**changes)


@pytest.mark.parametrize("framework", power_fit.FRAMEWORKS)
def test_a_diverging_fit_says_so(framework: str) -> None:
    with pytest.raises(FitDivergedError, match=f"the {framework} fit diverged at step .* learning rate 5"):
        run_power_fit(PowerFitConfig(learning_rate=5.0, steps=20), [framework])


def test_unknown_framework_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"frameworks \['jax'\]: expected one or more of \['pytorch', 'tensorflow'\]"):
        run_power_fit(PowerFitConfig(), ["jax"])


def test_command_line_writes_json_and_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_html = tmp_path / "fit.json", tmp_path / "fit.html"
    power_fit.main(["--exponent", "3", "--lr", "0.02", "--steps", "300", "--json", str(out_json),
                    "--html", str(out_html)])  # fmt: skip
    table = capsys.readouterr().out
    assert "true k 3" in table and "pytorch" in table and "tensorflow" in table
    data = json.loads(out_json.read_text())
    assert data["config"]["exponent"] == 3.0 and data["config"]["steps"] == 300
    assert [fit["framework"] for fit in data["fits"]] == ["pytorch", "tensorflow"]
    for fit in data["fits"]:
        assert fit["exponent"] == pytest.approx(3.0, abs=1e-3) and len(fit["loss_curve"]) == 300
    page = out_html.read_text()
    assert page.count("<svg") == 2 and "pytorch (eager): loss per step" in page
    assert "tensorflow (tf.function): loss per step" in page


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        power_fit.main(["--help"])
    assert excinfo.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("the true exponent k (default: 2.5)", "learning rate (default: 0.05)",
                     "gradient-descent steps (default: 200)", "--json JSON"):  # fmt: skip
        assert expected in text
    assert "default: None" not in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "argument --steps: 0: expected a positive integer"),
        (["--lr", "-1"], "argument --lr: -1: expected a positive number"),
        (["--exponent", "two"], "argument --exponent: 'two' is not a number"),
        (["--x-min", "2", "--x-max", "1"], "x_max 1.0: expected more than x_min 2.0"),
        (["--points", "1"], "points 1: expected at least 2"),
        (["--framework", "jax"], "argument --framework: invalid choice: 'jax'"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        power_fit.main(flags)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_divergence_on_the_command_line_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        power_fit.main(["--lr", "5", "--steps", "20", "--framework", "pytorch"])
    assert excinfo.value.code == 1
    assert "the pytorch fit diverged" in capsys.readouterr().err
