"""A user's own ONNX model made federated: find its dense head, freeze the rest, export it back.

:func:`import_onnx` takes a graph as ``torch.onnx.export``, tf2onnx and skl2onnx write it and
rewrites it into an edgefl model: the trailing dense layers (``Gemm``, or ``MatMul`` + ``Add``,
with ``Relu`` between) become the trainable head, whose tensors turn into graph inputs that the
device feeds each round's weights to, starting from their pretrained values (version 0);
everything before the head stays in the graph as the frozen extractor, with its weights as
initializers, and its output (the head's input) becomes the extra ``features`` output the device
trains on. The input and the original outputs keep their names, so an application that called the
original model calls the federated one unchanged; what follows the head (``Softmax``, a label
``ArgMax``, skl2onnx's ``ZipMap`` of probabilities) is kept as it was.

:func:`load_model` reads whatever a user names as a model (an ``.onnx``, an envelope, a server
state directory); :mod:`~edgefl_server.onnx_export` is the way back out.

Server and tools only: devices never import ``onnx``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgefl.wire.model import Model, ModelManifest, TensorSpec
from edgefl.trust.signing import MAGIC as SIGNED_MAGIC
from edgefl.trust.signing import parse_signed
from edgefl.wire import MODEL_MAGIC, decode_model

from .store import StateError, read_latest_model

#: Graph metadata key: the original graph's output names and its input's shape (JSON), which
#: :func:`export_onnx` restores.
ORIGIN_KEY = "edgefl.origin"
#: Prefix of every name the import adds to a graph.
PREFIX = "edgefl/"
#: Operators allowed between the head's logits and the graph outputs.
TAIL_OPS = {"Softmax", "ArgMax", "ZipMap", "ArrayFeatureExtractor", "Reshape", "Cast",
            "Identity", "Normalizer", "Gather", "Flatten"}
#: What an import can take as the head, for error messages.
SUPPORTED = ("edgefl trains the dense layers at the end of a model: Gemm, or MatMul followed by "
             "Add, with Relu between them, ending in logits, a Softmax, or an exporter's label and "
             "probability outputs (skl2onnx's ArgMax/ZipMap, LinearClassifier)")


class ImportRefused(ValueError):
    """An ONNX graph edgefl cannot fine-tune as it is; the message says what to change."""


@dataclass(frozen=True)
class _Layer:
    """One dense layer of the head as found in the graph."""

    nodes: tuple  # the NodeProtos it replaces (Gemm, or MatMul and Add)
    input: str
    output: str
    weight: np.ndarray  # (d_in, d_out), edgefl's layout
    bias: np.ndarray  # (d_out,)


def load_onnx(source) -> onnx.ModelProto:
    """An ``onnx.ModelProto`` from a proto, serialized bytes or a file path, checked by onnx."""
    if isinstance(source, onnx.ModelProto):
        proto = source
    else:
        try:
            proto = (onnx.load_from_string(bytes(source)) if isinstance(source, (bytes, bytearray))
                     else onnx.load(str(source)))
        except Exception as exc:  # protobuf's DecodeError and onnx's own errors
            raise ImportRefused(f"not an ONNX model ({exc})") from None
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ImportRefused(f"the ONNX checker refuses the model: {exc}") from None
    return proto


def import_onnx(source, *, trainable_layers: int | None = None) -> Model:
    """Version 0 of an edgefl model made from an exported ONNX classifier.

    Parameters
    ----------
    source : onnx.ModelProto, bytes or path
        The model as an exporter wrote it.
    trainable_layers : int, optional
        How many trailing dense layers train (1 = only the last layer); the layers before them
        join the frozen extractor. Default: every dense layer of the trailing run.

    Returns
    -------
    Model
        ``version=0, round_id=0``, the head's pretrained weights as the weights. Its graph gives
        the same outputs as the original for the same input (checked with onnxruntime before it
        is returned).

    Raises
    ------
    ImportRefused
        For a graph with other than one float input, a dynamic feature width, a tail that is
        not a dense head, or more trainable layers asked for than there are; the message names
        the input or node and what to do.
    """
    if trainable_layers is not None and (isinstance(trainable_layers, bool)
                                         or not isinstance(trainable_layers, int)
                                         or trainable_layers < 1):
        raise ImportRefused(f"trainable_layers must be a positive integer, got "
                            f"{trainable_layers!r}")
    original = load_onnx(source)
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    graph = proto.graph
    graph_input, shape = _single_input(graph)
    _expand_linear_classifiers(graph)
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    logits = _find_logits(graph, producers, initializers)
    layers = _find_head(logits, producers, consumers, initializers, {o.name for o in graph.output},
                        trainable_layers)
    head_input = layers[0].input
    head_nodes = {id(n) for layer in layers for n in layer.nodes}
    for layer in layers[:-1]:  # the Relu between layers goes with the head too
        head_nodes.add(id(producers[_relu_of(layer.output, consumers).output[0]]))

    input_width = math.prod(shape[1:])
    new_nodes, new_inits, feed_name = [], [], graph_input.name
    if len(shape) > 2:
        # Devices feed flat samples (batch, width); a Reshape in front restores the model's shape.
        feed_name = PREFIX + "input_unflattened"
        new_inits.append(numpy_helper.from_array(np.array((-1,) + shape[1:], np.int64),
                                                 PREFIX + "input_shape"))
        new_nodes.append(helper.make_node("Reshape", [graph_input.name, PREFIX + "input_shape"],
                                          [feed_name], name=PREFIX + "unflatten_input"))
    before_head = ancestors(head_input, producers)
    kept = [n for n in graph.node if id(n) not in head_nodes]
    extractor = [n for n in kept if id(n) in before_head]
    tail = [n for n in kept if id(n) not in before_head]

    tensors, weight_inputs, head, weights = [], [], [], []
    h = head_input if head_input != graph_input.name else feed_name
    for i, layer in enumerate(layers, start=1):
        W, b = f"{PREFIX}W{i}", f"{PREFIX}b{i}"
        d_in, d_out = layer.weight.shape
        tensors += [TensorSpec(W, (d_in, d_out)), TensorSpec(b, (d_out,))]
        weight_inputs += [helper.make_tensor_value_info(W, TensorProto.FLOAT, [d_in, d_out]),
                          helper.make_tensor_value_info(b, TensorProto.FLOAT, [d_out])]
        weights += [(layer.weight, layer.bias)]
        last = i == len(layers)
        out = layer.output if last else f"{PREFIX}pre{i}"
        head.append(helper.make_node("MatMul", [h, W], [f"{PREFIX}matmul{i}"],
                                     name=f"{PREFIX}matmul{i}"))
        head.append(helper.make_node("Add", [f"{PREFIX}matmul{i}", b], [out], name=f"{PREFIX}add{i}"))
        if not last:
            h = f"{PREFIX}hidden{i}"
            head.append(helper.make_node("Relu", [out], [h], name=f"{PREFIX}relu{i}"))

    for node in extractor + tail:
        for j, name in enumerate(node.input):
            if name == graph_input.name:
                node.input[j] = feed_name
    num_classes = layers[-1].weight.shape[1]
    probabilities = _probabilities_of(logits, consumers, head_nodes)
    if probabilities is None:
        probabilities = PREFIX + "probabilities"
        tail.append(helper.make_node("Softmax", [logits], [probabilities], axis=-1,
                                     name=PREFIX + "softmax"))
    used = {n for node in extractor + tail for n in node.input}
    keep_inits = [t for t in graph.initializer if t.name in used]
    origin = {"outputs": [o.name for o in graph.output],
              "input_shape": [d if isinstance(d, int) else None for d in _dims(graph_input)]}
    outputs = list(graph.output)
    extra = [(probabilities, [None, num_classes])]
    features_name = ""
    if head_input != graph_input.name and not _is_identity(extractor, len(shape)):
        features_name = head_input
        extra.append((head_input, [None, layers[0].weight.shape[0]]))
    names = {o.name for o in outputs}
    for name, dims in extra:
        if name not in names:
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    flat_input = helper.make_tensor_value_info(graph_input.name, TensorProto.FLOAT,
                                               [None, input_width])
    del graph.node[:]
    graph.node.extend(new_nodes + extractor + head + tail)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits + new_inits)
    del graph.input[:]
    graph.input.extend([flat_input] + weight_inputs)
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.value_info[:]  # intermediate shapes of the original (some fix the batch at 1)
    _set_metadata(proto, ORIGIN_KEY, json.dumps(origin))
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:  # a graph construct this import does not know
        raise ImportRefused(f"the rewritten graph does not pass the ONNX checker ({exc}); "
                            f"{SUPPORTED}") from None
    blob = proto.SerializeToString()
    manifest = ModelManifest(graph_input.name, input_width, probabilities, num_classes,
                             tuple(tensors), features_name)
    model = Model(0, 0, manifest, manifest.flatten(weights), blob, hashlib.sha256(blob).digest())
    _check_same_outputs(original, model, shape)
    return model


def _is_identity(extractor, rank: int) -> bool:
    """Whether the frozen part only passes the float input on (skl2onnx's Cast to float).

    Then the head reads the samples themselves and the device needs no features output.
    """
    return rank == 2 and all(
        n.op_type == "Identity" or (n.op_type == "Cast" and any(
            a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute))
        for n in extractor)


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def _single_input(graph) -> tuple:
    """The graph's one float input and its shape ``(batch, fixed dims...)``."""
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ImportRefused(
            f"the model has {len(inputs)} inputs ({', '.join(repr(i.name) for i in inputs)}): "
            "edgefl feeds one sample tensor; export a model whose forward takes one tensor "
            "(for example concatenate the inputs into one before exporting)")
    value = inputs[0]
    if value.type.WhichOneof("value") != "tensor_type" \
            or value.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ImportRefused(f"input {value.name!r} is not a float32 tensor: export the model "
                            "with float32 inputs")
    dims = _dims(value)
    if len(dims) < 2:
        raise ImportRefused(f"input {value.name!r} has shape {dims}: edgefl needs a batch axis "
                            "first and the features after it, e.g. (batch, 64)")
    for axis, d in enumerate(dims[1:], start=1):
        if not isinstance(d, int) or d < 1:
            raise ImportRefused(
                f"input {value.name!r} has a dynamic feature width (axis {axis} is {d!r}): "
                "edgefl needs the width of a sample fixed; export with only the batch axis "
                "dynamic (torch.onnx.export(..., dynamic_shapes=({0: batch},)) or "
                "dynamic_axes={name: {0: 'batch'}})")
    return value, tuple(dims[:1]) + tuple(dims[1:])


def _expand_linear_classifiers(graph) -> None:
    """Replace skl2onnx's ``LinearClassifier`` by the same computation in standard operators.

    ``MatMul + Add`` give the scores (a dense layer the head finder then sees), ``Softmax`` the
    probabilities when the classifier applies it, ``ArgMax + Gather`` over the class labels the
    label output: so the same two outputs come out, and the layer can train.
    """
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "LinearClassifier":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        labels = attrs.get("classlabels_ints")
        post = attrs.get("post_transform", b"NONE").decode()
        if not labels or post not in ("NONE", "SOFTMAX"):
            raise ImportRefused(
                f"node {node.name!r} (LinearClassifier) has post_transform {post!r} and "
                f"{'integer' if labels else 'string'} class labels: edgefl imports a multi-class "
                "LinearClassifier with integer labels and softmax or raw scores; train a "
                "multinomial LogisticRegression (scikit-learn's default for three or more "
                "classes) on integer labels 0..K-1 and export it again")
        classes = len(labels)
        coef = np.asarray(attrs["coefficients"], np.float32)
        if coef.size % classes:
            raise ImportRefused(f"node {node.name!r} (LinearClassifier): {coef.size} "
                                f"coefficients do not split into {classes} classes")
        coef = coef.reshape(classes, -1)
        intercepts = np.asarray(attrs.get("intercepts", np.zeros(classes)), np.float32)
        tag = PREFIX + (node.name or f"linear_classifier{index}")
        label, probabilities = (list(node.output) + [""])[:2]
        scores = tag + "/scores"
        replacement = [
            helper.make_node("MatMul", [node.input[0], tag + "/coefficients"], [tag + "/mm"],
                             name=tag + "/matmul"),
            helper.make_node("Add", [tag + "/mm", tag + "/intercepts"], [scores],
                             name=tag + "/add"),
            helper.make_node("ArgMax", [scores], [tag + "/argmax"], axis=1, keepdims=0,
                             name=tag + "/argmax"),
            helper.make_node("Gather", [tag + "/classes", tag + "/argmax"], [label], axis=0,
                             name=tag + "/label"),
        ]
        if probabilities:
            replacement.append(helper.make_node("Softmax", [scores], [probabilities], axis=-1,
                                                name=tag + "/softmax") if post == "SOFTMAX"
                               else helper.make_node("Identity", [scores], [probabilities],
                                                     name=tag + "/scores_out"))
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(coef.T), tag + "/coefficients"),
            numpy_helper.from_array(intercepts, tag + "/intercepts"),
            numpy_helper.from_array(np.asarray(labels, np.int64), tag + "/classes")])
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(position + offset, new)


