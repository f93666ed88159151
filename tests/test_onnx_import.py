"""Importing real exports (tests/data/*.onnx, made by tests/fixtures/make_onnx_fixtures.py with
torch.onnx.export, tf2onnx and skl2onnx): the head found, frozen, refused with a reason."""
import numpy as np
import onnx
import pytest
from exported_models import DATA, EXPORTS, Original, as_array, digits_like

from edgefl.device.predictor import Predictor
from edgefl.wire import decode_model, encode_model
from edgefl_server.onnx_import import ImportRefused, import_onnx, load_model

@pytest.fixture(scope="module")
def samples():
    with np.load(DATA / "onnx_fixtures.npz") as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_a_fixture_is_what_its_framework_computed(name, samples):
    """Guards the fixtures themselves: onnxruntime on the file gives the framework's outputs."""
    original = Original((DATA / f"{name}.onnx").read_bytes())
    outputs = original.run(samples["x"])
    keys = [k for k in samples if k.startswith(name + ":")]
    assert keys
    for key in keys:
        output = key.split(":")[1]
        got = outputs[output]
        want = samples[key]
        if want.dtype.kind in "iu":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(as_array(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_imported_model_predicts_what_the_original_file_predicts(name, samples):
    blob = (DATA / f"{name}.onnx").read_bytes()
    model = import_onnx(blob)
    prob_name, label_name = EXPORTS[name]
    original = Original(blob)
    x = np.concatenate([samples["x"], digits_like(20, 1)])
    predictor = Predictor(decode_model(encode_model(model)))  # as a device receives it
    np.testing.assert_allclose(predictor.predict(x), original.probabilities(x, prob_name),
                               rtol=1e-5, atol=1e-6)
    assert model.version == 0 and model.round_id == 0
    if label_name:
        np.testing.assert_array_equal(predictor.predict(x).argmax(1), original.run(x)[label_name])


def test_the_heads_pretrained_weights_are_version_0():
    proto = onnx.load(DATA / "torch_mlp.onnx")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = import_onnx(proto)
    (W1, b1), (W2, b2) = model.manifest.layers(model.weights)
    np.testing.assert_array_equal(W1, weights["hidden.weight"].T)  # torch stores (out, in)
    np.testing.assert_array_equal(b1, weights["hidden.bias"])
    np.testing.assert_array_equal(W2, weights["out.weight"].T)
    np.testing.assert_array_equal(b2, weights["out.bias"])
    assert model.manifest.features_name == ""  # an MLP is all head: nothing frozen


def test_cnn_trains_its_dense_head_on_the_frozen_convolution():
    model = import_onnx(DATA / "torch_cnn.onnx")
    assert model.manifest.layer_sizes == (144, 16, 10)
    assert model.manifest.input_width == 64  # devices feed flat 1x8x8 images
    assert model.manifest.features_name  # the conv's flattened output
    one = import_onnx(DATA / "torch_cnn.onnx", trainable_layers=1)
    assert one.manifest.layer_sizes == (16, 10)  # fc1 joined the frozen part
    x = digits_like(8, 4)
    np.testing.assert_allclose(Predictor(one).predict(x), Predictor(model).predict(x),
                               rtol=1e-5, atol=1e-6)
    features = Predictor(one).features(x)
    assert features.shape == (8, 16) and (features >= 0).all()  # after fc1's Relu


def test_refuses_a_model_whose_tail_is_a_convolution():
    with pytest.raises(ImportRefused, match=r"node 'node_conv2d' \(Conv\).*Add a dense"):
        import_onnx(DATA / "torch_conv_tail.onnx")


def test_refuses_two_inputs():
    with pytest.raises(ImportRefused, match=r"2 inputs \('a', 'b'\).*one tensor"):
        import_onnx(DATA / "torch_two_inputs.onnx")


def test_refuses_a_dynamic_feature_width():
    proto = onnx.load(DATA / "torch_mlp.onnx")
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "width"
    with pytest.raises(ImportRefused, match=r"dynamic feature width \(axis 1 is 'width'\).*"
                                            r"only the batch axis dynamic"):
        import_onnx(proto)


def test_refuses_more_trainable_layers_than_the_head_has():
    with pytest.raises(ImportRefused, match="only 2 dense layer.*at most 2"):
        import_onnx(DATA / "torch_cnn.onnx", trainable_layers=3)
    with pytest.raises(ImportRefused, match="positive integer"):
        import_onnx(DATA / "torch_cnn.onnx", trainable_layers=0)


def test_refuses_bytes_that_are_not_onnx():
    with pytest.raises(ImportRefused, match="not an ONNX model"):
        import_onnx(b"EFLU this is no model")


def test_load_model_tells_envelopes_from_onnx_and_says_what_is_missing(tmp_path):
    envelope = tmp_path / "cnn.eflm"
    imported = import_onnx(DATA / "torch_cnn.onnx")
    envelope.write_bytes(encode_model(imported))
    assert load_model(envelope).onnx_sha256 == imported.onnx_sha256
    assert load_model(DATA / "torch_cnn.onnx").onnx_sha256 == imported.onnx_sha256
    with pytest.raises(ValueError, match="already imported"):
        load_model(envelope, trainable_layers=1)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="not a server state directory"):
        load_model(tmp_path)


def test_weights_in_an_external_data_file_are_loaded_from_next_to_the_model(tmp_path,
                                                                            monkeypatch):
    """torch.onnx.export writes MODEL.onnx.data beside MODEL.onnx by default."""
    proto = onnx.load(DATA / "torch_mlp.onnx")
    onnx.save(proto, tmp_path / "model.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert (tmp_path / "model.onnx.data").stat().st_size > 4 * 64 * 24  # the weights live there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    np.testing.assert_array_equal(load_model(tmp_path / "model.onnx").weights,
                                  import_onnx(DATA / "torch_mlp.onnx").weights)


def test_refuses_a_linear_classifier_it_cannot_rewrite_and_says_which():
    proto = onnx.load(DATA / "sk_logreg.onnx")
    node = next(n for n in proto.graph.node if n.op_type == "LinearClassifier")
    for attribute in node.attribute:
        if attribute.name == "post_transform":
            attribute.s = b"LOGISTIC"  # what a one-vs-rest export carries
    with pytest.raises(ImportRefused, match=r"node 'LinearClassifier' \(LinearClassifier\) has "
                                            r"post_transform 'LOGISTIC'.*multinomial"):
        import_onnx(proto)
