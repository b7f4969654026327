"""The repository scanner and model config parsing, on directories built by the tests."""

from pathlib import Path

import numpy as np
import pytest

from tidegate.config import (
    BatchingConfig,
    DriftConfig,
    ModelConfig,
    VersionPolicy,
    load_model_config,
)
from tidegate.errors import ConfigError, ModelLoadError, NotFound
from tidegate.repository import load_reference, scan, scan_model


def _version(root: Path, model: str, version: str, reference: bool = False) -> None:
    directory = root / model / version
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(b"not parsed by the scanner")
    if reference:
        np.savez(directory / "reference.npz", input=np.zeros((2, 3), dtype=np.float32))


def test_scan_finds_models_and_versions(tmp_path: Path):
    _version(tmp_path, "fraud", "1", reference=True)
    _version(tmp_path, "fraud", "12")
    _version(tmp_path, "fraud", "07")  # not a version: leading zero
    _version(tmp_path, "fraud", "latest")  # not a version
    (tmp_path / "fraud" / "3").mkdir()  # no model file
    _version(tmp_path, ".tidegate", "1")  # hidden: the state directory
    (tmp_path / "README.md").write_text("a file, not a model")

    result = scan(tmp_path)

    assert list(result.models) == ["fraud"]
    assert result.problems == {}
    fraud = result.models["fraud"]
    assert sorted(fraud.versions) == [1, 12]
    assert fraud.versions[1].reference_path == tmp_path / "fraud" / "1" / "reference.npz"
    assert fraud.versions[12].reference_path is None
    assert fraud.config == ModelConfig()
    assert [v.version for v in fraud.selected()] == [12]


def test_problems_are_collected_per_model(tmp_path: Path):
    _version(tmp_path, "good", "1")
    _version(tmp_path, "bad name!", "1")
    (tmp_path / "empty").mkdir()
    _version(tmp_path, "typo", "1")
    (tmp_path / "typo" / "config.toml").write_text("[versions]\npolicyy = 'all'\n")

    result = scan(tmp_path)

    assert list(result.models) == ["good"]
    assert "not a valid model name" in result.problems["bad name!"]
    assert "no version directory with a model.onnx" in result.problems["empty"]
    assert result.problems["typo"].endswith("config.toml: unknown key versions.policyy")


def test_scan_model_of_unknown_name(tmp_path: Path):
    with pytest.raises(NotFound, match="model 'ghost' is not in the repository"):
        scan_model(tmp_path, "ghost")
    with pytest.raises(NotFound):
        scan_model(tmp_path, "../etc")


@pytest.mark.parametrize(
    ("policy", "available", "selected"),
    [
        (VersionPolicy(), [3, 1, 2], [3]),
        (VersionPolicy("all"), [3, 1, 2], [1, 2, 3]),
        (VersionPolicy("specific", (1, 3, 9)), [3, 1, 2], [1, 3]),
        (VersionPolicy("latest", num_versions=2), [3, 1, 2], [2, 3]),
        (VersionPolicy("latest", num_versions=5), [3, 1, 2], [1, 2, 3]),
    ],
)
def test_version_policy(policy, available, selected):
    assert policy.select(available) == selected


def _config(tmp_path: Path, text: str) -> ModelConfig:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_model_config(path)


def test_config_keys(tmp_path: Path):
    config = _config(
        tmp_path,
        """
        [versions]
        policy = [2, 1]
        [batching]
        max_batch_size = 8
        dynamic = false
        max_queue_delay_us = 500
        max_queue_size = 16
        [runtime]
        intra_op_threads = 2
        intra_op_spinning = true
        inter_op_threads = 1
        providers = ["CPUExecutionProvider"]
        graph_optimization = "basic"
        execution_mode = "parallel"
        [validation]
        reject_nan = true
        [drift]
        enabled = false
        bins = 8
        reference_rows = 500
        half_life = 2000
        psi_warn = 0.2
        psi_alert = 0.3
        alpha = 0.01
        """,
    )
    assert config.versions == VersionPolicy("specific", (1, 2))
    assert config.batching == BatchingConfig(8, False, 500, 16)
    assert config.runtime.intra_op_threads == 2
    assert config.runtime.intra_op_spinning is True
    assert config.runtime.graph_optimization == "basic"
    assert config.runtime.execution_mode == "parallel"
    assert config.validation.reject_nan is True
    assert config.drift == DriftConfig(False, 8, 500, 2000, 0.2, 0.3, 0.01)
    assert load_model_config(tmp_path / "missing.toml") == ModelConfig()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[drift2]\nbins = 3\n", "unknown section [drift2]"),
        ("[batching]\nmax_batch = 3\n", "unknown key batching.max_batch"),
        ("[batching]\nmax_batch_size = 'big'\n", "batching.max_batch_size has the wrong type"),
        ("[batching]\nmax_batch_size = true\n", "batching.max_batch_size has the wrong type"),
        ("[batching]\nmax_batch_size = -1\n", "batching.max_batch_size must be >= 0"),
        ("[batching]\ndynamic = 1\n", "batching.dynamic has the wrong type"),
        ("[batching]\nmax_queue_delay_us = -1\n", "batching.max_queue_delay_us must be >= 0"),
        ("[batching]\nmax_queue_size = 0\n", "batching.max_queue_size must be >= 1"),
        ("[versions]\npolicy = 'newest'\n", "versions.policy must be"),
        ("[versions]\npolicy = [0]\n", "positive version numbers"),
        ("[versions]\npolicy = []\n", "positive version numbers"),
        ("[versions]\npolicy = 'all'\nnum_versions = 2\n", "num_versions needs policy = 'latest'"),
        ("[versions]\nnum_versions = 0\n", "versions.num_versions must be >= 1"),
        ("[runtime]\ngraph_optimization = 'max'\n", "runtime.graph_optimization must be one of"),
        ("[runtime]\nproviders = []\n", "runtime.providers must be a list of names"),
        ("[validation]\nreject_nan = 1\n", "validation.reject_nan has the wrong type"),
        ("[runtime]\nintra_op_spinning = 'no'\n", "runtime.intra_op_spinning has the wrong type"),
        ("[drift]\nbins = 1\n", "drift.bins must be >= 2"),
        ("[drift]\nalpha = 1.5\n", "drift.alpha must be between 0 and 1"),
        ("[drift]\npsi_warn = 0.3\npsi_alert = 0.2\n", "psi_alert must be >= drift.psi_warn"),
        ("[drift]\nwindow = 3\n", "unknown key drift.window"),
        ("versions = 3\n", "[versions] must be a table"),
        ("[versions\n", "not valid TOML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, text, words):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, text)
    assert str(tmp_path / "config.toml") in info.value.message
    assert words in info.value.message
    assert info.value.status == 400


def test_reference_loading(tmp_path: Path):
    _version(tmp_path, "m", "1", reference=True)
    arrays = load_reference(tmp_path / "m" / "1" / "reference.npz")
    assert list(arrays) == ["input"]
    assert arrays["input"].shape == (2, 3)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelLoadError, match=r"broken\.npz: cannot read the reference data"):
        load_reference(broken)
