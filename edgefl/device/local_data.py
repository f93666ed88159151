"""A device's own labelled samples: read from a file, checked row by row against the model.

Files (``edgefl client --data``): ``.npz`` with arrays ``X`` (samples x features) and ``y``;
``.csv`` with a header row, one sample per line, the label in the column named by
``label_column`` and every other column a feature (in file order); ``.parquet`` likewise (needs
``pyarrow``: ``pip install 'edgefl[parquet]'``). A row that cannot be a sample (a missing or
non-numeric value, NaN/Inf, a label that is not a whole number) is reported with its line and
skipped; the rest of the file is kept.

:func:`check_samples` is the second check, once the model is known: the feature count and each
label against the model's classes. Rows that fail it are skipped the same way, so one bad label
never costs a device all of its samples.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: How many skipped rows a report lists one by one (the count is always complete).
MAX_LISTED = 20


class DataFileError(ValueError):
    """A data file edgefl cannot read at all (missing, wrong format, no label column)."""


@dataclass
class Samples:
    """Labelled samples and where each came from.

    ``lines`` holds each sample's line in its file (``.csv``: the text line, header = 1;
    ``.npz`` and ``.parquet``: the row, from 1); ``groups`` the values of the ``group_column``
    (for a partition by column), else None; ``skipped`` the ``(line, reason)`` of every row left
    out.
    """

    X: np.ndarray
    y: np.ndarray
    lines: np.ndarray
    groups: np.ndarray | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)
    source: str = "samples"

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index) -> "Samples":
        """The samples at ``index`` (their lines and groups along)."""
        return Samples(self.X[index], self.y[index], self.lines[index],
                       None if self.groups is None else self.groups[index], [], self.source)


def describe_skipped(skipped, source: str) -> str:
    """One message for skipped rows: the count and the first :data:`MAX_LISTED` with reasons."""
    listed = "; ".join(f"line {line}: {reason}" for line, reason in skipped[:MAX_LISTED])
    more = f"; and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
    return f"{source}: skipped {len(skipped)} row(s) ({listed}{more})"


def read_samples(path, *, label_column: str = "label", group_column: str | None = None
                 ) -> Samples:
    """Read a ``.npz``, ``.csv`` or ``.parquet`` file of labelled samples (see the module doc).

    Raises
    ------
    DataFileError
        If the file is missing, of another type, or lacks the label (or group) column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if group_column is not None:
            raise DataFileError(f"{path}: a partition by column needs a .csv or .parquet file "
                                "with that column")
        return _read_npz(path)
    if suffix == ".csv":
        return _read_csv(path, label_column, group_column)
    if suffix == ".parquet":
        return _read_parquet(path, label_column, group_column)
    raise DataFileError(f"{path}: unknown data file type {suffix!r}; give an .npz (arrays X and "
                        "y), a .csv or a .parquet file with a label column")


def _read_npz(path: Path) -> Samples:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"X", "y"} - set(arrays.files)
            if missing:
                raise DataFileError(f"{path} has arrays {sorted(arrays.files)}, missing "
                                    f"{sorted(missing)}; save it with np.savez(path, X=..., y=...)")
            X, y = arrays["X"], arrays["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataFileError):
            raise
        raise DataFileError(f"cannot read {path}: {exc}") from None
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise DataFileError(f"{path}: X must be (samples, features) and y (samples,), got "
                            f"{X.shape} and {y.shape}")
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise DataFileError(f"{path}: X and y must be numeric, got {X.dtype} and {y.dtype}")
    return _keep_valid(X.astype(np.float64), y.astype(np.float64), np.arange(1, len(y) + 1),
                       None, [], str(path))


def _read_csv(path: Path, label_column: str, group_column: str | None) -> Samples:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataFileError(f"{path} is empty: a .csv needs a header row naming its "
                                    f"columns, one of them {label_column!r}")
            label_at, group_at, feature_at = _columns(path, [h.strip() for h in header],
                                                      label_column, group_column)
            rows, labels, groups, lines, skipped = [], [], [], [], []
            for row in reader:
                line = reader.line_num
                if not row or all(not v.strip() for v in row):
                    continue
                if len(row) != len(header):
                    skipped.append((line, f"{len(row)} values, the header has {len(header)}"))
                    continue
                try:
                    values = [float(row[i]) for i in feature_at]
                    label = float(row[label_at])
                except ValueError as exc:
                    skipped.append((line, f"not a number ({exc})"))
                    continue
                rows.append(values)
                labels.append(label)
                lines.append(line)
                if group_at is not None:
                    groups.append(row[group_at].strip())
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise DataFileError(f"cannot read {path}: {exc}") from None
    X = np.array(rows, np.float64).reshape(len(rows), len(feature_at))
    return _keep_valid(X, np.array(labels, np.float64), np.array(lines, np.int64),
                       np.array(groups) if group_at is not None else None, skipped, str(path))


def _read_parquet(path: Path, label_column: str, group_column: str | None) -> Samples:
    try:
        import pyarrow.parquet as pq  # deferred: an optional package, named when missing
    except ImportError:
        raise DataFileError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow "
                            "(or pip install 'edgefl[parquet]'), or convert the file to .csv "
                            "or .npz") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError subclasses
        raise DataFileError(f"cannot read {path}: {exc}") from None
    names = list(table.column_names)
    label_at, group_at, feature_at = _columns(path, names, label_column, group_column)
    skipped, columns = [], []
    bad = np.zeros(table.num_rows, bool)
    for i in feature_at + [label_at]:
        column = table.column(i)
        try:
            values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        except (TypeError, ValueError):
            raise DataFileError(f"{path}: column {names[i]!r} is {column.type}, not numeric")
        missing = np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool)
        bad |= missing
        columns.append(np.where(missing, 0.0, values))
    for row in np.flatnonzero(bad):
        skipped.append((int(row) + 1, "a missing value"))
    keep = ~bad
    X = np.stack(columns[:-1], axis=1) if feature_at else np.zeros((table.num_rows, 0))
    groups = None
    if group_at is not None:
        groups = np.array([str(v) for v in table.column(group_at).to_pylist()])[keep]
    return _keep_valid(X[keep], columns[-1][keep], np.arange(1, table.num_rows + 1)[keep],
                       groups, skipped, str(path))


