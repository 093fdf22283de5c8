"""The order in which both trainers visit their examples: which examples make up step k.

The reasoning trainer streams (prompt, response) pairs and the instruction trainer streams packed rows through the
same `ExampleStream`, so a step's data depends only on (seed, step) in both, and resuming reproduces it. How the
chosen examples are laid out in rows is utils/packing.py's business.
"""

from __future__ import annotations

import random


class ExampleStream:
    """An endless, seeded stream of example indices: epoch e is a permutation seeded by (seed, e).

    Step k of a run uses stream positions [k * batch, (k + 1) * batch), so the data seen at any step depends only on
    (seed, k): a resumed run sees exactly the batches the uninterrupted run would have.
    """

    def __init__(self, num_examples: int, seed: int):
        if num_examples <= 0:
            raise ValueError("no training examples left (all dropped or none given)")
        self.n = num_examples
        self.seed = seed
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._cache:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + e).shuffle(order)
            self._cache = {e: order}  # keep one epoch in memory
        return self._cache[e]

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            out.append(self._epoch(pos // self.n)[pos % self.n])
        return out
