"""A device's own data files: .npz, .csv and .parquet, bad rows skipped and reported by line."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from edgefl.device.local_data import (DataFileError, all_labels_out_of_range, check_samples,
                               describe_skipped, read_samples)


def test_csv_rows_that_cannot_be_samples_are_skipped_with_their_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("x1,x2,label\n"
                    "0.5,1.5,1\n"
                    "0.1,,0\n"          # line 3: a missing value
                    "1,2\n"             # line 4: too few values
                    "\n"                # blank lines are not rows
                    "nan,1,1\n"         # line 6: NaN
                    "3,4,2.5\n"         # line 7: a label that is no class index
                    "5,6,-1\n"          # line 8: negative
                    "7,8,2.0\n")        # line 9: 2.0 is class 2
    samples = read_samples(path)
    assert samples.X.dtype == np.float32
    assert samples.X.tolist() == [[0.5, 1.5], [7.0, 8.0]]
    assert samples.y.tolist() == [1, 2] and samples.lines.tolist() == [2, 9]
    assert [line for line, _ in samples.skipped] == [3, 4, 6, 7, 8]
    report = describe_skipped(samples.skipped, str(path))
    assert "skipped 5 row(s)" in report and "line 4: 2 values, the header has 3" in report
    assert "line 7: label 2.5 is not a class index" in report


def test_csv_label_column_is_named_and_its_absence_explained(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("target,f1,f2\n3,0.25,0.75\n")
    samples = read_samples(path, label_column="target")
    assert samples.X.tolist() == [[0.25, 0.75]] and samples.y.tolist() == [3]
    with pytest.raises(DataFileError, match=r"no label column 'label' \(its columns: 'target', "
                                            r"'f1', 'f2'\); name the label column with "
                                            r"--label-column"):
        read_samples(path)


def test_a_group_column_is_kept_apart_from_the_features(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("site,f1,label\nnorth,0.5,1\nsouth,0.25,0\n")
    samples = read_samples(path, group_column="site")
    assert samples.X.tolist() == [[0.5], [0.25]]
    assert samples.groups.tolist() == ["north", "south"]
    with pytest.raises(DataFileError, match="no column 'region' to partition by"):
        read_samples(path, group_column="region")


def test_parquet_with_missing_values(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"a": [0.5, None, 2.0], "b": [1.0, 2.0, 3.0],
                             "label": pa.array([1, 0, 4], pa.int64())}), path)
    samples = read_samples(path)
    assert samples.X.tolist() == [[0.5, 1.0], [2.0, 3.0]] and samples.y.tolist() == [1, 4]
    assert samples.skipped == [(2, "a missing value")]


def test_npz_rows_are_checked_too(tmp_path):
    path = tmp_path / "data.npz"
    X = np.ones((3, 4))
    X[1, 2] = np.inf
    np.savez(path, X=X, y=np.array([0, 1, 2]))
    samples = read_samples(path)
    assert samples.y.tolist() == [0, 2] and samples.skipped[0][0] == 2


@pytest.mark.parametrize("name, content, message", [
    ("data.txt", "1,2", "unknown data file type '.txt'"),
    ("data.csv", "", "is empty"),
    ("data.csv", "label\n1\n", "no feature columns"),
])
def test_unreadable_files_are_explained(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFileError, match=message):
        read_samples(path)
    with pytest.raises(DataFileError, match="does not exist"):
        read_samples(tmp_path / "missing.csv")


def test_check_samples_against_the_model_keeps_the_rows_that_fit():
    X = np.zeros((4, 3), np.float32)
    X[2, 0] = np.nan
    keep, skipped = check_samples(X, np.array([0, 9, 1, 2]), input_width=3, num_classes=3,
                                  lines=[10, 11, 12, 13])
    assert keep.tolist() == [True, False, False, True]
    assert skipped == [(11, "label 9 is not a class of this model (0..2)"),
                       (12, "a NaN or infinite feature")]
    with pytest.raises(ValueError, match=r"\(m, 5\)"):
        check_samples(X, np.zeros(4), input_width=5, num_classes=3)
    assert all_labels_out_of_range(np.array([5, 7]), 3)
    assert not all_labels_out_of_range(np.array([5, 1]), 3)
