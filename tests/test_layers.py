"""The architecture, checked cheaply: which module may import what.

A module may import tidegate modules of its own layer or lower ones, and each
heavy third-party library stays in the one module that owns it. A module of a
subpackage is named by its dotted path below tidegate (`proto.model_config_pb2`),
the subpackage itself by its name (`proto`)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "tidegate"
LAYERS = {
    0: {
        "__init__",
        "errors",
        "config",
        "protocol",
        "stats",
        "kernels",
        "kernels_build",
        "kernel_backend",
        "histogram",
        "traffic",
        "audit",
        "state",
        "auth",
        "jsonlog",
        "pending",
        "eager",
        "busy_poll",
        "supervisor",
        "exposure",
        # HTTP/2 framing for the gRPC transport, on hpack alone.
        "http2",
        "http2_client",
        # The gRPC protocol's definitions: protoc's output and the pool it registers in.
        "proto",
        "proto.grpc_service_pb2",
        "proto.grpc_service_pb2_grpc",
        "proto.model_config_pb2",
    },
    1: {
        "codec",
        "runtime",
        "repository",
        "executor",
        "drift",
        "workload",
        "loadgen",
        "loadgen_grpc",
        "benchplot",
        "judge",
        "step_windows",
        "rollout",
        "requestlog",
        "peers",
        "metrics_merge",
        "grpc_codec",
        "grpc_wire",
    },
    2: {
        "batcher",
        "registry",
        "poller",
        "observer",
        "bench",
        "canary",
        "control",
        "reconcile",
        "serving",
    },
    3: {
        "infer",
        "v2",
        "app",
        "client",
        "metrics",
        "control_api",
        "access",
        "internal",
        "dashboard",
        "grpc_server",
        "fleet",
        "direct",
    },
    4: {
        "server",
        "connection",
        "cli",
        "cli_common",
        "cli_rollout",
        "cli_bench",
        "cli_fleet",
        "__main__",
        "worker",
    },
}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}
OWNERS = {
    "onnxruntime": {"runtime"},
    "starlette": {"v2", "app", "control_api", "internal", "dashboard"},
    # The workers' calls to each other over their private sockets.
    "httpx": {"peers"},
    "uvicorn": {"server", "connection", "direct"},
    "httptools": {"connection"},
    "click": {"cli", "cli_common", "cli_rollout", "cli_bench", "cli_fleet"},
    "rich": {"cli", "cli_common", "cli_rollout", "cli_bench", "cli_fleet"},
    # kernels_build runs in a subprocess: serving processes load its output, not numba.
    "numba": {"kernels", "kernels_build"},
    "llvmlite": set(),
    "prometheus_client": {"metrics", "metrics_merge"},
    "matplotlib": {"benchplot"},
    "orjson": {"codec", "infer", "v2", "workload", "bench", "requestlog"},
    # The gRPC transport: the generated protocol code, its server and its codec, and
    # the load generator's client.
    "grpc": {
        "proto.grpc_service_pb2_grpc",
        "grpc_server",
        "grpc_codec",
        "grpc_wire",
        "loadgen_grpc",
    },
    # HTTP/2 header compression, for the gRPC transport's own HTTP/2.
    "hpack": {"http2"},
    # google.protobuf, the messages' runtime.
    "google": {
        "proto",
        "proto.grpc_service_pb2",
        "proto.model_config_pb2",
        "grpc_server",
        "grpc_codec",
    },
    "grpc_health": {"grpc_server"},
    "grpc_reflection": {"grpc_server"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module.partition(".")[0] == "tidegate":
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _module(path: Path) -> str:
    """The module's name below tidegate: `codec`, `proto.model_config_pb2`, `proto`."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if len(parts) > 1 and parts[-1] == "__init__" else parts)


def _target(rest: str) -> str:
    """The module an import of `tidegate.REST` loads last: the longest prefix of REST
    that names a module, else the package's `__init__` (`tidegate.__version__`)."""
    parts = rest.split(".")
    prefixes = (".".join(parts[:end]) for end in range(len(parts), 0, -1))
    return next((name for name in prefixes if name in MODULE_NAMES), "__init__")


MODULES = sorted([*PACKAGE.glob("*.py"), *PACKAGE.glob("*/*.py")])
MODULE_NAMES = {_module(path) for path in MODULES}


def test_every_module_has_a_layer():
    assert MODULE_NAMES == set(LAYER_OF)


@pytest.mark.parametrize("path", MODULES, ids=_module)
def test_imports_follow_the_layers(path: Path):
    module = _module(path)
    for name in _imports(path):
        top, _, rest = name.partition(".")
        if top == "tidegate" and rest:
            target = _target(rest)
            assert LAYER_OF[target] <= LAYER_OF[module], f"{module} imports {target}"
        owners = OWNERS.get(top)
        if owners is not None:
            assert module in owners, f"{module} imports {top}, owned by {owners}"


def test_the_client_imports_nothing_from_the_server_side():
    # The control client runs where no server is installed and talks to any V2 server,
    # so it stays on the standard library: stricter than its layer alone would be.
    imports = _imports(PACKAGE / "client.py")
    ours = {name for name in imports if name.partition(".")[0] == "tidegate"}
    assert ours <= {"tidegate", "tidegate.__version__", "tidegate.errors"}
    assert {name.partition(".")[0] for name in imports - ours} <= sys.stdlib_module_names


@pytest.mark.parametrize(
    ("command", "marker", "heavy"),
    [
        ("serve", "--max-body-size", {"onnxruntime", "numpy", "starlette", "uvicorn"}),
        ("status", "TIDEGATE_URL", {"rich", "tidegate.client", "onnxruntime", "numpy"}),
    ],
)
def test_cli_help_imports_nothing_heavy(command, marker, heavy):
    code = (
        "import sys; from click.testing import CliRunner; from tidegate.cli import main; "
        f"result = CliRunner().invoke(main, [{command!r}, '--help']); "
        f"assert result.exit_code == 0 and {marker!r} in result.output; "
        f"print(sorted({heavy!r} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
