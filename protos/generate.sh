#!/usr/bin/env bash
# Generates the Python protobuf + gRPC code and typed stubs of protos/ into embed_server/_proto/
# (gitignored, excluded from lint). Run from anywhere; deploy/native/setup.sh calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=embed_server/_proto
mkdir -p "$OUT"
rm -f "$OUT"/*_pb2*.py "$OUT"/*_pb2*.pyi
"$VENV/bin/python" -m grpc_tools.protoc -I protos \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  protos/userembed/v1/embedding_service.proto
# protoc mirrors the proto path (userembed/v1/...) and imports it absolutely
# ("from userembed.v1 import ..."), which would clash with the `userembed` package: flatten the
# files into embed_server/_proto and make the import relative.
mv "$OUT"/userembed/v1/embedding_service_pb2*.py* "$OUT"/
rm -rf "$OUT"/userembed
sed -i 's/^from userembed\.v1 import embedding_service_pb2/from . import embedding_service_pb2/' \
  "$OUT"/embedding_service_pb2_grpc.py
echo "protos: generated $(ls "$OUT"/*_pb2*.py* | wc -l) files in $OUT"