def _dense_output(name: str, producers, initializers) -> _Layer | None:
    """The dense layer whose output is ``name`` (Gemm, or Add of a MatMul), or None."""
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 \
                or attrs.get("transA", 0) or node.input[1] not in initializers \
                or (len(node.input) > 2 and node.input[2] and node.input[2] not in initializers):
            return None
        W = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            W = W.T
        b = (numpy_helper.to_array(initializers[node.input[2]])
             if len(node.input) > 2 and node.input[2] else np.zeros(W.shape[1], np.float32))
        return _layer((node,), node.input[0], name, W, b)
    if node.op_type == "Add" and len(node.input) == 2:
        for mm_name, bias_name in (node.input, node.input[::-1]):
            mm = producers.get(mm_name)
            if mm is not None and mm.op_type == "MatMul" and mm.input[1] in initializers \
                    and bias_name in initializers:
                return _layer((mm, node), mm.input[0], name,
                              numpy_helper.to_array(initializers[mm.input[1]]),
                              numpy_helper.to_array(initializers[bias_name]))
    return None


def _layer(nodes, input_name, output, W, b) -> _Layer | None:
    if W.ndim != 2 or W.dtype != np.float32 or b.dtype != np.float32 or b.size != W.shape[1] \
            or b.squeeze().ndim > 1:
        return None
    return _Layer(tuple(nodes), input_name, output, np.ascontiguousarray(W),
                  np.ascontiguousarray(b.reshape(-1)))


