"""mnist-loadtest's help: every option explained with a meaningful default, examples and the exit status
that main() really returns, and -v accepted before or after the subcommand."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from mnist_client.loadtest.cli import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    main,
)

COMMANDS = ("run", "merge", "compare")
# An option line of argparse's help: two spaces, the option strings and metavars, then the help text
# after two or more spaces on the same line or on the next, more indented, lines.
_OPTION_START = re.compile(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$")
_CONTINUATION = re.compile(r"^ {3,}(\S.*)$")


def help_text(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """{option invocation: its help text} for every option line in ``text`` (the epilog is left out)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("\nexample", 1)[0].splitlines():
        start = _OPTION_START.match(line)
        if start:
            current = start.group(1).strip()
            entries[current] = start.group(2) or ""
            continue
        more = _CONTINUATION.match(line)
        if more and current is not None:
            entries[current] = f"{entries[current]} {more.group(1)}".strip()
        else:
            current = None
    return entries


def takes_a_value(invocation: str) -> bool:
    """``--rate R[,R...]`` takes a value; ``-v, --verbose`` and ``--no-progress`` are flags."""
    return any(not token.startswith("-") for token in invocation.replace(",", " ").split())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_a_meaningful_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(command, capsys=capsys)
    for placeholder in ("(default: None)", "(default: [])", "(default: False)", "(default: True)"):
        assert placeholder not in text
    entries = option_entries(text)
    assert "-h, --help" in entries and "-v, --verbose" in entries
    usage = text.split("\n\n", 1)[0]
    in_usage = set(re.findall(r"[\[| ](--?[a-z][\w-]*)", usage))
    listed = {token for invocation in entries for token in invocation.replace(",", " ").split()}
    assert len(in_usage) > 5 and in_usage <= listed, f"options without an entry: {in_usage - listed}"
    for invocation, explanation in entries.items():
        assert explanation, f"{command}: {invocation} has no help"
        if takes_a_value(invocation):
            assert "default" in explanation, f"{command}: {invocation} does not say what happens without it"


def test_run_help_shows_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    entries = option_entries(help_text("run", capsys=capsys))
    assert entries["--images-per-request K"].startswith("MNIST images in each request")
    assert entries["--images-per-request K"].endswith("(default: 1)")
    assert entries["--concurrency N[,N...]"].endswith("(default: 1)")
    assert entries["--max-in-flight N"].endswith("(default: 256)")
    assert entries["--rest-format {json,npy}"].endswith("(default: json)")
    assert entries["--max-p99-ms MS"].endswith("(default: no limit)")
    assert entries["--json FILE"].endswith("(default: not written)")
    assert "$MNIST_DATA_DIR" in entries["--data-dir DIR"]


def test_compare_positionals_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("compare", capsys=capsys)
    assert re.search(r"^  baseline\s{2,}result file of the reference run", text, re.M)
    assert re.search(r"^  candidate\s{2,}result file of the run to judge", text, re.M)


def test_run_help_ends_with_examples_and_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text("run", capsys=capsys)
    examples = text.index("\nexamples:\n")
    status = text.index("\nexit status:\n")
    assert examples < status
    commands = [line.strip() for line in text[examples:status].splitlines() if line.startswith("  mnist-loadtest")]
    assert len(commands) >= 3 and all(c.startswith("mnist-loadtest run --") for c in commands)
    for command in commands:  # each example parses as given
        build_parser().parse_args(command.split()[1:])
    listed = [int(m.group(1)) for m in re.finditer(r"^  (\d+)\s", text[status:], re.M)]
    assert listed == [EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR, EXIT_INTERRUPTED] == [0, 1, 2, 3, 130]
    assert text.rstrip().endswith("a second one aborts at once")


@pytest.mark.parametrize("command", ["merge", "compare"])
def test_merge_and_compare_help_give_an_example_and_the_exit_status(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(command, capsys=capsys)
    example = next(line.strip() for line in text.splitlines() if line.startswith(f"  mnist-loadtest {command} "))
    build_parser().parse_args(example.split()[1:])
    assert "exit status: 0 " in text and "1 a " in text and "3 a result file cannot be used" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_verbose_before_or_after_the_subcommand(command: str) -> None:
    needed = {"run": [], "merge": ["r.json"], "compare": ["a.json", "b.json"]}[command]
    parser = build_parser()
    assert parser.parse_args([command, *needed]).verbose is False
    assert parser.parse_args(["-v", command, *needed]).verbose is True
    assert parser.parse_args([command, "-v", *needed]).verbose is True
    assert parser.parse_args([command, *needed, "--verbose"]).verbose is True
    assert parser.parse_args(["--verbose", command, *needed, "-v"]).verbose is True


def test_run_with_v_after_the_subcommand_reaches_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    # Accepted by the parser (was: "unrecognized arguments: -v"), so the run's own check answers.
    assert main(["run", "-v"], out=io.StringIO()) == EXIT_USAGE
    assert "mnist-loadtest run: error: no target given" in capsys.readouterr().err


def test_bad_option_is_the_usage_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "--concurency", "4"])
    assert exc.value.code == EXIT_USAGE
    assert "unrecognized arguments: --concurency" in capsys.readouterr().err


def test_missing_mnist_files_are_the_error_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path))  # an empty folder
    code = main(["run", "--rest", "http://127.0.0.1:9", "--requests", "1", "--no-progress"], out=io.StringIO())
    assert code == EXIT_ERROR
    assert "t10k-images-idx3-ubyte.gz: file not found" in capsys.readouterr().err
