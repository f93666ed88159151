"""``edgefl model import / inspect / export`` as a user runs them."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefl.cli import main as cli
from edgefl.wire import decode_model

DATA = Path(__file__).parent / "data"


def test_import_inspect_export_of_a_torch_cnn(tmp_path, capsys):
    envelope = tmp_path / "cnn.eflm"
    assert cli.main(["model", "import", str(DATA / "torch_cnn.onnx"), "-o", str(envelope),
                     "--trainable-layers", "1"]) == 0
    assert "head 16-10 (170 trainable parameters)" in capsys.readouterr().out
    model = decode_model(envelope.read_bytes())
    assert model.version == 0 and model.manifest.layer_sizes == (16, 10)

    assert cli.main(["model", "inspect", str(envelope), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["onnx_sha256"] == model.onnx_sha256.hex() and info["signature"] is None
    assert info["head"]["trainable_params"] == 170
    assert info["extractor"]["operators"] == {"Conv": 1, "Relu": 2, "Reshape": 2, "Gemm": 1}
    assert cli.main(["model", "inspect", str(envelope)]) == 0
    assert "frozen: 1 Conv, 1 Gemm, 2 Relu, 2 Reshape" in capsys.readouterr().out

    exported = tmp_path / "cnn.onnx"
    assert cli.main(["model", "export", str(envelope), "-o", str(exported)]) == 0
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(DATA / "torch_cnn.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(["logits"], {"image": images})[0],
                               original.run(["logits"], {"image": images})[0],
                               rtol=1e-5, atol=1e-5)  # version 0: the pretrained weights


def test_import_names_the_default_output_next_to_the_input(tmp_path, capsys):
    source = tmp_path / "sk_mlp.onnx"
    source.write_bytes((DATA / "sk_mlp.onnx").read_bytes())
    assert cli.main(["model", "import", str(source)]) == 0
    assert (tmp_path / "sk_mlp.eflm").is_file()
    assert "no frozen extractor" in capsys.readouterr().out


def test_refusals_exit_2_with_the_reason(tmp_path, capsys):
    assert cli.main(["model", "import", str(DATA / "torch_two_inputs.onnx"),
                     "-o", str(tmp_path / "x.eflm")]) == 2
    assert "2 inputs ('a', 'b')" in capsys.readouterr().err
    assert not (tmp_path / "x.eflm").exists()
    assert cli.main(["model", "export", str(tmp_path), "-o", str(tmp_path / "y.onnx")]) == 2
    assert "not a server state directory" in capsys.readouterr().err


def test_inspect_shows_and_verifies_the_servers_signature(tmp_path, capsys):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgefl.trust.keys import key_id, raw_public
    from edgefl.trust.signing import Signer
    from edgefl.wire import encode_model
    from edgefl_server.onnx_import import import_onnx

    key = Ed25519PrivateKey.generate()
    frame = Signer(key, "plant-7").sign("model", encode_model(import_onnx(DATA / "keras_mlp.onnx")))
    path = tmp_path / "model.msg"
    path.write_bytes(frame)
    assert cli.main(["model", "inspect", str(path), "--json"]) == 0
    signed = json.loads(capsys.readouterr().out)["signed"]
    assert signed["key_id"] == key_id(key).hex() and signed["fleet"] == "plant-7"
    assert signed["verified"] is None
    assert cli.main(["model", "inspect", str(path), "--public-key", raw_public(key).hex()]) == 0
    assert "(verified)" in capsys.readouterr().out
    other = raw_public(Ed25519PrivateKey.generate()).hex()
    assert cli.main(["model", "inspect", str(path), "--public-key", other]) == 2
    assert "not from this fleet's server" in capsys.readouterr().err
    exported = tmp_path / "model.onnx"
    assert cli.main(["model", "export", str(path), "-o", str(exported)]) == 0
    assert exported.stat().st_size > 0
