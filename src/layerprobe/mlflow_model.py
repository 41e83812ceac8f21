"""MLflow "models from code" entry for a saved probe: pyfunc over cached features, no pickle anywhere.

MLflow loads this file (not a pickled object) and calls `load_context` with the probe folder
(probe.safetensors + probe.json) logged as an artifact. Input: per-layer features `[N, L, T, D]` float32 as in
the feature cache, or for a probe reading the final layer's patch tokens the named inputs
{"tokens": [N, L, T, D], "patches": [N, P, D_final]}; output: predicted class indices `[N]`. The layer axis is what
the backbone yields run only as deep as the probe reads (`layerprobe.truncation.layers_read`): the first k layers
for a probe whose deepest layer is block k-1, all L (the final one too) for a probe reading `final`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class ProbeModel(PythonModel):
    def load_context(self, context) -> None:
        from layerprobe.checkpoint import load_probe, reading_arguments
        from layerprobe.truncation import layers_read

        self.probe, self.config = load_probe(Path(context.artifacts["probe"]))
        self.layers = layers_read(self.config)
        self.reading = reading_arguments(self.config)  # slots, width and normalisation, as the probe was trained

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from layerprobe.train import predict

        patches = None
        if isinstance(model_input, dict):
            if self.config.get("patch_tokens") and "patches" not in model_input:
                raise ValueError("this probe reads the final layer's patch tokens: give {'tokens', 'patches'}")
            patches = model_input.get("patches")
            patches = None if patches is None else torch.as_tensor(np.asarray(patches, dtype=np.float32))
            model_input = model_input["tokens"]
        elif self.config.get("patch_tokens"):
            raise ValueError("this probe reads the final layer's patch tokens: give {'tokens', 'patches'}")
        tokens = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if tokens.dim() != 4 or tokens.shape[1] < self.layers:
            raise ValueError(
                f"tokens must be [N, L, T, D] with at least {self.layers} layers, got {list(tokens.shape)}"
            )
        predictions, _, _ = predict(self.probe, tokens, batch_size=1024, patches=patches, **self.reading)
        return np.asarray(predictions, dtype=np.int64)


mlflow.models.set_model(ProbeModel())
