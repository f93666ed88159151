"""The arithmetic of aggregation, as plain functions over flat float32 weight vectors.

Every strategy class in :mod:`edgefl_server.strategies` orchestrates these functions; none of them
knows about MQTT, rounds or storage, so each can be checked against hand-computed values.

A client's update is a *delta* (local weights minus the round's global weights) in the manifest's
canonical flat layout, either dense (``indices is None``, ``values`` has one entry per parameter)
or sparse (sorted, unique ``indices`` with one value each). Sums accumulate in float64 so that the
order in which updates arrive does not change the result beyond float32 rounding.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np


class WeightedDelta(NamedTuple):
    """One client's delta and its weight in the average (usually its sample count)."""

    indices: np.ndarray | None
    values: np.ndarray
    weight: float


def weighted_delta_sum(deltas: Iterable[WeightedDelta], num_params: int) -> tuple[np.ndarray, float]:
    """Sum ``weight * delta`` over clients into one dense float64 vector.

    Sparse deltas are scattered into the single accumulator (``np.add.at``), never expanded to a
    dense vector per client, so the cost is O(num_params + total kept coordinates).

    Parameters
    ----------
    deltas : iterable of WeightedDelta
        Dense or sparse deltas; weights must be finite and non-negative.
    num_params : int
        Length of the flat weight vector.

    Returns
    -------
    total : ndarray of float64, shape (num_params,)
        The weighted sum.
    weight : float
        The sum of the weights.

    Raises
    ------
    ValueError
        If a delta's shape does not fit ``num_params`` or a weight is negative or not finite.
    """
    total = np.zeros(num_params, dtype=np.float64)
    weight_sum = 0.0
    for n, (indices, values, weight) in enumerate(deltas):
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"delta {n}: weight must be finite and >= 0, got {weight!r}")
        if indices is None:
            if values.shape != (num_params,):
                raise ValueError(
                    f"delta {n}: a dense delta needs {num_params} values, got shape {values.shape}"
                )
            total += weight * values.astype(np.float64)
        else:
            if indices.shape != values.shape:
                raise ValueError(
                    f"delta {n}: {indices.size} indices but {values.size} values"
                )
            if indices.size and int(indices[-1]) >= num_params:
                raise ValueError(
                    f"delta {n}: index {int(indices[-1])} is out of range for {num_params} parameters"
                )
            np.add.at(total, indices, weight * values.astype(np.float64))
        weight_sum += float(weight)
    return total, weight_sum


def weighted_mean_delta(deltas: Iterable[WeightedDelta], num_params: int) -> np.ndarray | None:
    """The weighted mean of the deltas as float32, or None when the weights sum to zero.

    A coordinate a sparse client did not send counts as zero for that client (it did not move
    it), which is what averaging the dense deltas would give.
    """
    total, weight = weighted_delta_sum(deltas, num_params)
    if weight <= 0:
        return None
    return (total / weight).astype(np.float32)


def noised_clipped_sum(updates, num_params: int, *, clip: float, noise_std: float,
                       rng: np.random.Generator) -> np.ndarray:
    """``sum_k clip(delta_k, clip) + N(0, noise_std^2 I)`` as a dense float64 vector.

    Each update (``indices`` None for dense, else sparse) is scaled down to L2 norm ``clip`` if it
    is longer, so one update moves the sum by at most ``clip`` whatever it holds; updates count
    equally, whatever their sample counts.

    Raises
    ------
    ValueError
        If an update does not fit ``num_params`` (see :func:`weighted_delta_sum`).
    """
    clipped = []
    for u in updates:
        values = u.values.astype(np.float64)
        norm = float(np.sqrt(np.dot(values, values)))
        if norm > clip:
            values = values * (clip / norm)
        clipped.append(WeightedDelta(u.indices, values, 1.0))
    total, _ = weighted_delta_sum(clipped, num_params)
    if noise_std > 0:
        total += rng.normal(0.0, noise_std, num_params)
    return total


