"""Padding-free packing of variable-length examples into fixed token budgets, with per-document positions and masks.

Everything about packed rows lives here, for both trainers:
- bins and rows: `pack_best_fit_decreasing` groups examples into token budgets, `collate_packed` lays a bin out as
  one row with per-example `position_ids`, `document_ids` and `example_index`;
- what a packed micro-batch gives the model besides `input_ids` (`packed_model_inputs`): `cu_seq_lens` for varlen
  kernels (`cu_seqlens_from_document_ids` / `_from_position_ids`), the SDPA mask (`document_causal_mask`), or only
  restarting positions for FlexAttention; the attention functions that consume them are in utils/doc_attention.py;
- the reasoning path (`make_packed_micro_batches`, `pack_examples`): whole prompt+response examples packed into rows
  of at most `budget` tokens, no example split across rows, one row per micro-batch, with per-token loss weights;
- the instruction path (`row_positions_and_documents`, `rows_to_batch`): rows cut from one document stream by
  `utils.instruct_dataset.PackedSFTDataset`, their per-document positions, and rows stacked into a micro-batch.

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

from utils.post_train import tokenize_prompt_and_output

PACKED_KEYS = ("input_ids", "labels", "response_mask")


# ------------------------------------------------------------------------------------------------------- bins and rows
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


# -------------------------------------------------------------------------------------------------------- model inputs
def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries over the flattened rows, as varlen kernels take them.

    A segment is a maximal run of one `document_ids` value within a row; every row starts a new segment, so a
    document never spans rows and a row's padding (-1) is a segment of its own.

    Args:
        document_ids: (B, T) integer.

    Returns:
        (cu_seqlens, max_len): int32 (N + 1,) offsets into the B*T flattened tokens, starting at 0 and ending at B*T,
        and the longest segment's length (a Python int: kernels take it as a launch size).
    """
    if document_ids.ndim != 2 or document_ids.shape[1] == 0:
        raise ValueError(f"document_ids must be (B, T) with T >= 1, got {tuple(document_ids.shape)}")
    B, T = document_ids.shape
    starts = torch.ones((B, T), dtype=torch.bool, device=document_ids.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    offsets = starts.reshape(-1).nonzero().squeeze(-1)
    total = torch.tensor([B * T], device=document_ids.device)
    cu = torch.cat([offsets, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """As `cu_seqlens_from_document_ids`, with a new segment wherever the position does not grow by one (the
    convention of transformers' packed-sequence detection)."""
    if position_ids.ndim != 2 or position_ids.shape[1] == 0:
        raise ValueError(f"position_ids must be (B, T) with T >= 1, got {tuple(position_ids.shape)}")
    new_segment = torch.ones_like(position_ids, dtype=torch.bool)
    new_segment[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return cu_seqlens_from_document_ids(new_segment.long().cumsum(-1))


def packed_model_inputs(position_ids: torch.Tensor, document_ids: torch.Tensor, attention: str) -> dict:
    """What a packed micro-batch passes to the model besides `input_ids`, for the chosen backend.

    Args:
        position_ids: (B, T) int64, restarting at 0 at each document (RoPE positions).
        document_ids: (B, T) int64, equal within a document; padding has its own id (e.g. -1).
        attention: one of `utils.doc_attention.ATTENTION_BACKENDS`.

    Returns:
        `position_ids`, plus: varlen → `cu_seq_lens_q/k` (int32) and `max_length_q/k` (int); sdpa → `attention_mask`
        (B, 1, T, T) bool; flex → nothing more (transformers derives the block mask from the positions, so they must
        restart at every document boundary, padding included, as `collate_packed` writes them).
    """
    out: dict = {"position_ids": position_ids}
    if attention == "varlen":
        cu, max_len = cu_seqlens_from_document_ids(document_ids)
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    elif attention == "sdpa":
        out["attention_mask"] = document_causal_mask(document_ids)
    elif attention == "flex":
        derived, _ = cu_seqlens_from_position_ids(position_ids)
        expected, _ = cu_seqlens_from_document_ids(document_ids)
        if not torch.equal(derived, expected):
            raise ValueError("flex attention finds documents where position_ids restart, but these position_ids do "
                             "not restart at every document_ids boundary")
    else:
        from utils.doc_attention import ATTENTION_BACKENDS  # not at the top: doc_attention imports this module

        raise ValueError(f"unknown attention backend {attention!r}; choose from {ATTENTION_BACKENDS}")
    return out


# ------------------------------------------------------------------------------------------------------ reasoning path
def make_packed_micro_batches(
    prompts: list[str],
    responses: list[str],
    indices: list[int],
    tokenizer,
    token_budget: int,
    normalization: str = "per_example",
    normalize_constant: float = 1.0,
    attention: str = "varlen",
) -> list[dict[str, torch.Tensor]]:
    """Tokenize the step's examples one by one (no padding) and pack them with `pack_examples`."""
    examples = []
    for i in indices:
        one = tokenize_prompt_and_output([prompts[i]], [responses[i]], tokenizer)  # batch of 1: no padding
        examples.append({k: v[0] for k, v in one.items()})
    return pack_examples(examples, token_budget, tokenizer.pad_token_id, normalization, normalize_constant, attention)


def pack_examples(
    examples: list[dict[str, torch.Tensor]],
    token_budget: int,
    pad_id: int,
    normalization: str = "per_example",
    normalize_constant: float = 1.0,
    attention: str = "varlen",
) -> list[dict[str, torch.Tensor]]:
    """Pack one step's examples into rows of at most `token_budget` tokens (best-fit decreasing), one row per
    micro-batch, with per-example positions, attention kept inside examples and per-token loss weights.

    Padding-free packing changes speed, not the objective: the weights reproduce the padded path's normalization
    over the whole step (see `utils.post_train.weighted_nll_train_step`), and attention never crosses examples.

    Args:
        examples: dicts of 1-D `input_ids`, `labels`, `response_mask` (one unpadded row of
            `tokenize_prompt_and_output` each).
        token_budget: max tokens per row.
        pad_id: padding id (rows are not padded: each row is its own micro-batch).
        normalization, normalize_constant: as in `utils.post_train.sft_microbatch_train_step`.
        attention: the model's attention backend (`utils.doc_attention.ATTENTION_BACKENDS`).

    Returns:
        micro-batches of one row: `input_ids`, `labels`, `response_mask`, `loss_weights` (1, T) float32, and
        `packed_model_inputs` for `attention` (`position_ids` (1, T) plus varlen boundaries or
        a (1, 1, T, T) mask).
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    counts = torch.tensor([int(ex["response_mask"].sum()) for ex in examples], dtype=torch.float64)
    n = len(examples)
    if normalization == "per_example":
        per_example_weight = 1.0 / (counts.clamp(min=1) * n)
    elif normalization == "constant":
        per_example_weight = torch.full((n,), 1.0 / (normalize_constant * n), dtype=torch.float64)
    elif normalization == "step_tokens":
        per_example_weight = torch.full((n,), 1.0 / max(1.0, float(counts.sum())), dtype=torch.float64)
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    out = []
    for members in pack_best_fit_decreasing(lengths, token_budget):
        row = collate_packed(examples, [members], pad_id)
        ex_idx = row.pop("example_index")
        row["loss_weights"] = torch.where(ex_idx >= 0, per_example_weight[ex_idx.clamp(min=0)], 0.0).float()
        row.update(packed_model_inputs(row.pop("position_ids"), row.pop("document_ids"), attention))
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------- instruction path
def row_positions_and_documents(
    doc_starts: torch.Tensor, row_start: int, row_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document positions and document ids of the row stream[row_start : row_start + row_length] of a stream of
    documents laid back to back (the instruction rows of `utils.instruct_dataset.PackedSFTDataset`).

    Args:
        doc_starts: (D,) int64, the stream offset of each document, ascending.
        row_start: stream offset of the row's first token.
        row_length: tokens per row L.

    Returns:
        (position_ids, document_ids), both (L,) int64: positions count 0, 1, ... from the row start and again from
        each document start inside the row (a row that begins mid-document restarts that fragment at 0 too);
        document ids number the documents (fragments) within the row 0, 1, 2, ...
    """
    a, L = row_start, row_length
    # Documents starting strictly inside the row; the row start itself always begins a segment.
    lo = int(torch.searchsorted(doc_starts, a, right=True))
    hi = int(torch.searchsorted(doc_starts, a + L))
    is_start = torch.zeros(L, dtype=torch.bool)
    is_start[0] = True
    is_start[doc_starts[lo:hi] - a] = True
    document_ids = is_start.long().cumsum(0) - 1  # (L,)
    segment_starts = torch.nonzero(is_start).squeeze(1)
    return torch.arange(L) - segment_starts[document_ids], document_ids


def rows_to_batch(dataset, rows: list[int], packing: str, attention: str) -> dict:
    """Stack dataset rows into a micro-batch; `doc` packing adds per-document positions and what the `attention`
    backend needs to keep attention inside documents (`packed_model_inputs`)."""
    from utils.instruct_dataset import IGNORE_INDEX  # not at the top: instruct_dataset imports this module

    items = [dataset[i] for i in rows]
    labels = torch.stack([it["labels"] for it in items])
    batch = {"input_ids": torch.stack([it["input_ids"] for it in items]), "labels": labels,
             "response_mask": labels != IGNORE_INDEX}
    if packing == "doc":
        batch.update(packed_model_inputs(torch.stack([it["position_ids"] for it in items]),
                                         torch.stack([it["document_ids"] for it in items]), attention))
    return batch
