"""The dynamic batcher in-process, on real onnxruntime sessions: every request gets
exactly its own rows back, joined or not, inline or on the pool, and what cannot
join or fails stays apart. References are onnxruntime sessions run directly."""

import asyncio
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests import onnx_models
from tidegate.batcher import IDLE_INLINE_FACTOR, PROBE_EVERY, SINGLES_TO_STOP, Batcher
from tidegate.config import BatchingConfig, RuntimeConfig
from tidegate.errors import BadRequest, Overloaded
from tidegate.executor import InferenceExecutor
from tidegate.runtime import OnnxModel
from tidegate.stats import VersionStats

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits" / "1" / "model.onnx"
ALWAYS_INLINE = 10**15
NEVER_INLINE = 0


def _model(path: Path) -> OnnxModel:
    model = OnnxModel(path, RuntimeConfig())
    model.warm_up(None)
    return model


@pytest.fixture(scope="module")
def digits() -> OnnxModel:
    return _model(DIGITS)


@pytest.fixture(scope="module")
def reference() -> ort.InferenceSession:
    return ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])


def _batcher(
    model: OnnxModel,
    inline_below_ns: int = NEVER_INLINE,
    threads: int = 2,
    **batching: object,
) -> tuple[Batcher, VersionStats, InferenceExecutor]:
    stats = VersionStats()
    executor = InferenceExecutor(threads)
    config = BatchingConfig(**batching)  # type: ignore[arg-type]
    return Batcher(model, config, executor, stats, inline_below_ns), stats, executor


def _serve_together(batcher: Batcher, requests: list[dict[str, np.ndarray]]) -> list[object]:
    """Submits every request in the same event-loop iteration; results or exceptions."""

    async def all_at_once() -> list[object]:
        calls = [
            batcher.infer(inputs, len(next(iter(inputs.values()))), None) for inputs in requests
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(all_at_once())


def _greedy_batches(row_counts: list[int], max_rows: int) -> list[int]:
    """The batch sizes of requests queued together and taken in order while they fit."""
    batches: list[int] = []
    for rows in row_counts:
        if batches and batches[-1] + rows <= max_rows:
            batches[-1] += rows
        else:
            batches.append(rows)
    return batches


def _digits_rows(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.uniform(0, 16, (rows, 64)).astype(np.float32)}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    row_counts=st.lists(st.integers(1, 40), min_size=1, max_size=40),
    max_batch_size=st.integers(40, 200),
    mode=st.sampled_from(["pool", "inline", "inline-delayed"]),
    dynamic=st.booleans(),
)
def test_every_request_gets_exactly_its_own_rows(
    digits: OnnxModel,
    reference: ort.InferenceSession,
    row_counts: list[int],
    max_batch_size: int,
    mode: str,
    dynamic: bool,
):
    """Pool runs join what is queued; inline runs too when a queue delay makes them
    wait for company, and otherwise run at once, alone, until a probe finds company."""
    batcher, stats, executor = _batcher(
        digits,
        NEVER_INLINE if mode == "pool" else ALWAYS_INLINE,
        max_batch_size=max_batch_size,
        dynamic=dynamic,
        max_queue_delay_us=2000 if mode == "inline-delayed" else 0,
    )
    requests = [_digits_rows(rows, seed) for seed, rows in enumerate(row_counts)]
    results = _serve_together(batcher, requests)
    executor.shutdown()
    names = [o.name for o in reference.get_outputs()]
    for inputs, result in zip(requests, results, strict=True):
        expected = dict(zip(names, reference.run(names, inputs), strict=True))
        assert set(result.outputs) == set(expected)
        for name, want in expected.items():
            np.testing.assert_allclose(result.outputs[name], want, rtol=1e-5, atol=1e-6)
    # Every row ran exactly once, in batches no larger than allowed ...
    assert sum(size * b.compute_infer.count for size, b in stats.batches.items()) == sum(row_counts)
    assert max(stats.batches) <= max(max_batch_size, max(row_counts))
    # ... and requests queued together were joined in arrival order, unless batching is off.
    max_rows = max_batch_size if dynamic else 0
    if mode == "inline":  # the first ones run at once; a probe then finds the rest queued
        alone = PROBE_EVERY - 1
        expected = row_counts[:alone] + _greedy_batches(row_counts[alone:], max_rows)
    else:
        expected = _greedy_batches(row_counts, max_rows)
    expected_batches = Counter(expected)
    assert {size: b.compute_infer.count for size, b in stats.batches.items()} == expected_batches
    assert stats.execution_count == expected_batches.total()
    # The drift statistics see every batch once: one request per batch carries it.
    observed = [r.observed for r in results if r.observed is not None]
    assert len(observed) == stats.execution_count
    assert sum(len(inputs["input"]) for inputs, _ in observed) == sum(row_counts)


