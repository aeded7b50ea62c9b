"""Continual-learning metrics against values computed by hand (shared/seed-notes.md)."""

import math

import numpy as np
import pytest

from continual import AccuracyMatrix, average_accuracy, format_matrix, backward_transfer, forgetting, forward_transfer, summarize

NAN = math.nan

# Three tasks. Row i: after training task i. Upper entries R[i, i+1]: before task i+1 is trained.
R = np.array([
    [0.90, 0.30, NAN],
    [0.70, 0.80, 0.40],
    [0.60, 0.75, 0.95],
])
b = np.array([0.50, 0.25, 0.45])


def test_acc_is_mean_of_last_row():
    assert average_accuracy(R) == pytest.approx((0.60 + 0.75 + 0.95) / 3)


def test_bwt_by_hand():
    # (R[2,0] - R[0,0] + R[2,1] - R[1,1]) / 2 = (-0.30 - 0.05) / 2
    assert backward_transfer(R) == pytest.approx(-0.175)


def test_fwt_by_hand():
    # (R[0,1] - b[1] + R[1,2] - b[2]) / 2 = (0.05 - 0.05) / 2
    assert forward_transfer(R, b) == pytest.approx(0.0)
    assert forward_transfer(R, np.array([0.5, 0.2, 0.3])) == pytest.approx((0.10 + 0.10) / 2)


def test_forgetting_uses_the_max_not_the_first_score():
    # task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: max(0.80) - 0.75 = 0.05
    assert forgetting(R) == pytest.approx(0.175)
    # a task that improved after training and then dropped: the max (0.9) counts, not R[j, j]
    R2 = np.array([[0.6, NAN, NAN], [0.9, 0.8, NAN], [0.7, 0.8, 0.9]])
    assert forgetting(R2) == pytest.approx(((0.9 - 0.7) + (0.8 - 0.8)) / 2)
    # Avalanche-style (first score after training) would give (0.6-0.7 + 0) / 2 < 0: not what we compute
    assert forgetting(R2) != pytest.approx(((0.6 - 0.7) + 0) / 2)


def test_no_forgetting_matrix():
    R3 = np.array([[0.8, 0.5], [0.8, 0.9]])
    m = summarize(R3, np.array([0.5, 0.5]))
    assert m == {"ACC": pytest.approx(0.85), "BWT": 0.0, "FWT": 0.0, "forgetting": 0.0}


def test_single_task_and_missing_rows_give_nan():
    one = summarize(np.array([[0.7]]), np.array([0.5]))
    assert one["ACC"] == pytest.approx(0.7)
    assert all(math.isnan(one[k]) for k in ("BWT", "FWT", "forgetting"))
    joint = np.full((3, 3), NAN)
    joint[2] = [0.8, 0.9, 0.7]  # joint training fills the last row only
    m = summarize(joint, b)
    assert m["ACC"] == pytest.approx(0.8)
    assert all(math.isnan(m[k]) for k in ("BWT", "FWT", "forgetting"))
    # printed as undefined, not as a signed number ("BWT=+nan")
    matrix = AccuracyMatrix(["a"])
    matrix.update(None, 0, 0.5, 0.5)
    matrix.update(0, 0, 0.7, 0.7)
    assert format_matrix(matrix, one).splitlines()[-1] == "ACC=+0.7000  BWT=n/a  FWT=n/a  forgetting=n/a"
    # an unfinished run (report while it trains) has no routing accuracy yet: "routing=nan" before
    assert format_matrix(matrix, {**one, "routing_accuracy": NAN}, agnostic=True).splitlines()[-1].endswith("  routing=n/a")
    assert format_matrix(matrix, {**one, "routing_accuracy": 0.5}, agnostic=True).splitlines()[-1].endswith("  routing=0.5000")


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="one entry per task"):
        forward_transfer(np.zeros((3, 3)), np.zeros(2))


def test_accuracy_matrix_object_round_trip():
    m = AccuracyMatrix(["a", "b", "c"])
    for j, v in enumerate(b):
        m.update(None, j, v, v / 2)
    for (i, j), v in np.ndenumerate(R):
        if not math.isnan(v):
            m.update(i, j, v, v)
    res = m.result()
    assert res["BWT"] == pytest.approx(-0.175) and res["forgetting"] == pytest.approx(0.175)
    assert res["BWT_f1"] == pytest.approx(-0.175)
    back = AccuracyMatrix.from_dict(m.to_dict())
    np.testing.assert_array_equal(back.R, m.R)  # NaN survives JSON as null
    np.testing.assert_array_equal(back.b_f1, m.b_f1)
    m.reset()
    assert np.isnan(m.R).all()


def test_printed_matrices_end_each_row_with_the_mean_over_the_tasks_seen():
    matrix = AccuracyMatrix(["a", "b"])
    for row, col, v in ((None, 0, 0.5), (None, 1, 0.4), (0, 0, 0.9), (0, 1, 0.3), (1, 0, 0.7), (1, 1, 0.8)):
        matrix.update(row, col, v, v)
    matrix.A = np.array([[0.9, NAN], [0.6, 0.8]])
    matrix.routing = np.array([1.0, 0.75])
    lines = format_matrix(matrix).splitlines()
    assert lines[0].split()[-2:] == ["mean", "seen"]
    assert lines[3].split() == ["a", "0.900", "0.300", "0.900"] and lines[4].split() == ["b", "0.700", "0.800", "0.750"]
    agnostic = format_matrix(matrix, agnostic=True).splitlines()
    assert agnostic[0].split()[-3:] == ["mean", "seen", "routing"]
    assert agnostic[1].split() == ["a", "0.900", "-", "0.900", "1.000"] and agnostic[2].split()[-2:] == ["0.700", "0.750"]
