"""``edgefl model``: bring your own ONNX model in, look at a model, get the federated one out.

* ``edgefl model import MODEL.onnx`` makes an edgefl model envelope (version 0, the head's
  pretrained weights) from a PyTorch, TensorFlow/Keras or scikit-learn export;
* ``edgefl model inspect FILE`` prints what a model is: input, classes, trainable head,
  frozen extractor, version, hash, signature;
* ``edgefl model export SOURCE -o OUT.onnx`` writes a standalone ONNX file with the current
  global weights baked in, for stock onnxruntime (SOURCE: a server state directory or an
  envelope).

These need the server's dependencies (``onnx``): ``pip install 'edgefl[server]'``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgefl.trust.errors import TrustError
from edgefl.trust.keys import signing_public_key
from edgefl.trust.signing import MAGIC, open_signed, parse_signed
from edgefl.wire import encode_model
from edgefl_server.onnx_export import describe, export_onnx
from edgefl_server.onnx_import import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = commands.add_parser("import", help="make an edgefl model envelope from an .onnx file",
                              description="Make an edgefl model envelope from an ONNX classifier "
                                          "(torch.onnx.export, tf2onnx, skl2onnx). Its trailing "
                                          "dense layers train, the rest stays frozen.")
    imp.add_argument("onnx", metavar="MODEL.onnx")
    imp.add_argument("-o", "--output", metavar="FILE",
                     help="envelope to write (default MODEL.eflm next to the input)")
    imp.add_argument("--trainable-layers", type=int, metavar="N",
                     help="how many trailing dense layers train (1 = last-layer fine-tuning; "
                          "default: every dense layer at the end)")
    inspect = commands.add_parser("inspect", help="print a model's manifest, head, extractor, "
                                                  "version and hash")
    inspect.add_argument("source", metavar="FILE|STATE_DIR",
                         help="a model envelope, a plain .onnx (shown as it would be imported) "
                              "or a server state directory")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--public-key", metavar="HEX",
                         help="for a signed model message: verify it with the server's signing "
                              "public key (64 hex digits, from the fleet's device bundle)")
    export = commands.add_parser("export", help="write the global model as a standalone .onnx",
                                 description="Write a standalone ONNX file with the model's "
                                             "current weights baked in; it keeps the original "
                                             "input and output names of an imported model.")
    export.add_argument("source", metavar="STATE_DIR|ENVELOPE")
    export.add_argument("-o", "--output", required=True, metavar="OUT.onnx")


def main(argv) -> int:
    """``edgefl model ARGS``: 0 on success, 2 for a model or file edgefl cannot use."""
    parser = argparse.ArgumentParser(prog="edgefl model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    """0 on success, 2 for a model or file edgefl cannot use (the message says why)."""
    try:
        if args.action == "import":
            source = Path(args.onnx)
            model = load_model(source, trainable_layers=args.trainable_layers)
            out = Path(args.output) if args.output else source.with_suffix(".eflm")
            out.write_bytes(encode_model(model))
            print(f"wrote {out}: {_summary(describe(model))}")
        elif args.action == "inspect":
            info = describe(load_model(args.source))
            info["signed"] = _signature(Path(args.source), args.public_key)
            print(json.dumps(info, indent=1) if args.json else _report(info))
        else:
            model = load_model(args.source)
            Path(args.output).write_bytes(export_onnx(model))
            print(f"wrote {args.output}: model version {model.version} (round {model.round_id})")
    except (ValueError, OSError) as exc:
        print(f"edgefl model {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0


def _signature(path: Path, public_key: str | None) -> dict | None:
    """Who signed a model message file, and whether ``public_key`` verifies it."""
    if not path.is_file() or path.read_bytes()[:len(MAGIC)] != MAGIC:
        if public_key:
            raise ValueError(f"{path} is not a signed model message: there is no signature to "
                             "verify (an envelope from `edgefl model import` or a state "
                             "directory is unsigned; the server signs what it publishes)")
        return None
    frame = path.read_bytes()
    message, _, _ = parse_signed(frame)
    info = {"fleet": message.fleet, "key_id": message.key_id.hex(),
            "sequence": message.sequence, "issued_at": message.issued_at, "verified": None}
    if public_key:
        try:
            open_signed(frame, signing_public_key(public_key), fleet=message.fleet, kind="model")
        except TrustError as exc:
            raise ValueError(f"{path}: {exc}") from None
        info["verified"] = True
    return info


def _summary(info: dict) -> str:
    head = info["head"]
    frozen = info["extractor"]
    return (f"input {info['input']['name']!r} ({info['input']['width']} values), "
            f"{info['output']['classes']} classes, head {'-'.join(map(str, head['layer_sizes']))} "
            f"({head['trainable_params']} trainable parameters), "
            + (f"frozen extractor of {sum(frozen['operators'].values())} nodes"
               if frozen else "no frozen extractor"))


def _signed_text(signed: dict | None) -> str:
    if signed is None:
        return "no (not a signed model message)"
    state = {None: "not verified: pass --public-key", True: "verified"}[signed["verified"]]
    return (f"by key {signed['key_id']} for fleet {signed['fleet']!r}, sequence "
            f"{signed['sequence']} ({state})")


def _report(info: dict) -> str:
    lines = [f"version     {info['version']} (round {info['round']})",
             f"onnx        {info['onnx_bytes']} bytes, sha256 {info['onnx_sha256']}",
             f"signed      {_signed_text(info['signed'])}",
             f"input       {info['input']['name']!r}, {info['input']['width']} values per sample",
             f"predicts    {info['output']['name']!r}, {info['output']['classes']} classes",
             f"head        {'-'.join(map(str, info['head']['layer_sizes']))}, "
             f"{info['head']['trainable_params']} trainable parameters"]
    frozen = info["extractor"]
    if frozen:
        ops = ", ".join(f"{count} {op}" for op, count in sorted(frozen["operators"].items()))
        lines.append(f"extractor   frozen: {ops}; {frozen['frozen_float_values']} float values; "
                     f"features {frozen['features']!r} ({frozen['width']} wide)")
    else:
        lines.append("extractor   none (the head reads the samples)")
    lines.append(f"outputs     {', '.join(info['graph_outputs'])}")
    return "\n".join(lines)
