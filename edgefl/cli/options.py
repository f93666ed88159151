"""Option helpers every ``edgefl`` subcommand shares: options from the environment, logging,
number types, the training a round announces, and ``KEY=VALUE`` strategy options.

Every option can also come from an environment variable, named in its ``--help`` line (for
example ``EDGEFL_BROKER``), so a device's service file or container needs no arguments at all. A
command-line value wins over the environment.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from edgefl.wire.protocol import MECHANISMS, TrainingConfig

_TRUE = ("1", "true", "yes", "on")


def env_option(parser, *flags, env: str, help: str, default=None, required=False, **kwargs):
    """Add an option whose default comes from the environment variable ``env``.

    A string from the environment goes through the option's ``type`` like a command-line value,
    so a bad value gets argparse's usual error naming the option.
    """
    value = os.environ.get(env)
    if kwargs.get("action") == "store_true":
        default = value.strip().lower() in _TRUE if value is not None else bool(default)
    elif value is not None:
        default = value
    if required and default is None:
        kwargs["required"] = True
    parser.add_argument(*flags, default=default, help=f"{help} [env {env}]", **kwargs)


def add_logging_option(parser) -> None:
    env_option(parser, "--log-level", env="EDGEFL_LOG_LEVEL", default="INFO",
               choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def mechanism_list(text: str) -> tuple[str, ...]:
    """Parse ``M1,M2``: privacy mechanism names this version implements."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give mechanisms from {', '.join(MECHANISMS)}")
    return names


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or a positive number")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1], such as the density of a sparsified update."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number in (0, 1]")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a port in 0..65535")
    return value


# -- the training a round announces (edgefl server, edgefl simulate) -----------------------------

def add_training_arguments(parser, title: str, defaults) -> None:
    """Options for the :class:`~edgefl.wire.protocol.TrainingConfig` announced to devices.

    ``defaults`` is the TrainingConfig whose values the options default to, so each command
    chooses its own starting point without restating the options.
    """
    privacy, compression = defaults.privacy, defaults.compression
    train = parser.add_argument_group(title)
    env_option(train, "--epochs", env="EDGEFL_EPOCHS", type=int, default=defaults.epochs,
               help="local epochs")
    env_option(train, "--batch-size", env="EDGEFL_BATCH_SIZE", type=int,
               default=defaults.batch_size, help="local minibatch size")
    env_option(train, "--lr", env="EDGEFL_LR", type=positive_float, default=defaults.lr,
               help="local learning rate")
    env_option(train, "--momentum", env="EDGEFL_MOMENTUM", type=non_negative_float,
               default=defaults.momentum, help="local SGD momentum")
    env_option(train, "--weight-decay", env="EDGEFL_WEIGHT_DECAY", type=non_negative_float,
               default=defaults.weight_decay, help="local weight decay")
    env_option(train, "--privacy", env="EDGEFL_PRIVACY",
               choices=["none", "central", "laplace", "discrete-laplace", "gaussian"],
               default=privacy.mechanism,
               help="differential privacy: central (DP-FedAvg: devices clip, the server adds "
                    "Gaussian noise and accounts the run for one device's whole data, add/remove "
                    "adjacency; trusts the aggregator with clipped updates; the recommended mode), "
                    "or local noise on each device: laplace, discrete-laplace (the same on a "
                    "power-of-two grid from a ChaCha20 stream: the secure variant) or gaussian")
    env_option(train, "--epsilon", env="EDGEFL_EPSILON", type=positive_float,
               default=privacy.epsilon,
               help="local mechanisms: the replace-one epsilon each update costs its device "
                    "(noise for sensitivity 2 x clip); devices compose it by basic composition")
    env_option(train, "--delta", env="EDGEFL_DELTA", type=positive_float, default=privacy.delta,
               help="local gaussian: the delta each update costs its device (budgeted too)")
    env_option(train, "--clip", env="EDGEFL_CLIP", type=positive_float, default=privacy.clip,
               help="clipping bound of an update (L1 for laplace, L2 for gaussian and central)")
    env_option(train, "--compression", env="EDGEFL_COMPRESSION",
               choices=["none", "topk", "threshold", "randomk"], default=compression.method,
               help="sparsification of updates (none: dense updates)")
    env_option(train, "--density", env="EDGEFL_DENSITY", type=fraction,
               default=compression.density, help="fraction of coordinates kept by topk / randomk")
    env_option(train, "--tau", env="EDGEFL_TAU", type=non_negative_float, default=compression.tau,
               help="threshold of the threshold method")
    env_option(train, "--values", env="EDGEFL_VALUES", choices=["f32", "f16", "int8", "ternary"],
               default=compression.values, help="value encoding of updates")


def training_config_from_args(args) -> TrainingConfig:
    """The :class:`~edgefl.wire.protocol.TrainingConfig` of :func:`add_training_arguments`' options."""
    return TrainingConfig.from_dict({
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "momentum": args.momentum, "weight_decay": args.weight_decay,
        # Central DP is the server's (edgefl_server.accounting.CentralPrivacy): the server
        # announces central-gaussian with the clip.
        "privacy": {"mechanism": "none" if args.privacy == "central" else args.privacy,
                    "epsilon": args.epsilon, "delta": args.delta, "clip": args.clip},
        "compression": {"method": args.compression, "density": args.density, "tau": args.tau,
                        "values": args.values},
    })


def strategy_option(text: str) -> tuple[str, object]:
    """Parse ``KEY=VALUE``; the value is read as JSON (numbers, null) or else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"strategy option {text!r} must look like KEY=VALUE, "
                                         "e.g. eta=0.01")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
