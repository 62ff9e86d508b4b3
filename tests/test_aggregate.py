import numpy as np
import pytest

from imgcls.evaluation.aggregate import aggregate_probs, event_label
from imgcls.errors import UserError


def test_mean_and_max_of_a_burst():
    probs = np.array([[0.9, 0.1, 0.0], [0.95, 0.05, 0.0], [0.1, 0.0, 0.9]])
    np.testing.assert_allclose(aggregate_probs(probs, "mean"), [1.95 / 3, 0.15 / 3, 0.9 / 3])
    peak = np.array([0.95, 0.1, 0.9])
    np.testing.assert_allclose(aggregate_probs(probs, "max"), peak / peak.sum())
    assert aggregate_probs(probs, "max").sum() == pytest.approx(1.0)


def test_one_frame_is_itself():
    row = np.array([[0.2, 0.8]])
    np.testing.assert_allclose(aggregate_probs(row, "mean"), row[0])
    np.testing.assert_allclose(aggregate_probs(row, "max"), row[0])


def test_bad_aggregate_and_shapes():
    with pytest.raises(UserError, match="mean or max"):
        aggregate_probs(np.ones((2, 2)) / 2, "median")
    with pytest.raises(ValueError):
        aggregate_probs(np.zeros((0, 3)))


def test_event_label_majority_then_first():
    assert event_label(["deer", "empty", "deer"]) == "deer"
    assert event_label(["empty", "deer"]) == "empty"
