"""The way back out of edgefl: a model as a standalone ONNX file, and what a model is.

:func:`export_onnx` bakes a model's current weights into its graph as initializers and keeps
only the original input and outputs of an imported model (:mod:`~edgefl_server.onnx_import`),
so stock onnxruntime runs it and the application that called the original calls it unchanged.
:func:`describe` is what ``edgefl model inspect`` prints.

Server and tools only: devices never import ``onnx``.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefl.wire.model import Model

from .onnx_import import ORIGIN_KEY, PREFIX, ancestors


def export_onnx(model: Model) -> bytes:
    """A standalone ONNX file of ``model`` with its weights baked in.

    The trainable tensors become initializers; the graph keeps only the original input (with its
    original shape) and outputs for an imported model, or ``probabilities`` for a model built by
    edgefl; edgefl's ``features`` output and what only it needed are removed. Stock onnxruntime
    runs the result; it gives the outputs the device's predictor gives for the same weights.
    """
    proto = onnx.load_from_string(model.onnx)
    graph = proto.graph
    manifest = model.manifest
    origin = next((json.loads(p.value) for p in proto.metadata_props if p.key == ORIGIN_KEY),
                  None)
    weight_names = {t.name for t in manifest.tensors}
    graph.initializer.extend(
        numpy_helper.from_array(np.ascontiguousarray(view), spec.name)
        for spec, view in zip(manifest.tensors, manifest.tensor_views(model.weights)))
    keep_outputs = origin["outputs"] if origin else [manifest.output_name]
    outputs = [o for o in graph.output if o.name in keep_outputs]
    inputs = [i for i in graph.input if i.name not in weight_names]
    nodes = list(graph.node)
    if origin and len(origin["input_shape"]) > 2:
        # Give the application its own input shape back: drop the flat-input Reshape.
        unflatten = next(n for n in nodes if n.name == PREFIX + "unflatten_input")
        nodes.remove(unflatten)
        for node in nodes:
            for j, name in enumerate(node.input):
                if name == unflatten.output[0]:
                    node.input[j] = manifest.input_name
        shape = [d if d is not None else "batch" for d in origin["input_shape"]]
        shape[0] = "batch"
        inputs = [helper.make_tensor_value_info(manifest.input_name, TensorProto.FLOAT, shape)]
    needed = {o.name for o in outputs}
    live = []
    for node in reversed(nodes):  # drop what only the removed outputs needed
        if needed & set(node.output):
            live.append(node)
            needed.update(node.input)
    live.reverse()
    used = {n for node in live for n in node.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(live)
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    kept_props = [p for p in proto.metadata_props if not p.key.startswith("edgefl.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept_props)
    for key, value in (("edgefl.version", model.version), ("edgefl.round", model.round_id)):
        proto.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def describe(model: Model) -> dict:
    """What ``edgefl model inspect`` prints: manifest, sizes, extractor, version, hash."""
    manifest = model.manifest
    proto = onnx.load_from_string(model.onnx)
    head = {t.name for t in manifest.tensors}
    ops: dict[str, int] = {}
    producers = {out: node for node in proto.graph.node for out in node.output}
    if manifest.features_name:
        extractor = ancestors(manifest.features_name, producers)
        for node in proto.graph.node:
            if id(node) in extractor:
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
    frozen = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                 if t.data_type == TensorProto.FLOAT)
    return {
        "version": model.version, "round": model.round_id,
        "onnx_sha256": model.onnx_sha256.hex(), "onnx_bytes": len(model.onnx),
        "signature": model.signature.hex() if model.signature else None,
        "input": {"name": manifest.input_name, "width": manifest.input_width},
        "output": {"name": manifest.output_name, "classes": manifest.num_classes},
        "head": {"layer_sizes": list(manifest.layer_sizes), "trainable_params": manifest.num_params,
                 "tensors": [{"name": t.name, "shape": list(t.shape)} for t in manifest.tensors]},
        "extractor": ({"features": manifest.features_name, "width": manifest.head_width,
                       "operators": ops, "frozen_float_values": frozen}
                      if manifest.features_name else None),
        "graph_outputs": [o.name for o in proto.graph.output if o.name not in head],
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
    }
