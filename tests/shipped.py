"""The shipped models, their reference rows, and onnxruntime run directly as the oracle."""

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

MODELS = Path(__file__).resolve().parent.parent / "models"
ONNX_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(string)": "BYTES",
}


@dataclass(frozen=True)
class ShippedVersion:
    model: str
    version: int

    @property
    def path(self) -> Path:
        return MODELS / self.model / str(self.version) / "model.onnx"

    def __str__(self) -> str:
        return f"{self.model}-v{self.version}"


def _served(model_dir: Path) -> list[int]:
    """The versions the model's config.toml serves at start (its [versions] policy);
    wine ships rollout candidates (versions 2 and 3) that do not serve at start."""
    versions = sorted(int(d.name) for d in model_dir.iterdir() if d.name.isdigit())
    table = tomllib.loads((model_dir / "config.toml").read_text()).get("versions", {})
    policy = table.get("policy", "latest")
    if isinstance(policy, list):
        return [v for v in versions if v in policy]
    return versions if policy == "all" else versions[-table.get("num_versions", 1) :]


SHIPPED = [
    ShippedVersion(model_dir.name, version)
    for model_dir in sorted(MODELS.iterdir())
    if model_dir.is_dir() and not model_dir.name.startswith(".")  # not make serve's state
    for version in _served(model_dir)
]


@cache
def session(path: Path) -> ort.InferenceSession:
    """A plain session with the thread setting tidegate uses by default: one intra-op
    thread. (With several, tree ensembles sum in another order, changing the last bits.)"""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference_rows(shipped: ShippedVersion, rows: int, start: int = 0) -> dict[str, np.ndarray]:
    """`rows` rows of the version's reference.npz, each input in the dtype the model takes."""
    with np.load(shipped.path.parent / "reference.npz") as archive:
        arrays = {name: archive[name][start : start + rows] for name in archive.files}
    return {
        name: array.astype(object) if array.dtype.kind == "U" else array
        for name, array in arrays.items()
    }


def json_request(name: str, datatype: str, array: np.ndarray) -> dict[str, object]:
    """A V2 JSON infer request body with one input."""
    return {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "data": array.ravel().tolist(),
            }
        ]
    }


def expected_outputs(
    shipped: ShippedVersion, feeds: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """onnxruntime's own answer, with no tidegate code in between."""
    sess = session(shipped.path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def assert_same_output(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal outputs: exact for labels and strings, rtol 1e-5 for scores."""
    assert got.shape == expected.shape
    if expected.dtype == object:
        decoded = [g.decode() if isinstance(g, bytes) else g for g in got.reshape(-1)]
        assert decoded == list(expected.reshape(-1))
    elif expected.dtype.kind == "f":
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)
    else:
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def split_binary(body: bytes, header_length: int, key: str) -> tuple[dict, list[bytes]]:
    """A binary-extension body's JSON part, and the tensor bytes of each entry of
    `key` ("inputs" or "outputs"), cut by their binary_data_size."""
    document = orjson.loads(body[:header_length])
    blobs, offset = [], header_length
    for entry in document[key]:
        size = entry["parameters"]["binary_data_size"]
        blobs.append(body[offset : offset + size])
        offset += size
    assert offset == len(body)
    return document, blobs


def client_inputs(client: Any, shipped: ShippedVersion, feeds: dict, **options: Any) -> list[Any]:
    """tritonclient's InferInputs (of `client`: tritonclient.http or tritonclient.grpc)
    holding `feeds`; `options` go to set_data_from_numpy (HTTP's binary_data)."""
    inputs = []
    for arg in session(shipped.path).get_inputs():
        array = feeds[arg.name]
        if array.dtype == object:  # tritonclient sends BYTES from bytes objects
            array = np.vectorize(str.encode, otypes=[object])(array)
        infer_input = client.InferInput(arg.name, list(array.shape), ONNX_TO_V2[arg.type])
        infer_input.set_data_from_numpy(array, **options)
        inputs.append(infer_input)
    return inputs
