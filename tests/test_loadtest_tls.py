"""The load tester against secured servers: https with a CA bundle or --insecure, a bearer token from
an option, a file or the environment, gRPC over mutual TLS.

The real servers: the PyTorch REST server as `make serve` starts it (nginx serving HTTPS in front of
gunicorn; the app requiring a token) and the TF Serving stand-in with an SSLConfig that requires a
client certificate. Certificates come from the ``certs`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnist_client import contract
from mnist_client.loadtest.cli import EXIT_ERROR, EXIT_OK, INSECURE_WARNING, main
from mnist_client.loadtest import load_report
from mnist_client.loadtest.config import LoadTestConfig, parse_target
from mnist_client.loadtest.errors import ConfigError
from mnist_client.loadtest.security import TOKEN_ENV, Security, resolve_token
from serving.tfs_standin.flags import ServerOptions
from serving.tfs_standin.server import ModelServer
from serving.torch_server.config import ConfigError as ServerConfigError
from serving.torch_server.proxy import find_nginx
from stack.config import free_port_config
from stack.servers import running_server

TOKEN = "s3cret-t0ken"
DISTINCT = 100


def _nginx_missing() -> str:
    try:
        find_nginx()
    except ServerConfigError as exc:
        return f"{exc} (.ci/run installs it)"
    return ""


# -- settings ---------------------------------------------------------------------------------------


def test_tls_targets_are_named_by_their_scheme() -> None:
    rest = parse_target("torch=https://example.org", "rest")
    assert (rest.tls, rest.host, rest.port) == (True, "example.org", 443)
    grpc_target = parse_target("tf=grpcs://10.0.0.1:8500", "grpc")
    assert (grpc_target.tls, grpc_target.grpc_target, grpc_target.port) == (True, "10.0.0.1:8500", 8500)
    assert not parse_target("http://127.0.0.1:8080", "rest").tls and not parse_target("h:1", "grpc").tls


def test_security_settings_are_checked(tmp_path: Path) -> None:
    pem = tmp_path / "a.pem"
    pem.write_text("x")
    with pytest.raises(ConfigError, match="client_cert and client_key go together"):
        Security(client_cert=pem)
    with pytest.raises(ConfigError, match=r"ca_file '.*missing.pem' is not a readable file"):
        Security(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="insecure skips verifying the server"):
        Security(ca_file=pem, insecure=True)
    with pytest.raises(ConfigError, match="line break"):
        Security(token="a\nb")
    with pytest.raises(ConfigError, match="gRPC over TLS always verifies"):
        LoadTestConfig(targets=(parse_target("grpcs://h:1", "grpc"),), security=Security(insecure=True))


def test_the_token_comes_from_the_option_then_the_file_then_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\nsecond line ignored\n")
    env = {TOKEN_ENV: "from-env"}
    assert resolve_token("from-option", token_file, env) == "from-option"
    assert resolve_token(None, token_file, env) == "from-file"
    assert resolve_token(None, None, env) == "from-env"
    assert resolve_token(None, None, {}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty; expected the token on its first line"):
        resolve_token(None, tmp_path / "empty", {})


def test_the_token_never_reaches_the_report() -> None:
    config = LoadTestConfig(targets=(parse_target("https://h", "rest"),), security=Security(token=TOKEN))
    assert TOKEN not in json.dumps(config.to_dict()) and TOKEN not in repr(config)
    assert config.to_dict()["security"]["token"] == "set"


# -- real servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def https_rest_url(model_repo: Path, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                   ) -> Iterator[str]:
    """The PyTorch REST server as make serve starts it, with HTTPS (at nginx) and a required token."""
    missing = _nginx_missing()
    if missing:
        pytest.skip(missing)
    folder = tmp_path_factory.mktemp("tls-stack")
    config = free_port_config(model_repo, folder)
    env = {"MNIST_REST_TLS_CERT": str(certs["server.pem"]), "MNIST_REST_TLS_KEY": str(certs["server.key"]),
           "MNIST_REST_AUTH_TOKEN": TOKEN, "MNIST_REST_WORKERS": "1"}
    # Ready once /readyz (open without the token) answers over HTTPS, verified with the test CA.
    with running_server(config, "torch", env=env, ca_file=certs["ca.pem"]) as server:
        assert server.rest_url == f"https://127.0.0.1:{config.rest_port}"
        yield server.rest_url


@pytest.fixture(scope="module")
def mtls_grpc_target(model_repo: Path, certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                     ) -> Iterator[str]:
    """The stand-in over TLS, requiring a client certificate signed by the test CA."""
    ssl_config = tmp_path_factory.mktemp("standin-tls") / "ssl_config.txt"
    ssl_config.write_text(
        f"server_key: {json.dumps(certs['server.key'].read_text())}\n"
        f"server_cert: {json.dumps(certs['server.pem'].read_text())}\n"
        f"custom_ca: {json.dumps(certs['ca.pem'].read_text())}\n"
        "client_verify: true\n"
    )
    base = model_repo / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME
    options = ServerOptions(port=0, standin_host="127.0.0.1", model_name=contract.MODEL_NAME,
                            model_base_path=str(base), ssl_config_file=str(ssl_config))
    with ModelServer(options) as server:
        server.wait_until_available(timeout=120)
        yield f"grpcs://127.0.0.1:{server.port}"


def _run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["run", "--requests", "40", "--warmup", "2", "--concurrency", "2", "--distinct-images",
                 str(DISTINCT), "--no-progress", "--max-error-rate", "0", *args], out=out)
    return code, out.getvalue()


def test_both_servers_measured_with_tls_and_the_token(https_rest_url, mtls_grpc_target, certs, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, out = _run("--rest", f"torch={https_rest_url}", "--grpc", f"tf={mtls_grpc_target}",
                     "--ca-file", str(certs["ca.pem"]), "--client-cert", str(certs["client.pem"]),
                     "--client-key", str(certs["client.key"]), "--token-file", str(token_file),
                     "--json", str(tmp_path / "result.json"))
    assert code == EXIT_OK, out
    assert TOKEN not in (tmp_path / "result.json").read_text()
    measured = {m.target: m for m in load_report(tmp_path / "result.json").measurements}
    assert set(measured) == {"torch", "tf"}
    for m in measured.values():
        assert m.ok == 40 and not m.errors, m.errors


def test_the_token_from_the_environment_and_insecure_https(https_rest_url, monkeypatch, capsys):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    code, out = _run("--rest", https_rest_url, "--insecure")
    assert code == EXIT_OK, out
    assert INSECURE_WARNING in capsys.readouterr().err


def test_a_missing_token_or_an_unknown_ca_is_named(https_rest_url, certs, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    code, _ = _run("--rest", https_rest_url, "--ca-file", str(certs["ca.pem"]))
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "bearer token" in err, err
    code, _ = _run("--rest", https_rest_url, "--ca-file", str(certs["other-ca.pem"]), "--token", TOKEN)
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "certificate" in err.lower(), err