def _find_logits(graph, producers, initializers) -> str:
    """The one tensor all outputs derive from through :data:`TAIL_OPS`: the head's output."""
    found, seen = set(), set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if _dense_output(name, producers, initializers) is not None:
            found.add(name)
            continue
        node = producers.get(name)
        if node is None:
            raise ImportRefused(f"output {name!r} comes straight from the input: there is no "
                                f"layer to train; {SUPPORTED}")
        if node.op_type not in TAIL_OPS:
            raise ImportRefused(f"node {node.name!r} ({node.op_type}) produces {name!r} at the "
                                f"end of the model, after the last dense layer: {SUPPORTED}. "
                                "Add a dense (Linear/Dense) layer as the model's last layer, "
                                "or export it without the trailing operators")
        stack.extend(n for n in node.input if n and n not in initializers)
    if len(found) != 1:
        raise ImportRefused(f"the outputs come from {len(found)} different dense layers "
                            f"({sorted(found)}): edgefl trains one head; {SUPPORTED}")
    return found.pop()


def _relu_of(name: str, consumers):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == "Relu" else None


def _find_head(logits, producers, consumers, initializers, outputs, wanted) -> list[_Layer]:
    """The trailing dense layers ending in ``logits``, first to last (``wanted`` of them)."""
    layers = [_dense_output(logits, producers, initializers)]
    while wanted is None or len(layers) < wanted:
        relu = producers.get(layers[0].input)
        if relu is None or relu.op_type != "Relu" or relu.input[0] in outputs \
                or layers[0].input in outputs or len(consumers.get(layers[0].input, [])) != 1:
            break
        previous = _dense_output(relu.input[0], producers, initializers)
        # A layer whose output feeds anything but its Relu (a skip connection) stays frozen.
        if previous is None or _relu_of(previous.output, consumers) is not relu:
            break
        inner = [n for n in previous.nodes if n.op_type == "MatMul"]
        if inner and len(consumers.get(inner[0].output[0], [])) != 1:
            break
        layers.insert(0, previous)
    if wanted is not None and len(layers) < wanted:
        raise ImportRefused(f"--trainable-layers {wanted}: the model ends in only {len(layers)} "
                            f"dense layer(s) with Relu between them; ask for at most "
                            f"{len(layers)}")
    for layer in layers:
        for node in layer.nodes:
            if node.op_type == "MatMul" and len(consumers.get(node.output[0], [])) != 1:
                raise ImportRefused(f"node {node.name!r} (MatMul) feeds more than its Add: "
                                    f"{SUPPORTED}")
    return layers


def _probabilities_of(logits, consumers, head_nodes) -> str | None:
    """The output of a Softmax over the class axis applied to ``logits``, if the graph has one."""
    for node in consumers.get(logits, []):
        if node.op_type == "Softmax" and id(node) not in head_nodes:
            axis = next((helper.get_attribute_value(a) for a in node.attribute
                         if a.name == "axis"), -1)
            if axis in (-1, 1):
                return node.output[0]
    return None


def ancestors(name: str, producers) -> set:
    """ids of the nodes ``name`` is computed from."""
    out, stack = set(), [name]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in out:
            out.add(id(node))
            stack.extend(node.input)
    return out


def _set_metadata(proto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    proto.metadata_props.add(key=key, value=value)


def _check_same_outputs(original: onnx.ModelProto, model: Model, shape: tuple) -> None:
    """Refuse an import whose graph does not compute what the original computes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, model.manifest.input_width)).astype(np.float32)
    want_session = ort.InferenceSession(original.SerializeToString(),
                                        providers=["CPUExecutionProvider"])
    names = [o.name for o in want_session.get_outputs()]
    want = want_session.run(names, {want_session.get_inputs()[0].name: x.reshape((3,) + shape[1:])})
    got = run_model(model, x, names)
    for name, a, b in zip(names, want, got):
        if not _outputs_close(a, b):
            raise ImportRefused(f"the imported graph's output {name!r} differs from the "
                                f"original's: {SUPPORTED}")


def run_model(model: Model, x: np.ndarray, outputs=None) -> list:
    """Run ``model``'s graph with its weights on flat samples ``x`` (onnxruntime, for checks)."""
    session = ort.InferenceSession(model.onnx, providers=["CPUExecutionProvider"])
    feeds = {spec.name: view for spec, view in
             zip(model.manifest.tensors, model.manifest.tensor_views(model.weights))}
    feeds[model.manifest.input_name] = np.ascontiguousarray(x, np.float32)
    return session.run(outputs, feeds)


def _outputs_close(a, b) -> bool:
    if isinstance(a, list):  # ZipMap: a list of {class: probability}
        return len(a) == len(b) and all(
            x.keys() == y.keys() and np.allclose(list(x.values()), list(y.values()), rtol=1e-5,
                                                 atol=1e-6) for x, y in zip(a, b))
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "iub":
        return a.shape == b.shape and np.array_equal(a, b)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6)


