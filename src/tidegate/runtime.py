"""The only module that imports onnxruntime: build, warm and run one model version.

onnxruntime releases the GIL inside `InferenceSession.run`, so sessions run on
worker threads while the event loop keeps serving. Its errors share no base
class; they are translated here, once: a file that will not load becomes a
`ModelLoadError` naming the file, and a run that fails on the data it was given
becomes a `BadRequest` (the inputs already passed the datatype and shape checks,
so what is left is data the graph refuses, such as an index out of range).
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from tidegate.config import RuntimeConfig
from tidegate.errors import BadRequest, ModelLoadError
from tidegate.protocol import ModelMetadata, TensorSpec, datatype_from_onnx

_ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.EPFail,
)
# A session's run: (output names, feeds, run options) -> outputs.
NativeRun = Callable[[list[str], dict[str, np.ndarray], Any], list[Any]]

_LOAD_ERRORS = (*_ORT_ERRORS, RuntimeError, ValueError, OSError)
_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_WARM_UP_RUNS = 9  # timed runs after the first, whose median seeds the cost model
_WARM_UP_BUDGET_NS = 50_000_000
_COST_WEIGHT = 0.05  # weight of the newest run in the moving averages of run cost
_EXECUTION = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
}


def session_options(config: RuntimeConfig) -> ort.SessionOptions:
    """onnxruntime's options for a `[runtime]` section."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    spinning = "1" if config.intra_op_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.graph_optimization_level = _OPTIMIZATION[config.graph_optimization]
    options.execution_mode = _EXECUTION[config.execution_mode]
    return options


def _spec(path: Path, arg: ort.NodeArg) -> TensorSpec:
    datatype = datatype_from_onnx(arg.type)
    if datatype is None:
        raise ModelLoadError(
            f"{path}: tensor '{arg.name}' has type {arg.type}, which the V2 protocol cannot "
            "carry (for scikit-learn classifiers, convert with zipmap=False)"
        )
    # Symbolic or unknown dimensions arrive as strings or None: both are dynamic.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


def _empty_outputs(meta: ModelMetadata) -> dict[str, np.ndarray] | str:
    """The outputs of a request of zero rows, built from the output metadata: each
    output's batch dimension 0 and its other dimensions as declared. Or, when an output
    has another dimension that only a run can tell, why there are none.

    Why not run the session: whether onnxruntime accepts an empty batch depends on
    the operators a converter emitted (of the shipped models, the ArrayFeatureExtractor
    of digits and the StringNormalizer of dataset_topic refuse it; the others answer),
    so clients would see one model answer and the next fail with onnxruntime's text.
    Triton gives no rule to follow: its core reads a first dimension of 0 as "batch size
    not set yet" (InferenceRequest::Normalize), so what happens is up to the backend. An
    empty batch is a valid V2 tensor, and its answer is fixed by the metadata alone, so
    every model gives it, the same way, at no cost."""
    outputs = {}
    for spec in meta.outputs:
        if any(d < 0 for d in spec.shape[1:]):
            return (
                f"the request has 0 rows, and output '{spec.name}' has a dimension besides "
                f"the batch that only a run can tell (shape {list(spec.shape)}): this model "
                "cannot answer an empty batch; send at least one row"
            )
        array = np.empty((0, *spec.shape[1:]), dtype=spec.datatype.numpy)
        array.flags.writeable = False  # shared by every empty request
        outputs[spec.name] = array
    return outputs


def _unchecked_run(session: ort.InferenceSession) -> NativeRun:
    """The session's native run, without the Python wrapper's checks around it.

    `InferenceSession.run` checks on every call that each required input is fed, that
    no OrtValue belongs to another session and that no WebGPU graph capture is on:
    several Python calls, 5 us of the ~43 us a one-row tabular request spends in the
    application (bench_hotpath), more on the cold caches of a server at concurrency 1.
    tidegate feeds numpy arrays only, every input checked by the codec, and runs on CPU,
    so the checks can never fail here. `_sess` is the wrapper's own handle to the
    native session (private, but unchanged for years; the constraints file pins the
    release the tests ran, and a rename fails every model load, loudly).
    """
    run: NativeRun = session._sess.run
    return run


