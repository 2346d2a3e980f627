"""The two trainers are mirrors: the same flags, defaults, --quick and checks, and the same skeleton."""

from __future__ import annotations

import argparse

import pytest

from training import train_tf, train_torch

TRAINERS = {"pytorch": train_torch, "tensorflow": train_tf}
# The functions each trainer is built from, pytorch/examples style.
SKELETON = ("build_parser", "parse_args", "train_step", "train_epoch", "evaluate", "main")


def options(parser: argparse.ArgumentParser) -> list[tuple[str, object]]:
    """(flag, default) for every option, in the order --help lists them."""
    return [(action.option_strings[-1], action.default) for action in parser._actions if action.option_strings]


def test_both_trainers_take_the_same_flags_with_the_same_defaults() -> None:
    torch_flags, tf_flags = options(train_torch.build_parser()), options(train_tf.build_parser())
    assert torch_flags == tf_flags
    expected = {"--epochs", "--batch-size", "--lr", "--optimizer", "--momentum", "--seed", "--device", "--num-threads",
                "--data-dir", "--output-dir", "--log-dir", "--run-name", "--log-interval", "--version", "--quick",
                "--skip-if-exists"}  # fmt: skip
    assert {flag for flag, _ in torch_flags} == expected | {"--help"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--quick"],
        ["--quick", "--batch-size", "32"],
        ["--quick", "--epochs", "2"],
        [],
        ["--optimizer", "sgd", "--momentum", "0.5", "--device", "gpu:1", "--num-threads", "1", "--run-name", "r"],
    ],
)
def test_the_same_command_line_means_the_same_in_both(argv: list[str]) -> None:
    assert vars(train_torch.parse_args(argv)) == vars(train_tf.parse_args(argv))


def test_quick_is_the_same_in_both() -> None:
    for trainer in TRAINERS.values():
        args = trainer.parse_args(["--quick"])
        assert (args.epochs, args.batch_size) == (1, 64)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-threads", "-1"], "argument --num-threads: -1: expected 0 or a positive integer"),
        (["--num-threads", "two"], "argument --num-threads: 'two' is not an integer"),
        (["--log-interval", "-5"], "argument --log-interval: -5: expected 0 or a positive integer"),
        (["--device", "cpu:0"], "argument --device: 'cpu:0': expected auto, cpu, cuda or cuda:N"),
        (["--version", "0"], "argument --version: 0: expected a positive integer"),
        (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only"),
    ],
)
def test_bad_flags_give_the_same_error_in_both(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, trainer in TRAINERS.items():
        with pytest.raises(SystemExit) as excinfo:
            trainer.parse_args(flags)
        assert excinfo.value.code == 2, name
        assert message in capsys.readouterr().err, name


def test_both_are_built_from_the_same_functions() -> None:
    for name, trainer in TRAINERS.items():
        missing = [function for function in SKELETON if not callable(getattr(trainer, function, None))]
        assert not missing, f"{name} lacks {missing}"
        assert isinstance(trainer.TensorBoardLog, type) and isinstance(trainer.EpochStats, type), name