def apply_delta(weights: np.ndarray, delta: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """New float32 weights ``weights + scale * delta`` (the inputs are left unchanged)."""
    out = weights.astype(np.float64) + scale * delta.astype(np.float64)
    return out.astype(np.float32)


def first_moment(m: np.ndarray, delta: np.ndarray, beta_1: float) -> np.ndarray:
    """Server momentum ``m_t = beta_1 * m_{t-1} + (1 - beta_1) * delta_t`` (Reddi et al., Alg. 2)."""
    return beta_1 * m + (1.0 - beta_1) * delta


def second_moment_adam(v: np.ndarray, delta: np.ndarray, beta_2: float) -> np.ndarray:
    """FedAdam: ``v_t = beta_2 * v_{t-1} + (1 - beta_2) * delta_t**2``."""
    return beta_2 * v + (1.0 - beta_2) * np.square(delta)


def second_moment_yogi(v: np.ndarray, delta: np.ndarray, beta_2: float) -> np.ndarray:
    """FedYogi: ``v_t = v_{t-1} - (1 - beta_2) * delta_t**2 * sign(v_{t-1} - delta_t**2)``.

    Unlike Adam's, this moment moves additively, so it cannot forget a large past step at once.
    """
    d2 = np.square(delta)
    return v - (1.0 - beta_2) * d2 * np.sign(v - d2)


def second_moment_adagrad(v: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """FedAdagrad: ``v_t = v_{t-1} + delta_t**2``."""
    return v + np.square(delta)


def adaptive_step(weights: np.ndarray, m: np.ndarray, v: np.ndarray, *, eta: float,
                  tau: float) -> np.ndarray:
    """The server update ``x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)`` as float32.

    ``tau`` bounds the step where ``v`` is tiny; Yogi's ``v`` stays non-negative because it starts
    at ``tau**2`` and each step moves it towards ``delta**2`` by less than the gap.
    """
    step = eta * m / (np.sqrt(np.maximum(v, 0.0)) + tau)
    return (weights.astype(np.float64) + step).astype(np.float32)


# -- robust aggregation: order statistics over the clients that sent each coordinate ------------

class SenderMatrix(NamedTuple):
    """The deltas restricted to the coordinates any client sent, NaN where a client sent nothing.

    ``coordinates`` are the sorted flat positions covered (every position when a dense delta is
    among them); ``values[i, j]`` is client ``i``'s value at ``coordinates[j]``, or NaN when that
    client's sparse delta left the coordinate out.
    """

    coordinates: np.ndarray
    values: np.ndarray

    @property
    def senders(self) -> np.ndarray:
        """How many clients sent each coordinate."""
        return np.count_nonzero(~np.isnan(self.values), axis=0)

    def zero_filled(self) -> np.ndarray:
        """The values with a coordinate a client did not send as 0 (it did not move it)."""
        return np.nan_to_num(self.values, nan=0.0)


def stack_senders(deltas: Iterable[WeightedDelta], num_params: int) -> SenderMatrix:
    """The deltas as rows of one float32 matrix over the union of their coordinates.

    A robust rule must not read "not sent" as "sent zero": with data-dependent sparsification
    (top-k) most clients send nothing at a given coordinate, so the median of mostly zeros is 0
    there and the model freezes. Keeping the gaps as NaN lets each rule count only the clients
    that sent a coordinate. With random-k from the round's shared seed every client sends the
    same coordinates, so the matrix is dense over exactly those. Memory is
    O(clients * covered coordinates).

    Raises
    ------
    ValueError
        If a delta's shape does not fit ``num_params``.
    """
    deltas = list(deltas)
    for n, (indices, values, _) in enumerate(deltas):
        if indices is None and values.shape != (num_params,):
            raise ValueError(f"delta {n}: a dense delta needs {num_params} values, got shape "
                             f"{values.shape}")
        if indices is not None and (indices.shape != values.shape
                                    or (indices.size and int(indices[-1]) >= num_params)):
            raise ValueError(f"delta {n}: {indices.size} indices (last {indices[-1:]}) and "
                             f"{values.size} values do not fit {num_params} parameters")
    if any(indices is None for indices, _, _ in deltas):
        coordinates = np.arange(num_params, dtype=np.int64)
    else:
        coordinates = np.unique(np.concatenate(
            [indices.astype(np.int64) for indices, _, _ in deltas] or [np.zeros(0, np.int64)]))
    out = np.full((len(deltas), coordinates.size), np.nan, dtype=np.float32)
    for row, (indices, values, _) in zip(out, deltas):
        if indices is None:
            row[:] = values
        else:
            row[np.searchsorted(coordinates, indices)] = values
    return SenderMatrix(coordinates, out)


def _sorted_with_counts(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # np.sort puts NaN after every number, so a column's c sent values are its first c rows.
    return np.sort(matrix, axis=0), np.count_nonzero(~np.isnan(matrix), axis=0)


def coordinate_median(matrix: np.ndarray) -> np.ndarray:
    """The median over clients of every column (rows are clients), ignoring NaN (not sent).

    A column with no value at all gives NaN; callers keep only columns enough clients sent.
    """
    ordered, count = _sorted_with_counts(matrix)
    lo = np.take_along_axis(ordered, np.maximum(count - 1, 0)[None, :] // 2, axis=0)[0]
    hi = np.take_along_axis(ordered, (count // 2)[None, :], axis=0)[0]
    median = (lo.astype(np.float64) + hi.astype(np.float64)) / 2.0
    median[count == 0] = np.nan
    return median.astype(np.float32)


def trimmed_mean(matrix: np.ndarray, beta: float) -> np.ndarray:
    """Per column, the mean after dropping the ``floor(beta * c)`` largest and smallest of the
    ``c`` clients that sent it (NaN means not sent).

    With ``beta < 0.5`` at least one value always remains; a column nobody sent gives NaN.

    Raises
    ------
    ValueError
        If beta is not in [0, 0.5).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction beta must be in [0, 0.5), got {beta!r}")
    ordered, count = _sorted_with_counts(matrix)
    cut = np.floor(beta * count).astype(np.int64)
    rank = np.arange(ordered.shape[0])[:, None]
    keep = (rank >= cut) & (rank < count - cut)
    total = np.where(keep, ordered.astype(np.float64), 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / (count - 2 * cut)).astype(np.float32)


def robust_delta(rule, senders: SenderMatrix, num_params: int, min_senders: int) -> np.ndarray:
    """A dense float32 delta from ``rule`` (matrix -> per-column values) over the coordinates
    that at least ``min_senders`` clients sent; every other coordinate does not move.

    ``min_senders`` is capped at the number of clients, so a round with fewer updates still
    moves the model (a round of one update is that update).
    """
    needed = max(1, min(min_senders, senders.values.shape[0]))
    enough = senders.senders >= needed
    delta = np.zeros(num_params, np.float32)
    if enough.any():
        delta[senders.coordinates[enough]] = rule(senders.values[:, enough])
    return delta


def krum_select(matrix: np.ndarray, num_malicious: int, num_to_keep: int = 1) -> np.ndarray:
    """Indices of the ``num_to_keep`` rows with the lowest Krum scores (Blanchard et al. 2017).

    A row's score is the sum of its squared distances to its ``clients - num_malicious - 2``
    nearest other rows; an outlier is far from most rows and scores high.

    Raises
    ------
    ValueError
        If ``clients <= 2 * num_malicious + 2`` (Krum's condition) or ``num_to_keep`` is not in
        1..clients.
    """
    clients = matrix.shape[0]
    if clients <= 2 * num_malicious + 2:
        raise ValueError(f"Krum needs more than 2 * {num_malicious} + 2 = {2 * num_malicious + 2} "
                         f"updates to tolerate {num_malicious} malicious ones, got {clients}")
    if not 1 <= num_to_keep <= clients:
        raise ValueError(f"num_to_keep must be in 1..{clients}, got {num_to_keep}")
    x = matrix.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(dist, np.inf)
    neighbours = clients - num_malicious - 2
    scores = np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)
    return np.argsort(scores, kind="stable")[:num_to_keep]
