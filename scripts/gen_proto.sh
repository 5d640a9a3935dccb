#!/usr/bin/env bash
# Regenerates the Python code of the contracts in proto/ into qianjiang/ (committed).
# tests/test_proto_generated.py fails if running this changes anything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${1:-.}
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/qianjiang/v1/*.proto
for d in "$out/qianjiang" "$out/qianjiang/v1"; do
  [ -f "$d/__init__.py" ] || printf '"""Generated from proto/ by scripts/gen_proto.sh; do not edit."""\n' > "$d/__init__.py"
done
