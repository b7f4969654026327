#!/usr/bin/env bash
# Generate the Python code of the gRPC protocol from src/tidegate/proto/*.proto.
#
# Usage: scripts/gen_proto.sh [OUT_ROOT]    (`make proto` runs it; from any directory)
#
# OUT_ROOT (relative to the repository's root) defaults to src: the modules land beside
# the .proto files, in src/tidegate/proto/, and are committed. Another root gets the
# same files under OUT_ROOT/tidegate/proto/ (tests/test_proto.py does that, to check
# that the committed ones are up to date). The interpreter is $PYTHON, else
# .venv/bin/python; it needs the test extra (`make install-test`): grpcio-tools, whose
# protoc makes the messages (*_pb2.py, *_pb2.pyi) and the service (*_pb2_grpc.py), and
# mypy-protobuf, whose plugin types the service (*_pb2_grpc.pyi). At their pinned
# versions they make the same bytes every time. protobuf at run time must be of the
# major of grpcio-tools' protoc and no older (pyproject.toml's range says so).
#
# `-I src` names the files tidegate/proto/*.proto, so the generated imports are
# `from tidegate.proto import ...`. Afterwards each *_pb2.py is changed in two lines
# to register its descriptors in tidegate.proto.POOL instead of protobuf's default
# pool (why: see src/tidegate/proto/__init__.py); the script fails if protoc's output
# no longer has the lines it changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${1:-src}"
PROTOS=(tidegate/proto/model_config.proto tidegate/proto/grpc_service.proto)
# mypy-protobuf's plugin, where that interpreter's environment installs its commands.
BIN="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
PLUGIN="$BIN/protoc-gen-mypy_grpc"

mkdir -p "$OUT/tidegate/proto"
"$PYTHON" -m grpc_tools.protoc -I src --python_out="$OUT" --pyi_out="$OUT" \
    "${PROTOS[@]/#/src/}"
"$PYTHON" -m grpc_tools.protoc -I src --grpc_python_out="$OUT" \
    --plugin=protoc-gen-mypy_grpc="$PLUGIN" --mypy_grpc_out="$OUT" \
    src/tidegate/proto/grpc_service.proto

IMPORT_PROTOC='from google\.protobuf import descriptor_pool as _descriptor_pool'
IMPORT_OURS='from tidegate.proto import POOL as _POOL'
ADD_PROTOC='DESCRIPTOR = _descriptor_pool\.Default()\.AddSerializedFile('
ADD_OURS='DESCRIPTOR = _POOL.AddSerializedFile('
for proto in "${PROTOS[@]}"; do
    module="$OUT/${proto%.proto}_pb2.py"
    sed -i -e "s/^$IMPORT_PROTOC\$/$IMPORT_OURS/" -e "s/^$ADD_PROTOC/$ADD_OURS/" "$module"
    if grep -q "_descriptor_pool" "$module" \
        || [ "$(grep -c "^DESCRIPTOR = _POOL\.AddSerializedFile(" "$module")" != 1 ]; then
        echo "gen_proto: $module: protoc's output changed; update this script's edit" >&2
        exit 1
    fi
done
