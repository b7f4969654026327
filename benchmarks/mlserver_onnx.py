"""An MLServer custom runtime serving one ONNX file with onnxruntime (for bench_vs_mlserver.py).

model-settings.json: `"implementation": "mlserver_onnx.OnnxRuntime"` and
`"parameters": {"uri": "/path/to/model.onnx"}`. Runs in MLServer's own venv, not tidegate's.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    """One single-threaded CPU InferenceSession; every input and output as a numpy tensor."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._outputs = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {item.name: NumpyCodec.decode_input(item) for item in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )
