"""The registry in-process: swaps, draining, and what a reload keeps."""

import asyncio
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from tests import onnx_models
from tidegate.errors import NotFound
from tidegate.executor import InferenceExecutor
from tidegate.observer import DriftObserver
from tidegate.registry import Registry


def _loaded(models_dir: Path) -> Registry:
    registry = Registry(models_dir, InferenceExecutor(1))
    asyncio.run(registry.load_all())
    return registry


def test_an_unloaded_session_lives_until_its_last_request_is_done(models_dir: Path):
    registry = _loaded(models_dir)
    in_flight = registry.resolve("digits")  # what a request holds while it runs
    session = weakref.ref(in_flight.model)
    asyncio.run(registry.unload("digits"))
    with pytest.raises(NotFound, match="model 'digits' is not loaded"):
        registry.resolve("digits")
    assert session() is not None  # the request still finishes on it
    del in_flight
    assert session() is None  # drained: released


def test_a_swap_replaces_the_snapshot_at_once(models_dir: Path):
    registry = _loaded(models_dir)
    old = registry.resolve("digits")
    shutil.copytree(models_dir / "digits" / "1", models_dir / "digits" / "2")
    asyncio.run(registry.load("digits", "2"))
    assert [d.version for d in registry.versions("digits")] == [1, 2]
    assert registry.resolve("digits").version == 2
    assert registry.resolve("digits", "1") is old  # loading beside keeps version 1 as it was
    asyncio.run(registry.load("digits"))  # policy reload: latest only, all rebuilt
    assert [d.version for d in registry.versions("digits")] == [2]
    assert registry.resolve("digits", "2") is not old


@pytest.mark.parametrize(
    "retire",
    [
        lambda registry: registry.unload("digits", "1"),
        lambda registry: registry.unload("digits"),
        lambda registry: registry.load("digits"),  # the policy (latest) drops version 1
    ],
    ids=["unload-version", "unload-model", "reload"],
)
def test_a_retired_version_lets_go_of_its_served_batches(models_dir: Path, retire):
    """Batches waiting for the drift observer hold onnxruntime's output buffers, which
    keep the session's memory arena alive: a version that stops serving drops them,
    however it stops, and one that goes on serving keeps its own."""
    shutil.copytree(models_dir / "digits" / "1", models_dir / "digits" / "2")
    registry = _loaded(models_dir)
    asyncio.run(registry.load("digits", "1"))
    observer = DriftObserver()  # not started: what is submitted waits
    monitors = {}
    for version in ("1", "2"):
        deployment = registry.resolve("digits", version)
        inputs = {"input": np.zeros((1, 64), np.float32)}
        observer.submit(deployment.drift, inputs, deployment.model.run(inputs))
        monitors[version] = deployment.drift
    del deployment
    asyncio.run(retire(registry))
    for version, monitor in monitors.items():
        serving = registry.get("digits", int(version))
        # A reload builds version 2 anew: the old build is retired too.
        still = serving is not None and serving.drift is monitor
        assert len(monitor.pending) == int(still), version


def test_latest_n_policy(models_dir: Path):
    for version in (2, 3):
        shutil.copytree(models_dir / "digits" / "1", models_dir / "digits" / str(version))
    (models_dir / "digits" / "config.toml").write_text(
        '[versions]\npolicy = "latest"\nnum_versions = 2\n'
    )
    registry = _loaded(models_dir)
    assert [d.version for d in registry.versions("digits")] == [2, 3]
    assert registry.resolve("digits").version == 3


_LOAD_AND_REPORT_NUMBA = """
import asyncio, sys
from pathlib import Path
from tidegate.executor import InferenceExecutor
from tidegate.observer import DriftObserver
from tidegate.registry import Registry
registry = Registry(Path(sys.argv[1]), InferenceExecutor(1))
asyncio.run(registry.load_all())
assert registry.is_loaded("m")
print(sorted({"numba", "llvmlite"} & set(sys.modules)))
"""


@pytest.mark.parametrize(
    ("drift", "backend", "loaded"),
    [
        (False, "auto", []),
        (True, "auto", []),
        (True, "aot", []),
        (True, "jit", ["llvmlite", "numba"]),
    ],
)
def test_numba_is_imported_only_for_jit_drift(
    tmp_path: Path, drift: bool, backend: str, loaded: list[str]
):
    """Numba and LLVM cost ~130 MiB: a server whose models turn drift off never loads them,
    nor does one with drift on that runs the kernels compiled ahead of time."""
    onnx_models.save(onnx_models.identity("FP32"), tmp_path, "m")
    (tmp_path / "m" / "config.toml").write_text(f"[drift]\nenabled = {str(drift).lower()}\n")
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_REPORT_NUMBA, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,  # the first AOT build on a machine takes ~15-30 s
        check=True,
        env={**os.environ, "TIDEGATE_KERNELS": backend},
    )
    assert done.stdout.strip() == str(loaded)
