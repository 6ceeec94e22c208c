import numpy as np
import pytest

from ml_backend.core.csvio import (
    read_labels_csv,
    read_scores_csv,
    write_labels_csv,
    write_scores_csv,
)


def write(tmp_path, text: str, name="f.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_labels_case_whitespace_bom_blank_lines(tmp_path):
    path = write(tmp_path, "\ufeffid, label ,note\n a , Anomaly ,x\nb,NORMAL,\n\nc/d,normal,y\n")
    assert read_labels_csv(path) == {"a": 1, "b": 0, "c/d": 0}


def test_labels_round_trip(tmp_path):
    labels = {"z": 1, "a,b": 0, "ç": 1}
    write_labels_csv(tmp_path / "l.csv", labels)
    assert read_labels_csv(tmp_path / "l.csv") == labels
    assert (tmp_path / "l.csv").read_text().splitlines()[0] == "id,label"
    with pytest.raises(ValueError, match="must be 0 or 1"):
        write_labels_csv(tmp_path / "bad.csv", {"a": 2})


@pytest.mark.parametrize("text, message", [
    ("id,label\na,anomaly\nb,weird\n", r"f\.csv: line 3: label 'weird' for id 'b'"),
    ("id,lbl\na,anomaly\n", r"line 1: .*missing \['label'\]"),
    ("id,label\na,anomaly\nb,normal\na,normal\n", r"line 4: id 'a' .*'anomaly' on line 2"),
    ("id,label\n,anomaly\n", "line 2: empty id"),
    ("", r"missing \['id', 'label'\]"),
])
def test_bad_label_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_labels_csv(write(tmp_path, text))


def test_repeated_id_with_same_label_is_accepted(tmp_path):
    assert read_labels_csv(write(tmp_path, "id,label\na,normal\na,Normal\n")) == {"a": 0}


def test_scores_written_sorted_and_round_trip_exactly(tmp_path):
    ids = ["a", "b", "c", "d"]
    scores = np.array([0.1, 0.7, 1 / 3, 0.7], dtype=np.float32)
    write_scores_csv(tmp_path / "s.csv", ids, scores)
    got_ids, got = read_scores_csv(tmp_path / "s.csv")
    assert got_ids == ["b", "d", "c", "a"]  # ties keep input order
    np.testing.assert_array_equal(got, scores[[1, 3, 2, 0]].astype(np.float64))
    write_scores_csv(tmp_path / "top.csv", ids, scores, top=2)
    assert read_scores_csv(tmp_path / "top.csv")[0] == ["b", "d"]


def test_write_scores_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 ids but 1 scores"):
        write_scores_csv(tmp_path / "s.csv", ["a", "b"], [0.1])
    with pytest.raises(ValueError, match=r"NaN \(e\.g\. id 'b'\)"):
        write_scores_csv(tmp_path / "s.csv", ["a", "b"], [0.1, np.nan])
    with pytest.raises(ValueError, match="unique"):
        write_scores_csv(tmp_path / "s.csv", ["a", "a"], [0.1, 0.2])


@pytest.mark.parametrize("text, message", [
    ("id,score\na,0.5\nb,high\n", r"line 3: score 'high' for id 'b' is not a number"),
    ("id,score\na,nan\n", "line 2: score for id 'a' is NaN"),
    ("id,score\na,0.5\na,0.4\n", "line 3: id 'a' repeats line 2"),
    ("id,label\na,0.5\n", r"missing \['score'\]"),
])
def test_bad_score_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_scores_csv(write(tmp_path, text))