def test_cheap_requests_run_at_once_alone_and_join_under_load(digits: OnnxModel):
    batcher, stats, executor = _batcher(digits, ALWAYS_INLINE)

    async def one_at_a_time(count: int) -> None:
        for seed in range(count):
            await batcher.infer(_digits_rows(1, seed), 1, None)

    asyncio.run(one_at_a_time(2 * PROBE_EVERY))
    assert stats.execution_count == 2 * PROBE_EVERY  # alone, probes found no company
    assert not batcher.joining
    _serve_together(batcher, [_digits_rows(1, seed) for seed in range(40)])
    assert stats.execution_count < 2 * PROBE_EVERY + 40  # a probe found the burst queued
    assert batcher.joining
    asyncio.run(one_at_a_time(SINGLES_TO_STOP - 1))
    assert batcher.joining  # lone dispatches, but not yet enough of them
    asyncio.run(one_at_a_time(1))
    assert not batcher.joining  # back to running lone requests at once
    executor.shutdown()


class ThreadRecordingModel(OnnxModel):
    """The real model, noting the thread each run takes."""

    def __init__(self, path: Path, config: RuntimeConfig) -> None:
        super().__init__(path, config)
        self.threads: list[int] = []

    def run(self, inputs: dict[str, np.ndarray], rows: int = 1) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        return super().run(inputs, rows)


@pytest.mark.parametrize(
    ("divisor", "pool_busy", "on_the_loop"),
    [
        (2.5, False, True),  # over the threshold, within the idle budget: inline
        (2.5, True, False),  # the same run while the pool is busy: handed off
        (2 * IDLE_INLINE_FACTOR, False, False),  # over the idle budget too: handed off
    ],
)
def test_a_lone_run_is_inline_longer_while_the_pool_is_idle(
    divisor: float, pool_busy: bool, on_the_loop: bool
):
    """A version whose runs cost more than `inline_below` (a canary on cold caches)
    still runs on the loop when no other inference runs: the hand-off would cost it
    more than it saves anyone."""
    model = ThreadRecordingModel(DIGITS, RuntimeConfig())
    model.warm_up(None)
    model.threads.clear()
    inline_below = int(model.predicted_ns(1) / divisor)
    batcher, stats, executor = _batcher(model, inline_below)
    release = threading.Event()

    async def scenario() -> None:
        blocker = executor.submit(lambda: release.wait(10)) if pool_busy else None
        await batcher.infer(_digits_rows(1, 0), 1, None)
        release.set()
        if blocker is not None:
            await blocker

    asyncio.run(scenario())
    executor.shutdown()
    assert stats.execution_count == 1
    assert (model.threads == [threading.get_ident()]) is on_the_loop


def test_batching_on_and_off_give_the_same_results(digits: OnnxModel):
    requests = [_digits_rows(rows, seed) for seed, rows in enumerate([1, 5, 2, 9, 1, 3] * 4)]
    answers = {}
    for dynamic in (True, False):
        batcher, _, executor = _batcher(digits, dynamic=dynamic)
        answers[dynamic] = _serve_together(batcher, requests)
        executor.shutdown()
    for joined, alone in zip(answers[True], answers[False], strict=True):
        for name in alone.outputs:
            np.testing.assert_allclose(joined.outputs[name], alone.outputs[name], rtol=1e-5)