def load_model(path, *, trainable_layers: int | None = None) -> Model:
    """The model a user names: a plain ``.onnx`` (imported), a model envelope (also inside a
    signed model message, whose signature is not checked here), or a server state directory
    (its newest global model).

    Raises
    ------
    ValueError
        :class:`ImportRefused`, ``ModelDecodeError`` or ``StateError``'s message, naming what
        is wrong with the file and what to do.
    """
    path = Path(path)
    if path.is_dir():
        try:
            return read_latest_model(path)
        except StateError as exc:
            raise ValueError(str(exc)) from None
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give an .onnx file, a model envelope or a "
                         "server state directory")
    data = path.read_bytes()
    if data[:len(SIGNED_MAGIC)] == SIGNED_MAGIC:  # a model message as the server published it
        message, _, _ = parse_signed(data)
        if message.kind != "model":
            raise ValueError(f"{path} is a signed {message.kind} message, not a model")
        data = message.payload
    if data[:len(MODEL_MAGIC)] == MODEL_MAGIC:
        if trainable_layers is not None:
            raise ValueError(f"{path} is an edgefl model envelope, already imported: "
                             "--trainable-layers applies to a plain .onnx file")
        return decode_model(data, max_bytes=max(len(data), 1))
    try:
        # From the path, not the bytes: onnx then also loads weights kept in external data
        # files next to it (torch.onnx.export writes MODEL.onnx.data by default).
        return import_onnx(path, trainable_layers=trainable_layers)
    except ImportRefused as exc:
        raise ImportRefused(f"{path}: {exc}") from None
