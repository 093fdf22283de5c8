"""Padding-free packing of variable-length examples into fixed token budgets, with per-document positions and masks.

Shared by the reasoning trainer (pack whole prompt+response examples into rows of at most `budget` tokens, no example
split across rows) and the instruction trainer (documents cut from one stream; see utils/instruct_dataset.py).

Conventions:
- A packed row holds several examples back to back. `position_ids` restart at 0 at each example, `document_ids`
  number the examples within a row 0, 1, 2, ... and padding gets -1, so attention can be kept inside examples.
- `document_causal_mask` is the SDPA form of that restriction (True = may attend); on GPU the same information goes to
  FlexAttention block masks or varlen kernels instead, which never build the (T, T) mask.
- Packing must change speed, not the loss: `example_index` maps every token back to its example so per-example
  normalization (sum over an example's response tokens / its own response length) is computed exactly as unpacked.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

PACKED_KEYS = ("input_ids", "labels", "response_mask")


def pack_best_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group example indices into bins of total length <= `budget`, best-fit decreasing.

    Examples are placed longest first; each goes into the open bin with the least room left that still fits it, or a
    new bin. Ties break towards the lower bin id and the lower example index, so the result is deterministic.
    Best-fit decreasing uses at most 11/9 of the optimal bin count plus a constant (D. S. Johnson, 1973), and on
    token-length distributions is usually within a bin or two of the lower bound ceil(sum(lengths) / budget).

    Args:
        lengths: token count of each example (>= 1).
        budget: maximum total tokens per bin (>= 1).

    Returns:
        Bins in creation order; each bin lists example indices in placement order (longest first). Every index in
        range(len(lengths)) appears exactly once.

    Raises:
        ValueError: `budget` < 1, or an example is empty or longer than `budget` (naming its index and length; callers
            drop and count such examples first).
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"example {i} has length {n}; every example needs at least one token")
        if n > budget:
            raise ValueError(f"example {i} has length {n} > budget {budget}; drop (and count) it before packing")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Open bins as (room_left, bin_id), kept sorted: bisect finds the tightest bin that fits in O(log n).
    open_bins: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(open_bins, (n, -1))
        if k == len(open_bins):
            bin_id, room = len(bins), budget
            bins.append([])
        else:
            room, bin_id = open_bins.pop(k)
        bins[bin_id].append(i)
        if room - n > 0:
            bisect.insort(open_bins, (room - n, bin_id))
    return bins


def collate_packed(
    examples: Sequence[dict[str, torch.Tensor]],
    bins: Sequence[Sequence[int]],
    pad_id: int,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Concatenate the examples of each bin into one row and right-pad the rows into a batch.

    Each example is a dict of 1-D tensors of one common length n_i, already shifted by one inside the example (as one
    row of `utils.post_train.tokenize_prompt_and_output` without its padding): `input_ids` int64, `labels` int64 (the
    next token of `input_ids`), `response_mask` bool (True = the label counts in the loss). Labels never cross from
    one example into the next, so no cross-document prediction is trained.

    Args:
        examples: the examples; a bin refers to them by index.
        bins: lists of example indices, one row each (e.g. from `pack_best_fit_decreasing`).
        pad_id: token id for `input_ids` and `labels` padding (padding is never in `response_mask`).
        pad_to: row length T; None = the longest bin. Must be >= the longest bin.

    Returns:
        dict of (B, T) tensors, B = len(bins):
        - `input_ids`, `labels` int64, padded with `pad_id`;
        - `response_mask` bool, False on padding;
        - `position_ids` int64, 0, 1, ... within each example; the padding tail counts 0, 1, ... as one more sequence,
          so kernels that split sequences where the position drops (HF packed-sequence detection, flash-attention
          varlen from position ids) see it as its own segment;
        - `document_ids` int64, 0, 1, ... per example within the row, -1 on padding (padding attends only to
          padding in `document_causal_mask`, so no attention row is empty and SDPA returns no NaN);
        - `example_index` int64, the index into `examples` of each token, -1 on padding: per-example sums are
          `torch.zeros(len(examples)).index_add_(0, example_index[m], values[m])` with m = example_index >= 0.

    Raises:
        ValueError: an example's tensors differ in length or are not 1-D, a bin is empty, or `pad_to` is too short.
    """
    lengths = []
    for i, ex in enumerate(examples):
        shapes = {k: tuple(ex[k].shape) for k in PACKED_KEYS}
        if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 1:
            raise ValueError(f"example {i}: {', '.join(PACKED_KEYS)} must be 1-D of one length, got {shapes}")
        lengths.append(shapes["input_ids"][0])
    row_lengths = []
    for b, members in enumerate(bins):
        if len(members) == 0:
            raise ValueError(f"bin {b} is empty")
        row_lengths.append(sum(lengths[i] for i in members))
    T = max(row_lengths) if pad_to is None else pad_to
    if row_lengths and T < max(row_lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest bin ({max(row_lengths)} tokens)")
    B = len(bins)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "labels": torch.full((B, T), pad_id, dtype=torch.long),
        "response_mask": torch.zeros((B, T), dtype=torch.bool),
        "position_ids": torch.zeros((B, T), dtype=torch.long),
        "document_ids": torch.full((B, T), -1, dtype=torch.long),
        "example_index": torch.full((B, T), -1, dtype=torch.long),
    }
    for b, members in enumerate(bins):
        start = 0
        for doc, i in enumerate(members):
            n, ex = lengths[i], examples[i]
            sl = slice(start, start + n)
            out["input_ids"][b, sl] = ex["input_ids"]
            out["labels"][b, sl] = ex["labels"]
            out["response_mask"][b, sl] = ex["response_mask"]
            out["position_ids"][b, sl] = torch.arange(n)
            out["document_ids"][b, sl] = doc
            out["example_index"][b, sl] = i
            start += n
        out["position_ids"][b, start:] = torch.arange(T - start)
    return out


def document_causal_mask(document_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention mask that keeps causal attention inside each document: the CPU/SDPA fallback.

    Query t may attend key s iff `document_ids[b, s] == document_ids[b, t]` and s <= t. Padding (-1) forms its own
    document, so every query attends at least itself. Pass it to a transformers model as `attention_mask` together
    with per-document `position_ids` and `use_cache=False`: transformers 5.19 uses a 4-D mask as given. With
    `attn_implementation="sdpa"` either form works (SDPA reads bool as True = may attend); "eager" adds the mask to
    the scores, so it needs the additive form (`dtype` set). Memory is B * T * T elements: fine for tests and CPU
    runs, not for long GPU rows. (transformers 5.19 also builds this restriction itself from `position_ids` alone
    when `attention_mask` is None and no cache object exists, i.e. `use_cache=False`; tests/test_packing.py checks
    both ways.)

    Args:
        document_ids: (B, T) integer.
        dtype: None = bool mask; a float dtype = additive mask, 0 where allowed and the dtype's most negative finite
            value elsewhere (finite, so no inf - inf NaN).

    Returns:
        (B, 1, T, T), bool (True = may attend) or additive float.
    """
    T = document_ids.shape[-1]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T_query, T_key)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    allowed = (same_doc & causal).unsqueeze(1)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
