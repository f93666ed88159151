"""FedSGD: every selected client takes one full-batch gradient step; the server averages them.

McMahan et al., AISTATS 2017 (section 2) define FedSGD as FedAvg with one local epoch (E = 1) and
the whole local dataset as the batch (B = infinity). A client's delta is then ``-lr * g_k``, so the
sample-weighted mean of the deltas is one step of large-batch SGD on the union of the clients'
data. This strategy announces exactly that local configuration and aggregates like FedAvg.
"""
from __future__ import annotations

import dataclasses

from edgefl.wire.protocol import TrainingConfig

from .fedavg import FedAvg

#: The largest batch a round config allows: larger than any device's buffer, so one batch = all.
FULL_BATCH = 1 << 20


class FedSGD(FedAvg):
    """FedAvg with E = 1 and B = the full local dataset."""

    name = "fedsgd"

    def configure_training(self, config: TrainingConfig) -> TrainingConfig:
        # Momentum would carry nothing across a single step; turning it off keeps delta = -lr * g.
        return dataclasses.replace(config, epochs=1, batch_size=FULL_BATCH, momentum=0.0)
