"""The committed real exports (tests/data/*.onnx) and running them as their applications do.

Shared by the tests of the ONNX import and export and of a user's model in a federation.
"""
from pathlib import Path

import numpy as np
import onnxruntime as ort

DATA = Path(__file__).parent / "data"
#: fixture -> (the original's output with probabilities, or None for logits; its label output)
EXPORTS = {
    "torch_mlp": (None, None),
    "torch_cnn": (None, None),
    "keras_mlp": ("probs", None),
    "sk_mlp": ("output_probability", "output_label"),
    "sk_logreg": ("probabilities", "label"),
}


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def as_array(output):
    """A probability output as a (batch, classes) array (skl2onnx's ZipMap gives dicts)."""
    if isinstance(output, list):
        return np.array([[row[c] for c in sorted(row)] for row in output], np.float32)
    return np.asarray(output)


class Original:
    """The exported file as its own application runs it: stock onnxruntime, its own shapes."""

    def __init__(self, blob):
        self.session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, x_flat):
        shape = [len(x_flat)] + [d for d in self.input.shape[1:]]
        return dict(zip(self.names, self.session.run(None, {self.input.name:
                                                             x_flat.reshape(shape)})))

    def probabilities(self, x_flat, name):
        out = self.run(x_flat)
        return as_array(out[name]) if name else softmax(out["logits"])


def digits_like(n, seed):
    """Inputs in the digits' range [0, 1] (the fixtures were trained on digits / 16)."""
    return np.random.default_rng(seed).uniform(0, 1, size=(n, 64)).astype(np.float32)
