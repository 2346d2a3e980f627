"""Test certificates made with the openssl command line (no tests here; conftest's ``certs`` fixture uses it).

A CA, a server certificate for 127.0.0.1/localhost and a client certificate (clientAuth), both signed by
that CA, and a second, unrelated CA that must not verify them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")  # much faster to make than RSA
CERT_FILES = ("ca.pem", "other-ca.pem", "server.pem", "server.key", "client.pem", "client.key")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> dict[str, Path]:
    """Write the certificates and keys into ``directory``; returns the paths of CERT_FILES by name (valid 2 days)."""
    _openssl(
        "req",
        "-x509",
        *EC_KEY,
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mnist test CA",
        cwd=directory,
    )
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl(
            "req", *EC_KEY, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=directory,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=directory,
        )
    _openssl(
        "req",
        "-x509",
        *EC_KEY,
        "-nodes",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=another CA",
        cwd=directory,
    )
    return {name: directory / name for name in CERT_FILES}
