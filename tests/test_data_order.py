"""The seeded example order both trainers share: every epoch a permutation, any step reproducible on its own."""

import pytest

from utils.data_order import ExampleStream


def test_each_epoch_visits_every_example_once_in_a_new_order():
    stream = ExampleStream(10, seed=3)
    epochs = [stream.indices(10 * e, 10) for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # seeded by (seed, epoch): not one order repeated


def test_a_step_depends_only_on_seed_and_position():
    """A resumed run builds a fresh stream and asks for step k directly: it must get the uninterrupted run's data,
    also for steps that straddle an epoch boundary."""
    uninterrupted = ExampleStream(7, seed=0)
    steps = [uninterrupted.indices(4 * k, 4) for k in range(6)]
    resumed = ExampleStream(7, seed=0)
    assert [resumed.indices(4 * k, 4) for k in (5, 2, 3)] == [steps[5], steps[2], steps[3]]
    assert ExampleStream(7, seed=1).indices(0, 7) != steps[0][:4] + steps[1][:3]


def test_no_examples_is_an_error():
    with pytest.raises(ValueError, match="no training examples"):
        ExampleStream(0, seed=0)
