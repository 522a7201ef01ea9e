"""A minimal MLServer runtime: ONNX Runtime (2 intra-op threads) on raw pixels, for the anchor.

Loaded by MLServer from the model directory `loadtest/mlserver_anchor.py` writes; applies the
model's preprocessing (x * scale - mean) / std, then the exported network.
"""

import json
import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OrtRuntime(MLModel):
    async def load(self) -> bool:
        folder = os.path.dirname(self.settings.parameters.uri)
        with open(os.path.join(folder, "preprocess.json")) as f:
            pre = json.load(f)
        self.scale = np.float32(pre["scale"])
        self.mean = np.asarray(pre["mean"], np.float32)
        self.std = np.asarray(pre["std"], np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        pixels = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        x = (pixels * self.scale - self.mean) / self.std
        probs = self.session.run(["output"], {"input": x})[0]
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name="probabilities", payload=probs)],
        )
