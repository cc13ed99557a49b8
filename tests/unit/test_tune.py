"""Seeded trial sampling and selection."""

import math

import pytest

from petseg.errors import ConfigError
from petseg.model import tune


def test_same_seed_gives_same_trials():
    assert tune.sample_trials(5, seed=7) == tune.sample_trials(5, seed=7)
    assert tune.sample_trials(5, seed=7) != tune.sample_trials(5, seed=8)


def test_trials_stay_in_the_search_space():
    trials = tune.sample_trials(200, seed=0)
    assert [trial["index"] for trial in trials] == list(range(200))
    rates = [trial["learning_rate"] for trial in trials]
    low, high = tune.LEARNING_RATE_RANGE
    assert all(low <= rate <= high for rate in rates)
    # Log-uniform: about as many draws below the geometric midpoint as above.
    below = sum(rate < math.sqrt(low * high) for rate in rates)
    assert 70 < below < 130
    assert {trial["batch_size"] for trial in trials} == set(tune.BATCH_SIZES)
    assert all(type(trial["batch_size"]) is int for trial in trials)


def test_a_longer_list_starts_with_the_shorter_one():
    assert tune.sample_trials(6, seed=3)[:2] == tune.sample_trials(2, seed=3)


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_bad_trial_count_is_a_config_error(n):
    with pytest.raises(ConfigError, match="number of trials"):
        tune.sample_trials(n, seed=0)


def test_select_takes_lowest_validation_loss():
    results = [
        {"index": 0, "val_loss": 0.7},
        {"index": 1, "val_loss": 0.4},
        {"index": 2, "val_loss": 0.5},
    ]
    assert tune.select(results)["index"] == 1


def test_select_breaks_ties_by_index_and_ranks_nan_last():
    results = [
        {"index": 3, "val_loss": 0.4},
        {"index": 0, "val_loss": float("nan")},
        {"index": 1, "val_loss": 0.4},
    ]
    assert tune.select(results)["index"] == 1
    assert tune.select([{"index": 0, "val_loss": float("nan")}])["index"] == 0


def test_select_without_results_is_a_config_error():
    with pytest.raises(ConfigError, match="no tuning results"):
        tune.select([])
    with pytest.raises(ConfigError, match="val_loss"):
        tune.select([{"index": 0}])
