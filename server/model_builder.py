"""Building the global model's ONNX graph (server and tests only: devices never import ``onnx``).

:func:`build_mlp` makes version 0 of a dense head (softmax regression or an MLP with ReLU), whose
trainable tensors are *graph inputs* so that a device supplies each round's weights to
onnxruntime itself. An optional frozen feature extractor (any ONNX graph with one input and one
output) is spliced in front of the head; its weights stay initializers inside the graph and its
output is exposed as a second graph output, ``features``, which the device trains the head on.
"""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefl.wire.model import Model, ModelManifest, TensorSpec

#: The opset the graphs are written for (supported by onnxruntime >= 1.17).
OPSET = 17
#: IR version matching OPSET, so older onnxruntime builds load the graphs too.
IR_VERSION = 8

INPUT_NAME = "x"
OUTPUT_NAME = "probabilities"
FEATURES_NAME = "features"
_EXTRACTOR_PREFIX = "extractor/"


def init_weights(layer_sizes, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-normal weights for the ReLU layers, Glorot-uniform for the output layer, zero biases.

    He init keeps the activations' variance stable through ReLU; the last layer feeds a softmax,
    where Glorot's symmetric range is the usual choice.
    """
    rng = np.random.default_rng(seed)
    layers = []
    pairs = list(zip(layer_sizes[:-1], layer_sizes[1:]))
    for i, (d_in, d_out) in enumerate(pairs):
        if i < len(pairs) - 1:
            W = rng.normal(0.0, np.sqrt(2.0 / d_in), size=(d_in, d_out))
        else:
            limit = np.sqrt(6.0 / (d_in + d_out))
            W = rng.uniform(-limit, limit, size=(d_in, d_out))
        layers.append((W.astype(np.float32), np.zeros(d_out, np.float32)))
    return layers


def _head_nodes(layer_sizes, head_input: str):
    """Nodes and weight inputs of the head ``MatMul -> Add (-> Relu) ... -> Softmax``."""
    nodes, inputs, tensors = [], [], []
    h = head_input
    count = len(layer_sizes) - 1
    for i, (d_in, d_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:]), start=1):
        W, b = f"W{i}", f"b{i}"
        inputs += [helper.make_tensor_value_info(W, TensorProto.FLOAT, [d_in, d_out]),
                   helper.make_tensor_value_info(b, TensorProto.FLOAT, [d_out])]
        tensors += [TensorSpec(W, (d_in, d_out)), TensorSpec(b, (d_out,))]
        nodes.append(helper.make_node("MatMul", [h, W], [f"matmul{i}"]))
        out = f"logits{i}" if i == count else f"pre{i}"
        nodes.append(helper.make_node("Add", [f"matmul{i}", b], [out]))
        if i < count:
            nodes.append(helper.make_node("Relu", [out], [f"hidden{i}"]))
            h = f"hidden{i}"
        else:
            nodes.append(helper.make_node("Softmax", [out], [OUTPUT_NAME], axis=-1))
    return nodes, inputs, tensors


def _static_width(value_info, what: str) -> int:
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value"):
        raise ValueError(f"the extractor's {what} {value_info.name!r} must have shape "
                         "(batch, width) with a fixed width")
    return dims[1].dim_value


def _splice_extractor(extractor):
    """The extractor's nodes and initializers, renamed so its input is ``x`` and output ``features``.

    Every other name gets the ``extractor/`` prefix so it cannot collide with the head's names.
    """
    proto = onnx.load_from_string(extractor) if isinstance(extractor, (bytes, bytearray)) \
        else extractor
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    if len(real_inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"an extractor needs exactly one input and one output, got "
                         f"{len(real_inputs)} and {len(graph.output)}")
    in_name, out_name = real_inputs[0].name, graph.output[0].name
    in_width = _static_width(real_inputs[0], "input")
    out_width = _static_width(graph.output[0], "output")

    def rename(name: str) -> str:
        if name == in_name:
            return INPUT_NAME
        if name == out_name:
            return FEATURES_NAME
        return _EXTRACTOR_PREFIX + name if name else name

    nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.ClearField("input")
        copy.ClearField("output")
        copy.input.extend(rename(n) for n in node.input)
        copy.output.extend(rename(n) for n in node.output)
        copy.name = rename(node.name) if node.name else ""
        nodes.append(copy)
    initializers = []
    for t in graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = rename(t.name)
        initializers.append(copy)
    opsets = {o.domain: o.version for o in proto.opset_import}
    return nodes, initializers, in_width, out_width, opsets


def build_mlp(layer_sizes=(64, 32, 10), *, seed: int = 0, extractor=None) -> Model:
    """Version 0 of a dense-head model: the ONNX graph, its manifest and initial weights.

    Parameters
    ----------
    layer_sizes : sequence of int
        ``(d_in, hidden..., num_classes)``; two entries make softmax regression. With an
        extractor, ``d_in`` is the width of the extractor's output.
    seed : int
        Seed of the weight initialisation.
    extractor : onnx.ModelProto or bytes, optional
        A frozen feature extractor with one input ``(batch, width)`` and one output
        ``(batch, layer_sizes[0])``; its weights are initializers and are never trained.

    Returns
    -------
    Model
        ``version=0, round_id=0``; the graph outputs ``probabilities`` (softmax of the logits)
        and, with an extractor, ``features``.
    """
    layer_sizes = tuple(int(s) for s in layer_sizes)
    if len(layer_sizes) < 2 or min(layer_sizes) < 1:
        raise ValueError(f"layer_sizes {layer_sizes} must list an input width and at least one "
                         "layer, all positive")
    nodes, initializers, opsets = [], [], {"": OPSET}
    input_width, outputs = layer_sizes[0], []
    if extractor is not None:
        nodes, initializers, input_width, out_width, ex_opsets = _splice_extractor(extractor)
        if out_width != layer_sizes[0]:
            raise ValueError(f"the extractor outputs {out_width} features but the head takes "
                             f"{layer_sizes[0]}")
        if ex_opsets.get("", OPSET) > OPSET:
            raise ValueError(f"the extractor needs opset {ex_opsets['']}, above {OPSET}")
        opsets.update({d: v for d, v in ex_opsets.items() if d})
        outputs.append(helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT,
                                                     ["batch", layer_sizes[0]]))
    head_nodes, weight_inputs, tensors = _head_nodes(
        layer_sizes, FEATURES_NAME if extractor is not None else INPUT_NAME)
    outputs.insert(0, helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT,
                                                    ["batch", layer_sizes[-1]]))
    graph = helper.make_graph(
        nodes + head_nodes, "edgefl_head",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", input_width])]
        + weight_inputs,
        outputs, initializer=initializers)
    proto = helper.make_model(graph, producer_name="edgefl",
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    blob = proto.SerializeToString()
    manifest = ModelManifest(INPUT_NAME, input_width, OUTPUT_NAME, layer_sizes[-1], tuple(tensors),
                             FEATURES_NAME if extractor is not None else "")
    weights = manifest.flatten(init_weights(layer_sizes, seed))
    return Model(0, 0, manifest, weights, blob, hashlib.sha256(blob).digest())


def dense_extractor(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """A frozen extractor ``relu(x @ weight + bias)`` with its weights as initializers.

    A small, real stand-in for a pretrained backbone (tests, demos).
    """
    weight = np.asarray(weight, np.float32)
    bias = np.asarray(bias, np.float32)
    d_in, d_out = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["mm"]),
         helper.make_node("Add", ["mm", "bias"], ["pre"]),
         helper.make_node("Relu", ["pre"], ["output"])],
        "extractor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", d_out])],
        initializer=[numpy_helper.from_array(weight, "weight"),
                     numpy_helper.from_array(bias, "bias")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    return proto