class OnnxModel:
    """One loaded ONNX file: its session and the V2 metadata read from it."""

    def __init__(self, path: Path, config: RuntimeConfig) -> None:
        unknown = [p for p in config.providers if p not in ort.get_available_providers()]
        if unknown:
            raise ModelLoadError(
                f"{path}: execution provider {unknown[0]} is not available here; "
                f"available: {', '.join(ort.get_available_providers())}"
            )
        try:
            self._session = ort.InferenceSession(
                str(path), session_options(config), providers=list(config.providers)
            )
        except _LOAD_ERRORS as exc:
            raise ModelLoadError(f"{path}: cannot load the model: {exc}") from exc
        self._run = _unchecked_run(self._session)
        self.path = path
        self.meta = ModelMetadata(
            inputs=tuple(_spec(path, arg) for arg in self._session.get_inputs()),
            outputs=tuple(_spec(path, arg) for arg in self._session.get_outputs()),
        )
        self._output_names = [spec.name for spec in self.meta.outputs]
        self._empty = _empty_outputs(self.meta) if self.meta.batched else None
        # Moving averages of a run's duration and of its rows: a cost model that errs
        # towards overestimating (see predicted_ns). Set by warm_up.
        self._mean_run_ns = float("inf")
        self._mean_rows = 1.0

    def run(self, inputs: dict[str, np.ndarray], rows: int = 1) -> dict[str, np.ndarray]:
        """Runs the model; blocks the calling thread but not others (the GIL is released)."""
        # CPU time of this thread, not wall time: a run that waited for the GIL or a
        # core after computing must not look costly, or the model would never run
        # inline again under load (off-loop runs wait the most).
        started = time.thread_time_ns()
        try:
            results = self._run(self._output_names, inputs, None)
        except _ORT_ERRORS as exc:
            raise BadRequest(f"the model could not run on this input: {exc}") from exc
        # Updated from several threads without a lock: a lost update only delays the average.
        elapsed = time.thread_time_ns() - started
        self._mean_run_ns += _COST_WEIGHT * (elapsed - self._mean_run_ns)
        self._mean_rows += _COST_WEIGHT * (rows - self._mean_rows)
        return dict(zip(self._output_names, results, strict=True))

    def empty_outputs(self) -> dict[str, np.ndarray]:
        """The answer to a request of zero rows, without a run (see `_empty_outputs`).

        Raises:
            BadRequest: an output's size besides the batch is only known from a run, or
                the model has no batch axis.
        """
        if isinstance(self._empty, dict):
            return self._empty
        raise BadRequest(self._empty or "the model has no batch axis for a request of 0 rows")

    def predicted_ns(self, rows: int) -> float:
        """How long a run of `rows` rows will take: the average run, scaled up (never
        down) by rows. Overestimating only sends a run to a thread when it could have
        run inline; underestimating would block the event loop."""
        return self._mean_run_ns * max(1.0, rows / self._mean_rows)

    def feeds(self, sample: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Inputs the model takes: `sample` (the version's reference data, which must
        have an array for every input) in the declared datatypes; without a sample,
        zeros (empty strings) of the declared shape, each dynamic dimension 1."""
        if sample is not None:
            missing = [spec.name for spec in self.meta.inputs if spec.name not in sample]
            if missing:
                raise ModelLoadError(
                    f"{self.path}: the reference data has no array for input '{missing[0]}'"
                )
            return {
                spec.name: np.asarray(sample[spec.name]).astype(spec.datatype.numpy)
                for spec in self.meta.inputs
            }
        return {
            spec.name: np.full(
                [max(d, 1) for d in spec.shape],
                "" if spec.datatype.name == "BYTES" else 0,
                dtype=spec.datatype.numpy,
            )
            for spec in self.meta.inputs
        }

    def warm_up(self, sample: dict[str, np.ndarray] | None) -> None:
        """Runs the first row of `feeds(sample)` a few times, so the first request pays
        no lazy initialisation and the cost model starts from measured runs."""
        feeds = self.feeds(sample)
        rows = 1
        if self.meta.batched:
            feeds = {name: array[:1] for name, array in feeds.items()}
            rows = len(next(iter(feeds.values())))
        durations: list[int] = []
        try:
            self.run(feeds, rows)  # the first run pays for lazy initialisation
            # A few timed runs for the cost model, fewer for a model that is slow anyway.
            while len(durations) < _WARM_UP_RUNS and sum(durations) < _WARM_UP_BUDGET_NS:
                started = time.thread_time_ns()
                self.run(feeds, rows)
                durations.append(time.thread_time_ns() - started)
        except BadRequest as exc:
            raise ModelLoadError(f"{self.path}: warm-up inference failed: {exc.message}") from exc
        self._mean_run_ns = float(np.median(durations))
        self._mean_rows = float(rows)
