"""Exporting the federated model back to a standalone ONNX file, for plain onnxruntime."""
import numpy as np
import pytest
from exported_models import DATA, EXPORTS, Original, digits_like

from edgefl.device.predictor import Predictor
from edgefl_server.model_builder import build_mlp, dense_extractor
from edgefl_server.onnx_export import export_onnx
from edgefl_server.onnx_import import import_onnx


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_runs_in_plain_onnxruntime_and_equals_the_device(name):
    """After training moved the weights, the exported file gives what the device predicts."""
    model = import_onnx(DATA / f"{name}.onnx")
    rng = np.random.default_rng(2)
    trained = model.with_weights(model.weights + rng.normal(0, 0.3, model.weights.shape)
                                 .astype(np.float32), version=7, round_id=7)
    device = Predictor(trained)
    exported = Original(export_onnx(trained))
    original = Original((DATA / f"{name}.onnx").read_bytes())
    # The application calls it as it called the original: same input (name and shape), outputs.
    assert exported.input.name == original.input.name
    assert exported.input.shape[1:] == original.input.shape[1:]
    assert exported.names == original.names
    x = digits_like(25, 3)
    prob_name, label_name = EXPORTS[name]
    np.testing.assert_allclose(exported.probabilities(x, prob_name), device.predict(x),
                               rtol=1e-5, atol=1e-6)
    if label_name:
        np.testing.assert_array_equal(exported.run(x)[label_name], device.predict(x).argmax(1))
    # And the weights did change what it predicts (the export is not the original file).
    assert not np.allclose(original.probabilities(x, prob_name), device.predict(x), atol=1e-3)


def test_export_of_a_model_built_by_edgefl_keeps_only_its_probabilities():
    rng = np.random.default_rng(8)
    model = build_mlp((12, 5), seed=1, extractor=dense_extractor(
        rng.normal(0, 0.3, (64, 12)).astype(np.float32), np.zeros(12, np.float32)))
    trained = model.with_weights(model.weights * 1.5, version=2, round_id=2)
    exported = Original(export_onnx(trained))
    assert exported.names == ["probabilities"] and exported.input.name == "x"
    x = digits_like(6, 9)
    np.testing.assert_allclose(exported.run(x)["probabilities"], Predictor(trained).predict(x),
                               rtol=1e-5, atol=1e-6)