def _columns(path, names, label_column, group_column):
    if label_column not in names:
        raise DataFileError(f"{path} has no label column {label_column!r} (its columns: "
                            f"{', '.join(map(repr, names))}); name the label column with "
                            "--label-column")
    if group_column is not None and group_column not in names:
        raise DataFileError(f"{path} has no column {group_column!r} to partition by (its "
                            f"columns: {', '.join(map(repr, names))})")
    label_at = names.index(label_column)
    group_at = names.index(group_column) if group_column is not None else None
    feature_at = [i for i in range(len(names)) if i not in (label_at, group_at)]
    if not feature_at:
        raise DataFileError(f"{path} has no feature columns besides {label_column!r}")
    return label_at, group_at, feature_at


def _keep_valid(X, y, lines, groups, skipped, source) -> Samples:
    """Drop rows with non-finite features or a label that is not a whole number >= 0."""
    finite = np.isfinite(X).all(axis=1)
    whole = np.isfinite(y) & (y == np.round(y)) & (y >= 0) & (y < 2**31)
    for i in np.flatnonzero(~(finite & whole)):
        reason = ("a NaN or infinite feature" if not finite[i]
                  else f"label {y[i]:g} is not a class index (a whole number from 0)")
        skipped.append((int(lines[i]), reason))
    keep = finite & whole
    skipped.sort()
    return Samples(np.ascontiguousarray(X[keep], np.float32), y[keep].astype(np.int32),
                   lines[keep], None if groups is None else groups[keep], skipped, source)


def check_samples(X, y, *, input_width: int, num_classes: int, lines=None
                  ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Which rows fit a model with ``input_width`` features and ``num_classes`` classes.

    Parameters
    ----------
    X : array_like
        ``(m, input_width)`` samples (one ``(input_width,)`` sample is taken as ``m = 1``).
    y : array_like
        ``(m,)`` labels.
    lines : array_like of int, optional
        Each row's line in its file, for the report (default: its position, from 1).

    Returns
    -------
    keep : numpy.ndarray of bool
        ``(m,)``: rows with finite features and an integer label in ``0..num_classes-1``.
    skipped : list of (int, str)
        The line and reason of every other row.

    Raises
    ------
    ValueError
        If the shapes cannot be samples of this model at all (a width mismatch concerns every
        row, so it is reported once for the whole set).
    """
    X = np.asarray(X)
    y = np.atleast_1d(np.asarray(y))
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != input_width or y.shape != (X.shape[0],):
        raise ValueError(f"samples must be (m, {input_width}) with labels (m,) for this model, "
                         f"got {X.shape} and {y.shape}")
    if y.dtype.kind not in "biuf" or X.dtype.kind not in "biuf":
        raise ValueError(f"samples and labels must be numeric, got {X.dtype} and {y.dtype}")
    lines = np.arange(1, len(y) + 1) if lines is None else np.asarray(lines)
    finite = np.isfinite(X).all(axis=1)
    label = y.astype(np.float64)
    in_range = np.isfinite(label) & (label == np.round(label)) & (label >= 0) \
        & (label < num_classes)
    skipped = []
    for i in np.flatnonzero(~(finite & in_range)):
        skipped.append((int(lines[i]), "a NaN or infinite feature" if not finite[i] else
                        f"label {label[i]:g} is not a class of this model (0..{num_classes - 1})"))
    return finite & in_range, skipped


def all_labels_out_of_range(y, num_classes: int) -> bool:
    """Whether not one of ``y`` is a class of a ``num_classes``-class model (and there are some)."""
    y = np.asarray(y, np.float64)
    return y.size > 0 and not np.any((y >= 0) & (y < num_classes) & (y == np.round(y)))

