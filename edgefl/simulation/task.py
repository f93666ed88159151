"""What a simulation trains: a model, labelled data split over devices and a held-out set.

``edgefl simulate`` runs the digits task unless given a user's own model (``--model``, a plain
``.onnx`` or an envelope) and data (``--data``, ``.npz``/``.csv``/``.parquet``); the data are
then split into training and held-out samples (stratified by label) and the training samples
over the devices by ``--partition``: ``iid`` (shuffled, equal parts), ``dirichlet:ALPHA``
(label skew, smaller = less IID) or ``by-column:NAME`` (one device per distinct value of a
column of the data file, e.g. the site each row came from).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgefl.device.local_data import check_samples, describe_skipped, read_samples
from edgefl.device.predictor import Predictor
from edgefl.simulation.datasets import (dirichlet_partition, load_digits, save_parts,
                                        stratified_holdout)
from edgefl.simulation.plan import SimulationPlan
from edgefl.wire.model import Model, mlp_logits
from edgefl_server.model_builder import build_mlp
from edgefl_server.onnx_import import load_model

#: Fraction of the user's samples held out for the accuracy the simulation reports.
TEST_FRACTION = 0.25


def partition_option(text: str) -> tuple[str, object]:
    """Parse ``iid``, ``dirichlet:ALPHA`` or ``by-column:NAME`` (argparse type)."""
    kind, _, value = text.partition(":")
    if kind == "iid" and not value:
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or not np.isfinite(alpha):
            raise argparse.ArgumentTypeError(f"partition {text!r}: ALPHA must be a positive "
                                             "number, e.g. dirichlet:0.5")
        return "dirichlet", alpha
    if kind == "by-column" and value:
        return "by-column", value
    raise argparse.ArgumentTypeError(f"partition {text!r} must be iid, dirichlet:ALPHA or "
                                     "by-column:NAME")


@dataclass
class Task:
    """A model (version 0), the devices' training parts and a held-out set.

    ``featurizer`` maps raw samples to the head's input (the frozen extractor run once with
    onnxruntime), or is None for a model without one.
    """

    name: str
    model: Model
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    parts: list
    featurizer: Callable[[np.ndarray], np.ndarray] | None = None

    def evaluator(self) -> Callable:
        """Held-out accuracy of a model of this task (the server's per-round metric)."""
        features = self.featurizer(self.X_test) if self.featurizer else self.X_test

        def evaluate(model):
            predicted = mlp_logits(model.manifest, model.weights, features).argmax(axis=1)
            return {"accuracy": float((predicted == self.y_test).mean())}

        return evaluate

    def part_files(self, directory) -> list[Path]:
        """Each device's training part as an ``.npz`` file (what ``edgefl client --data`` reads)."""
        return save_parts(directory, "part", self.X_train, self.y_train, self.parts)


def make_task(plan: SimulationPlan) -> Task:
    """The task of ``plan``: digits, or its model and data files (ValueError if they do not fit)."""
    if plan.model is None and plan.data is None:
        return digits_task(plan.devices, plan.partition_spec, plan.seed)
    if plan.model is None or plan.data is None:
        raise ValueError("give both --model FILE and --data FILE (or neither, for digits)")
    return file_task(plan.model, plan.data, devices=plan.devices, partition=plan.partition_spec,
                     label_column=plan.label_column, trainable_layers=plan.trainable_layers,
                     seed=plan.seed)


def split_parts(y, devices: int, partition, *, groups=None, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of each device's samples for a parsed ``--partition``."""
    kind, value = partition
    if kind == "by-column":
        values = np.unique(groups)
        return [np.flatnonzero(groups == v) for v in values]
    if not 1 <= devices <= len(y):
        raise ValueError(f"{devices} devices for {len(y)} training samples: every device needs "
                         "at least one")
    if kind == "iid":
        order = np.random.default_rng(seed).permutation(len(y))
        return [np.sort(p) for p in np.array_split(order, devices)]
    return dirichlet_partition(y, devices, alpha=value, seed=seed)


def digits_task(devices: int, partition, seed: int) -> Task:
    """The evaluation task of the design: digits, a 64-32-10 MLP."""
    X_train, y_train, X_test, y_test = load_digits(seed)
    return Task("digits, 64-32-10 MLP", build_mlp((64, 32, 10), seed=seed), X_train, y_train,
                X_test, y_test, split_parts(y_train, devices, partition, seed=seed))


def file_task(model_path, data_path, *, devices: int, partition, label_column: str,
              trainable_layers: int | None, seed: int) -> Task:
    """The user's model and data; raises ValueError naming what does not fit.

    Rows of the data file that cannot be samples of the model are reported and left out, as a
    device does; labels outside the model's classes stop the simulation before it starts.
    """
    model = load_model(model_path, trainable_layers=trainable_layers)
    manifest = model.manifest
    group_column = partition[1] if partition[0] == "by-column" else None
    samples = read_samples(data_path, label_column=label_column, group_column=group_column)
    problems = list(samples.skipped)
    if not len(samples):
        raise ValueError(f"{data_path} holds no usable sample: "
                         f"{describe_skipped(problems, 'every row')}")
    if samples.X.shape[1] != manifest.input_width:
        raise ValueError(f"{data_path}: samples have {samples.X.shape[1]} features but the model "
                         f"takes {manifest.input_width}")
    keep, skipped = check_samples(samples.X, samples.y, input_width=manifest.input_width,
                                  num_classes=manifest.num_classes, lines=samples.lines)
    if skipped:
        out_of_range = sorted({int(samples.y[i]) for i in np.flatnonzero(~keep)
                               if samples.y[i] >= manifest.num_classes})
        raise ValueError(f"{data_path}: labels {out_of_range[:10]} are outside the model's "
                         f"classes 0..{manifest.num_classes - 1} "
                         f"({describe_skipped(skipped, 'rows')}); relabel the data to the "
                         "model's classes or check --label-column")
    if problems:
        print(describe_skipped(problems, str(data_path)))
    if len(samples) < 2:
        raise ValueError(f"{data_path}: {len(samples)} usable sample(s); a simulation needs "
                         "some to train on and some to hold out")
    test = stratified_holdout(samples.y, TEST_FRACTION, np.random.default_rng(seed))
    train = samples.subset(np.flatnonzero(~test))
    parts = split_parts(train.y, devices, partition, groups=train.groups, seed=seed)
    featurizer = Predictor(model).features if manifest.features_name else None
    name = f"{Path(data_path).name}, {Path(model_path).name}"
    return Task(name, model, train.X, train.y, samples.X[test], samples.y[test], parts,
                featurizer)
