"""iterate_batches as the CS336 contract states it: a sized iterable, len() = batches per epoch, iter() = one epoch."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils.instruct_dataset import iterate_batches


class Rows(Dataset):
    """N rows of (4,) int64 tensors holding their own row number, so order and coverage can be read back."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.full((4,), i, dtype=torch.long), "labels": torch.full((4,), -i, dtype=torch.long)}


@pytest.mark.parametrize("n, batch_size", [(10, 3), (9, 3), (1, 5), (7, 1), (0, 4)])
def test_len_is_batches_per_epoch_and_iter_is_one_epoch(n, batch_size):
    ds = Rows(n)
    batches = iterate_batches(ds, batch_size, shuffle=False)
    assert len(batches) == math.ceil(n / batch_size) == len(DataLoader(ds, batch_size=batch_size))
    epoch = list(batches)
    assert len(epoch) == len(batches)
    rows = [int(r) for b in epoch for r in b["input_ids"][:, 0]]
    assert rows == list(range(n))  # every row once, in order
    assert list(map(len, (b["labels"] for b in epoch))) == [batch_size] * (n // batch_size) + [n % batch_size] * (
        n % batch_size > 0)  # fmt: skip
    again = list(batches)  # re-iterable, like a DataLoader: a second epoch, same order without shuffle
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch, again)) and len(again) == len(epoch)


def test_shuffled_epochs_are_seeded_permutations():
    ds = Rows(11)
    first = torch.cat([b["input_ids"][:, 0] for b in iterate_batches(ds, 4, shuffle=True, seed=5)])
    second = torch.cat([b["input_ids"][:, 0] for b in iterate_batches(ds, 4, shuffle=True, seed=5)])
    other = torch.cat([b["input_ids"][:, 0] for b in iterate_batches(ds, 4, shuffle=True, seed=6)])
    assert sorted(first.tolist()) == list(range(11)) and torch.equal(first, second) and not torch.equal(first, other)


def test_next_on_the_result_still_walks_one_epoch():
    batches = iterate_batches(Rows(5), 2, shuffle=False)
    assert [next(batches)["input_ids"][:, 0].tolist() for _ in range(3)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(StopIteration):
        next(batches)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        iterate_batches(Rows(5), 0, shuffle=False)
