"""Failed loads leave the serving version alone; load/unload cycles give memory back."""

import re
import shutil
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests import onnx_models
from tests.conftest import MODELS, LiveServer, serving_a_copy

DIGITS_MODEL = MODELS / "digits" / "1" / "model.onnx"
ZEROS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}


def _reshape_to_sevens() -> onnx.ModelProto:
    """Takes `input` like digits, but fails at run time: 64 values do not split into 7s."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 7])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["output"])],
        "sevens",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 7])],
        [shape],
    )
    return helper.make_model(graph, opset_imports=onnx_models.OPSET, ir_version=8)


def _too_new() -> onnx.ModelProto:
    model = onnx_models.identity("FP32", ["batch", 64])
    model.opset_import[0].version = 99  # no onnxruntime implements this opset
    return model


def _write(directory: Path, model: onnx.ModelProto | bytes) -> None:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (directory / "model.onnx").write_bytes(data)


# (id, fills version directory 2, words the error must contain)
FAILURES: list[tuple[str, Callable[[Path], None], str]] = [
    ("corrupt", lambda d: _write(d, b"\x08\x07 not a model"), "cannot load the model"),
    ("truncated", lambda d: _write(d, DIGITS_MODEL.read_bytes()[:4000]), "cannot load the model"),
    ("incompatible-opset", lambda d: _write(d, _too_new()), "cannot load the model"),
    (
        "missing-input",
        lambda d: _write(d, onnx_models.identity("FP32", ["batch", 64])),
        "lacks input 'input', unlike version 1 serving now",
    ),
    ("warm-up-fails", lambda d: _write(d, _reshape_to_sevens()), "warm-up inference failed"),
    (
        "reference-lacks-input",
        lambda d: (
            _write(d, DIGITS_MODEL.read_bytes()),
            np.savez(d / "reference.npz", pixels=np.zeros((2, 64), dtype=np.float32)),
        ),
        "reference data has no array for input 'input'",
    ),
    (
        "reference-corrupt",
        lambda d: (
            _write(d, DIGITS_MODEL.read_bytes()),
            (d / "reference.npz").write_bytes(b"PK\x03\x04 cut"),
        ),
        "cannot read the reference data",
    ),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serving_a_copy(tmp_path_factory.mktemp("lifecycle")) as server:
        yield server


def live_repository(live: LiveServer) -> Path:
    return live.log_path.parent / "models"


@pytest.mark.parametrize("per_version", [True, False], ids=["version-load", "model-load"])
@pytest.mark.parametrize(("fill", "words"), [pytest.param(*f[1:], id=f[0]) for f in FAILURES])
def test_failed_load_keeps_the_serving_version(live: LiveServer, fill, words, per_version):
    version_dir = live_repository(live) / "digits" / "2"
    version_dir.mkdir()
    try:
        fill(version_dir)
        body = {"parameters": {"version": "2"}} if per_version else {}
        response = live.client.post("/v2/repository/models/digits/load", json=body)
        assert response.status_code == 400
        assert words in response.json()["error"]
        assert live.client.get("/v2/models/digits/ready").status_code == 200
        assert live.client.get("/v2/models/digits").json()["versions"] == ["1"]
        served = live.client.post("/v2/models/digits/infer", json=ZEROS)
        assert served.status_code == 200
        assert served.headers["tidegate-model-version"] == "1"
        assert live.client.get("/v2/health/ready").status_code == 200
    finally:
        shutil.rmtree(version_dir)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_load_unload_cycles_give_memory_back(models_dir: Path, start_server):
    live: LiveServer = start_server(models_dir)
    rss = {}
    for cycle in range(1, 31):
        assert live.client.post("/v2/repository/models/digits/unload").status_code == 200
        assert live.client.post("/v2/repository/models/digits/load").status_code == 200
        assert live.client.post("/v2/models/digits/infer", json=ZEROS).status_code == 200
        rss[cycle] = _rss_bytes(live.process.pid)
    assert rss[30] <= rss[10] * 1.10, rss
    index = live.client.post("/v2/repository/index").json()
    (digits,) = [row for row in index if row["name"] == "digits"]
    assert isinstance(digits["memory_bytes"], int)


def _served_versions(metrics: str, model: str) -> set[str]:
    """The versions of `model` that have series in a /metrics page."""
    return set(re.findall(rf'model="{model}",version="(\d+)"', metrics))


def test_per_version_cycles_give_memory_back(tmp_path: Path, start_server):
    """Under policy "all", each cycle loads version N+1 by number beside N, sends it a
    request and unloads N by number: the unloaded versions' memory goes back."""
    repo = tmp_path / "models"
    onnx_models.save(onnx_models.dense([64, 2048, 2048, 10]), repo, "mlp")  # 16 MiB of weights
    (repo / "mlp" / "config.toml").write_text('[versions]\npolicy = "all"\n')
    live: LiveServer = start_server(repo)
    assert live.client.post("/v2/models/mlp/infer", json=ZEROS).status_code == 200
    rss = {0: _rss_bytes(live.process.pid)}
    for cycle in range(1, 31):
        old, new = str(cycle), str(cycle + 1)
        shutil.copytree(repo / "mlp" / old, repo / "mlp" / new)
        load = live.client.post("/v2/repository/models/mlp/load", json=_version(new))
        assert load.status_code == 200, load.text
        served = live.client.post("/v2/models/mlp/infer", json=ZEROS)
        assert served.headers["tidegate-model-version"] == new
        unload = live.client.post("/v2/repository/models/mlp/unload", json=_version(old))
        assert unload.status_code == 200, unload.text
        shutil.rmtree(repo / "mlp" / old)  # the disk holds two versions, not thirty
        rss[cycle] = _rss_bytes(live.process.pid)
    # Before the fix each cycle could leave a freed 16 MiB block resident: the median
    # from cycle 10 on was 30-60 % above the start (40-70 MiB). A freed block may still
    # stay on top of a loader thread's heap, where malloc_trim does not reach: it comes
    # and goes from cycle to cycle (each loader thread has its own heap, so now and then
    # two at once), and the readings alternate between levels. So: the typical reading
    # holds at most one such block, none holds more than two, and the floor the readings
    # return to does not creep (a block kept for good raises every later floor).
    block = 2048 * 2048 * 4  # the largest weight matrix
    slack = rss[0] * 0.05
    mib = {cycle: round(size / 2**20, 1) for cycle, size in rss.items()}
    later = [rss[cycle] for cycle in range(10, 31)]
    assert statistics.median(later) <= rss[0] + block + slack, mib
    assert max(later) <= rss[0] + 2 * block + slack, mib
    assert min(later[-10:]) <= min(later[:10]) + slack, mib
    # Nothing of the unloaded versions is left to read.
    assert live.client.get("/v2/models/mlp").json()["versions"] == ["31"]
    for path in ("stats", "drift", "ready"):
        assert live.client.get(f"/v2/models/mlp/versions/30/{path}").status_code == 404
    stats = live.client.get("/v2/models/stats").json()["model_stats"]
    assert [s["version"] for s in stats if s["name"] == "mlp"] == ["31"]
    assert _served_versions(live.client.get("/metrics").text, "mlp") == {"31"}


def _version(number: str) -> dict[str, object]:
    return {"parameters": {"version": number}}