def test_requests_of_different_trailing_shapes_never_join(tmp_path: Path):
    model = _model(
        onnx_models.save(onnx_models.identity("FP32", ["batch", "width"]), tmp_path, "m")
    )
    batcher, stats, executor = _batcher(model)
    requests = [
        {"x": np.full((rows, width), seed, dtype=np.float32)}
        for seed, (rows, width) in enumerate([(1, 3), (2, 3), (1, 5), (3, 5), (2, 3)])
    ]
    results = _serve_together(batcher, requests)
    executor.shutdown()
    for inputs, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], inputs["x"])
    # In arrival order: (1,3)+(2,3) join, (1,5)+(3,5) join, (2,3) runs alone.
    assert stats.execution_count == 3
    assert sorted(stats.batches) == [2, 3, 4]


def test_text_requests_join_too(tmp_path: Path):
    model = _model(onnx_models.save(onnx_models.identity("BYTES", ["batch", 2]), tmp_path, "m"))
    batcher, stats, executor = _batcher(model)
    requests = [{"x": np.array([[f"r{i}a", f"r{i}b"]] * (i + 1), dtype=object)} for i in range(4)]
    results = _serve_together(batcher, requests)
    executor.shutdown()
    for inputs, result in zip(requests, results, strict=True):
        assert result.outputs["y"].tolist() == inputs["x"].tolist()
    assert stats.execution_count == 1


def test_a_request_the_model_refuses_fails_alone(tmp_path: Path):
    model = _model(onnx_models.save(onnx_models.gather(), tmp_path, "m"))
    batcher, _, executor = _batcher(model)
    indexes = [[0, 1], [3], [7], [2, 2, 1]]  # the table has 4 rows: 7 is out of range
    results = _serve_together(batcher, [{"index": np.array(i, dtype=np.int64)} for i in indexes])
    executor.shutdown()
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    for index, result in zip(indexes, results, strict=True):
        if index == [7]:
            assert isinstance(result, BadRequest)
            assert "could not run on this input" in result.message
        else:
            np.testing.assert_array_equal(result.outputs["rows"], table[index])


def test_a_full_queue_refuses_new_requests(digits: OnnxModel):
    batcher, _, executor = _batcher(digits, threads=1, max_queue_size=3)
    results = _serve_together(batcher, [_digits_rows(1, seed) for seed in range(5)])
    executor.shutdown()
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 2
    assert all("3 requests are already waiting" in r.message for r in refused)
    assert sum(1 for r in results if not isinstance(r, Exception)) == 3


def test_a_queued_request_past_its_timeout_gets_503_without_running(tmp_path: Path):
    slow = _model(onnx_models.save(onnx_models.slow(size=600, rounds=12), tmp_path, "slow"))
    batcher, stats, executor = _batcher(slow, threads=1)
    one = {"x": np.ones((1, 1), dtype=np.float32)}

    async def scenario() -> tuple[object, object, float]:
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(batcher.infer(one, 1, None))
        await asyncio.sleep(0)  # the first request takes the only thread
        started = loop.time()
        with pytest.raises(Overloaded, match="waited its timeout of 20000 us without running"):
            await batcher.infer(one, 1, 20_000)
        waited = loop.time() - started
        return await running, waited, stats.execution_count

    first, waited, executions_then = asyncio.run(scenario())
    executor.shutdown()
    assert first.outputs["y"].shape == ()
    assert waited < 0.5 * slow.predicted_ns(1) / 1e9  # answered at its deadline, not after
    assert executions_then == 1  # the timed-out request never ran
    assert stats.execution_count == 1


def test_a_queue_delay_waits_for_a_fuller_batch(digits: OnnxModel):
    batcher, stats, executor = _batcher(digits, max_queue_delay_us=50_000)

    async def trickle() -> None:
        calls = []
        for seed in range(4):
            calls.append(asyncio.ensure_future(batcher.infer(_digits_rows(1, seed), 1, None)))
            await asyncio.sleep(0.005)  # arrivals 5 ms apart, within the 50 ms delay
        await asyncio.gather(*calls)

    asyncio.run(trickle())
    executor.shutdown()
    assert stats.execution_count == 1
    assert list(stats.batches) == [4]
