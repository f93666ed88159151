"""edgefl: federated learning for constrained edge devices.

A device serves predictions from an ONNX model (:class:`Predictor`), trains on its own data with
compiled kernels (:class:`LocalTrainer`), and sends clipped, noised, sparsified updates
(:class:`PrivacyPolicy`, :class:`Compressor`, :func:`encode_update`) over MQTT to an aggregation
server, whose new global models it hot-swaps into the live predictor.

Public names are imported lazily, so ``import edgefl.kernels`` stays light.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Predictor": "edgefl.device.predictor",
    "LocalTrainer": "edgefl.device.trainer",
    "PrivacyPolicy": "edgefl.device.privacy",
    "PrivacyBudgetExhausted": "edgefl.device.privacy",
    "Compressor": "edgefl.device.compression",
    "ModelManifest": "edgefl.wire.model",
    "encode_update": "edgefl.wire",
    "decode_update": "edgefl.wire",
    "encode_model": "edgefl.wire",
    "decode_model": "edgefl.wire",
    "UpdateDecodeError": "edgefl.wire",
    "EdgeClient": "edgefl.device.client",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
