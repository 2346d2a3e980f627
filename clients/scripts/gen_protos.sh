#!/usr/bin/env bash
# Regenerates mnist_client/protos/*_pb2.py (+ .pyi type stubs) from the .proto files beside them.
# Needs grpcio-tools (pinned in requirements/main.txt); the generated modules are committed so that
# installing the client never needs it. Run from anywhere: clients/scripts/gen_protos.sh [python]
set -euo pipefail
clients_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-${PYTHON:-python3}}"
# A relative interpreter path (.venv/bin/python) must survive the cd below.
if [[ "$python" == */* ]]; then python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"; fi
cd "$clients_dir"
"$python" -m grpc_tools.protoc \
  --proto_path=. \
  --python_out=. \
  --pyi_out=. \
  mnist_client/protos/*.proto
echo "generated: $(ls mnist_client/protos/*_pb2.py | tr '\n' ' ')"
