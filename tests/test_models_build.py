"""The committed ``models/`` repository must be what ``scripts/build_models.py`` builds.

The models are binary artifacts, so a reviewer cannot see whether they drifted
from the script that claims to produce them; rebuilding and comparing catches a
stale or hand-edited model. Outputs are compared by running both copies in
onnxruntime, so the check does not depend on skl2onnx serialisation details.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SCRIPT = ROOT / "scripts" / "build_models.py"
ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(string)": np.str_,
}


def _load_script() -> ModuleType:
    """Import scripts/build_models.py by path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tidegate_build_models", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations via sys.modules
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> set[str]:
    """The repository's files; hidden ones (the server's `.tidegate` state directory,
    left by `make serve`) are not part of it, as the server's scan skips them too."""
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(session: ort.InferenceSession) -> tuple[list[tuple], list[tuple]]:
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    outputs = [(o.name, o.type, o.shape) for o in session.get_outputs()]
    return inputs, outputs


def _reference(model_onnx: Path) -> dict[str, np.ndarray]:
    with np.load(model_onnx.parent / "reference.npz") as npz:  # allow_pickle=False
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    written = _load_script().build_all(out)
    assert {p.relative_to(out).as_posix() for p in written} == _files(out)
    return out


def _committed_models() -> list[Path]:
    return sorted(MODELS.glob("*/*/model.onnx"))


def test_same_files(rebuilt: Path) -> None:
    committed = _files(MODELS)
    assert committed == _files(rebuilt)
    assert {
        "breast_cancer/1/model.onnx",
        "breast_cancer/2/model.onnx",
        "digits/1/model.onnx",
        "diabetes/1/model.onnx",
        "dataset_topic/1/model.onnx",
        "wine/1/model.onnx",
        "wine/2/model.onnx",
        "wine/3/model.onnx",
    } <= committed


def test_configs_identical(rebuilt: Path) -> None:
    for config in sorted(MODELS.glob("*/config.toml")):
        rel = config.relative_to(MODELS)
        assert config.read_text() == (rebuilt / rel).read_text(), rel


def test_reference_arrays_identical(rebuilt: Path) -> None:
    for model in _committed_models():
        rel = model.relative_to(MODELS)
        ours, theirs = _reference(model), _reference(rebuilt / rel)
        assert ours.keys() == theirs.keys(), rel
        for key, array in ours.items():
            assert array.dtype == theirs[key].dtype, (rel, key)
            assert np.array_equal(array, theirs[key]), (rel, key)


@pytest.mark.parametrize(
    "rel", [m.relative_to(MODELS).as_posix() for m in _committed_models()], ids=str
)
def test_model_matches_rebuild(rebuilt: Path, rel: str) -> None:
    committed_path = MODELS / rel
    assert committed_path.stat().st_size < 1_000_000
    committed, fresh = _session(committed_path), _session(rebuilt / rel)
    assert _signature(committed) == _signature(fresh)

    feeds = _reference(committed_path)
    # The repository contract: one reference array per input, in the input's dtype.
    assert sorted(feeds) == sorted(i.name for i in committed.get_inputs())
    for spec in committed.get_inputs():
        assert feeds[spec.name].dtype.type == ONNX_TO_NUMPY[spec.type], spec.name
        assert 0 < len(feeds[spec.name]) <= 500

    names = [o.name for o in committed.get_outputs()]
    for name, got, want in zip(
        names, committed.run(None, feeds), fresh.run(None, feeds), strict=True
    ):
        if np.issubdtype(np.asarray(got).dtype, np.floating):
            # Training's floating point follows the CPU's vector kernels (AVX2, AVX-512):
            # rebuilt on another machine, a float32 probability near 0 may move by an ulp
            # of 1 (6e-8), which no relative tolerance absorbs.
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert np.array_equal(got, want), name


def test_breast_cancer_versions_differ() -> None:
    v1 = _session(MODELS / "breast_cancer/1/model.onnx")
    v2 = _session(MODELS / "breast_cancer/2/model.onnx")
    feeds = _reference(MODELS / "breast_cancer/1/model.onnx")
    (p1,) = v1.run(["probabilities"], feeds)
    (p2,) = v2.run(["probabilities"], feeds)
    assert p1.shape == p2.shape == (len(feeds["input"]), 2)
    assert not np.allclose(p1, p2, rtol=1e-3, atol=1e-4)
