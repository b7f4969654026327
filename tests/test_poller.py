"""The repository poller against a real registry on a copy of the shipped models.

Polls are driven by calling `poll_once` directly, so the tests need no clock."""

import asyncio
import logging
import shutil
import time
from pathlib import Path

import httpx

from tidegate.executor import InferenceExecutor
from tidegate.poller import RepositoryPoller
from tidegate.registry import Registry


def _started(models_dir: Path) -> tuple[Registry, RepositoryPoller]:
    registry = Registry(models_dir, InferenceExecutor(1))
    poller = RepositoryPoller(registry, interval=1.0)

    async def start() -> None:
        await poller.prime()
        await registry.load_all()

    asyncio.run(start())
    return registry, poller


def _poll(poller: RepositoryPoller, times: int = 1) -> None:
    async def polls() -> None:
        for _ in range(times):
            await poller.poll_once()

    asyncio.run(polls())


def _serving(registry: Registry, name: str) -> list[int]:
    return [d.version for d in registry.versions(name)] if registry.is_loaded(name) else []


def test_a_new_version_loads_after_two_quiet_polls(models_dir: Path):
    registry, poller = _started(models_dir)
    _poll(poller)
    shutil.copytree(models_dir / "digits" / "1", models_dir / "digits" / "2")
    _poll(poller)
    assert _serving(registry, "digits") == [1]  # seen once: maybe still being copied
    _poll(poller)
    assert _serving(registry, "digits") == [2]  # policy "latest": 2 replaces 1


def test_a_slowly_copied_file_is_not_loaded_until_complete(models_dir: Path, caplog):
    registry, poller = _started(models_dir)
    source = (models_dir / "digits" / "1" / "model.onnx").read_bytes()
    target = models_dir / "digits" / "2" / "model.onnx"
    target.parent.mkdir()
    chunk = len(source) // 5 + 1
    with caplog.at_level(logging.INFO, logger="tidegate"):
        for start in range(0, len(source), chunk):
            with target.open("ab") as file:
                file.write(source[start : start + chunk])
            _poll(poller)  # every poll sees the file grown since the last one
            assert _serving(registry, "digits") == [1]
        assert "not reloaded" not in caplog.text  # never tried on a partial file
        _poll(poller, 2)
    assert _serving(registry, "digits") == [2]


def test_a_corrupt_new_version_leaves_the_old_one_serving(models_dir: Path, caplog):
    registry, poller = _started(models_dir)
    (models_dir / "digits" / "2").mkdir()
    (models_dir / "digits" / "2" / "model.onnx").write_bytes(b"\x08\x07not a model at all")
    with caplog.at_level(logging.ERROR, logger="tidegate.poller"):
        _poll(poller, 4)
    assert _serving(registry, "digits") == [1]
    failures = [r for r in caplog.records if "not reloaded" in r.getMessage()]
    assert len(failures) == 1  # tried once, not at every poll
    assert "digits/2/model.onnx" in failures[0].getMessage()


def test_unchanged_versions_are_kept_and_removed_ones_dropped(models_dir: Path):
    registry, poller = _started(models_dir)
    before = {d.version: d for d in registry.versions("breast_cancer")}
    shutil.copytree(models_dir / "breast_cancer" / "1", models_dir / "breast_cancer" / "3")
    _poll(poller, 2)
    after = {d.version: d for d in registry.versions("breast_cancer")}
    assert sorted(after) == [1, 2, 3]  # policy "all"
    assert after[1] is before[1]
    assert after[2] is before[2]
    shutil.rmtree(models_dir / "breast_cancer" / "2")
    _poll(poller, 2)
    assert _serving(registry, "breast_cancer") == [1, 3]
    assert registry.resolve("breast_cancer", "1") is before[1]


def test_config_change_reloads_and_removed_models_unload(models_dir: Path):
    registry, poller = _started(models_dir)
    assert registry.resolve("diabetes").max_batch_size == 256
    config = models_dir / "diabetes" / "config.toml"
    config.write_text(config.read_text() + "\n[batching]\nmax_batch_size = 8\n")
    _poll(poller, 2)
    assert registry.resolve("diabetes").max_batch_size == 8
    shutil.rmtree(models_dir / "diabetes")
    _poll(poller, 2)
    assert not registry.is_loaded("diabetes")
    shutil.copytree(models_dir / "digits", models_dir / "digits_copy")
    _poll(poller, 2)
    assert _serving(registry, "digits_copy") == [1]


def test_polling_server_picks_up_a_chunked_copy(models_dir: Path, start_server):
    live = start_server(models_dir, "--poll-interval", "0.2")
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}

    def answering_version() -> str:
        response = live.client.post("/v2/models/digits/infer", json=body)
        assert response.status_code == 200, response.text
        return response.headers["tidegate-model-version"]

    source = (models_dir / "digits" / "1" / "model.onnx").read_bytes()
    target = models_dir / "digits" / "2" / "model.onnx"
    target.parent.mkdir()
    chunk = len(source) // 8 + 1
    for start in range(0, len(source), chunk):
        with target.open("ab") as file:
            file.write(source[start : start + chunk])
        assert answering_version() == "1"
        time.sleep(0.1)  # faster than the poll interval: every poll sees a change
    deadline = time.monotonic() + 10
    while answering_version() != "2":
        assert time.monotonic() < deadline, live.log()
        time.sleep(0.05)
    assert "not reloaded" not in live.log()
    assert httpx.get(f"{live.base}/v2/models/digits").json()["versions"] == ["2"]
