"""Command-line flags and configuration files: TF Serving's syntax, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.tfs_standin import __main__ as cli
from serving.tfs_standin.config import ConfigError, load_batching_options, load_model_configs, load_tls_options
from serving.tfs_standin.flags import FlagError, ServerOptions, parse_flags

BASE = ["--model_base_path=/tmp/models/tf/mnist"]


def test_defaults_are_tensorflow_model_servers() -> None:
    options = parse_flags(BASE)
    assert (options.port, options.rest_api_port, options.model_name) == (8500, 0, "default")
    assert (options.file_system_poll_wait_seconds, options.max_num_load_retries) == (1, 5)
    assert (options.enable_batching, options.enable_model_warmup, options.saved_model_tags) == (False, True, "serve")


def test_both_flag_syntaxes_and_boolean_forms() -> None:
    options = parse_flags([
        "--port", "9000", "--model_name=mnist", "--model_base_path", "/m",
        "--enable_batching", "--enable_model_warmup=false", "--enable_serialization_as_tensor_content", "true",
        "--tensorflow_intra_op_parallelism=1", "--grpc_max_threads=8",
    ])  # fmt: skip
    assert options == ServerOptions(
        port=9000, model_name="mnist", model_base_path="/m", enable_batching=True, enable_model_warmup=False,
        enable_serialization_as_tensor_content=True, tensorflow_intra_op_parallelism=1, grpc_max_threads=8,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--monitoring_config_file=/etc/m.config"], "--monitoring_config_file is a tensorflow_model_server flag "
                                                     "the stand-in does not support: the stand-in serves no "
                                                     "Prometheus metrics"),
        (["--per_process_gpu_memory_fraction=0.5"], "does not support: the stand-in runs on CPU"),
        (["--rest_api_port=8500"], "--rest_api_port=8500 is the gRPC --port too"),
        (["--rest_api_port=65536"], "must be a TCP port"),
        (["--rest_api_num_threads=-1"], "must be at least 0"),
        (["--standin_rest_max_body_bytes=0"], "must be at least 1"),
        (["--rest_api_enable_cors_support"], "sends no CORS headers"),
        (["--modelbasepath=/m"], "unknown flag --modelbasepath"),
        (["--port=eighty"], "--port='eighty': expected an integer"),
        (["--port=70000"], "must be a TCP port"),
        (["--enable_batching=maybe"], "expected true or false"),
        (["--grpc_channel_arguments=grpc.max_receive_message_length"], "is not key=value"),
        (["--batching_parameters_file=/etc/b.txt"], "only read with --enable_batching=true"),
        (["--enable_batching", "--batching_parameters_file=/nope.txt"], "no such file"),
        (["--model_name"], "--model_name needs a value"),
        (["port=8500"], "flags look like --name=value"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(argv: list[str], fragment: str) -> None:
    with pytest.raises(FlagError) as caught:
        parse_flags(BASE + argv)
    assert fragment in str(caught.value)


def test_rest_api_flags_are_tensorflow_model_servers() -> None:
    options = parse_flags([*BASE, "--rest_api_port=8501", "--rest_api_num_threads=3", "--rest_api_timeout_in_ms=500"])
    assert (options.rest_api_port, options.rest_api_num_threads, options.rest_api_timeout_in_ms) == (8501, 3, 500)
    assert parse_flags(BASE).rest_api_timeout_in_ms == 30_000  # TF Serving's default


def test_a_model_is_required() -> None:
    with pytest.raises(FlagError, match="either --model_base_path .* or --model_config_file is required"):
        parse_flags(["--port=8500"])


def test_cli_exits_2_with_the_message_for_a_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*BASE, "--use_alts_credentials"]) == 2
    assert "error: --use_alts_credentials is a tensorflow_model_server flag" in capsys.readouterr().err


def test_cli_help_lists_supported_and_refused_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model_base_path", "--enable_batching", "--ssl_config_file", "--standin_shutdown_grace_seconds"):
        assert flag in text
    assert "refused" in text and "--monitoring_config_file" in text


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ('model_config_list { config { name: "m" base_path: "/m" model_platform: "pytorch" } }',
         "model_platform 'pytorch'; the stand-in serves 'tensorflow' SavedModels only"),
        ('model_config_list { config { name: "m" base_path: "/a" } config { name: "m" base_path: "/b" } }',
         "repeated: m"),
        ('model_config_list { config { name: "m" } }', "model 'm' has no base_path"),
        ("model_config_list { }", "has no models"),
        ('model_config_list { config { name: "m" base_path: "/m" unknown_field: 1 } }', "not a valid ModelServerConfig"),
    ],
)
def test_bad_model_config_files(tmp_path: Path, config: str, fragment: str) -> None:
    path = _write(tmp_path / "models.config", config)
    with pytest.raises(ConfigError) as caught:
        load_model_configs(ServerOptions(model_config_file=path))
    assert fragment in str(caught.value)


def test_relative_base_path_is_resolved_against_the_working_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    [model] = load_model_configs(ServerOptions(model_name="mnist", model_base_path="models/tf/mnist"))
    assert model.base_path == tmp_path / "models" / "tf" / "mnist"
    assert (model.policy.kind, model.policy.num_versions) == ("latest", 1)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_batch_size { value: 8 }\nenable_large_batch_splitting { value: true }", "not a valid BatchingParameters"),
        ("max_batch_size { value: 8 }\nallowed_batch_sizes: 4", "expected max_batch_size (8)"),
        ("batch_timeout_micros { value: -1 }", "batch_timeout_micros is -1"),
    ],
)
def test_bad_batching_parameter_files(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path / "batching.txt", text)
    with pytest.raises(ConfigError) as caught:
        load_batching_options(path)
    assert str(caught.value).startswith(path)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('server_cert: "-----BEGIN CERTIFICATE-----"', "server_key must hold the PEM text"),
        ('server_key: "-----BEGIN PRIVATE KEY-----"', "server_cert must hold the PEM text"),
        ('server_key: "-----BEGIN PRIVATE KEY-----" server_cert: "-----BEGIN CERTIFICATE-----" client_verify: true',
         "client_verify needs custom_ca"),
    ],
)
def test_bad_ssl_config_files(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_tls_options(_write(tmp_path / "ssl.config", text))


def test_session_config_file_is_the_base_and_parallelism_flags_override_it(tmp_path: Path) -> None:
    from serving.tfs_standin.core import session_options

    path = _write(tmp_path / "session.config", "intra_op_parallelism_threads: 4\n"
                                               "experimental { disable_thread_spinning: true }\n")
    options = parse_flags([*BASE, f"--tensorflow_session_config_file={path}", "--tensorflow_intra_op_parallelism=1"])
    config = session_options(options).config_proto()
    assert config.intra_op_parallelism_threads == 1
    assert config.experimental.disable_thread_spinning
    bad = _write(tmp_path / "bad.config", "intra_op_threads: 4\n")
    with pytest.raises(ConfigError, match="not a valid ConfigProto"):
        session_options(parse_flags([*BASE, f"--tensorflow_session_config_file={bad}"]))
