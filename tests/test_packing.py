"""Best-fit-decreasing packing, packed collation, document boundaries and the document mask, checked by hand and
against unpacked runs."""

import random

import pytest
import torch

from utils.helper_fns import DATA_DIR, load_prompt, read_jsonl
from utils.instruct_dataset import fill_template
from utils.packing import (collate_packed, cu_seqlens_from_document_ids, cu_seqlens_from_position_ids,
                           document_causal_mask, pack_best_fit_decreasing, packed_model_inputs,
                           row_positions_and_documents, rows_to_batch)
from utils.post_train import get_response_log_probs, tokenize_prompt_and_output
from utils.tiny_models import build_tiny_model


def first_fit(lengths, budget):
    """Naive first-fit in the given order: the baseline best-fit decreasing must never lose to."""
    bins, room = [], []
    for i, n in enumerate(lengths):
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def test_best_fit_decreasing_hand_case():
    # Longest first: 6 -> bin0 (room 4); 5 -> bin1 (room 5); 4 fills bin0 exactly (tighter than bin1);
    # 3 -> bin1 (room 2); 2 fills bin1. First-fit in input order needs 3 bins: [5,4] [3,6] [2].
    lengths = [5, 4, 3, 6, 2]
    assert pack_best_fit_decreasing(lengths, 10) == [[3, 1], [0, 2, 4]]
    assert len(first_fit(lengths, 10)) == 3


@pytest.mark.parametrize("budget", [64, 512, 2048])
def test_best_fit_decreasing_random(budget):
    rng = random.Random(budget)
    lengths = [min(budget, max(1, int(rng.lognormvariate(4.5, 0.8)))) for _ in range(800)]
    bins = pack_best_fit_decreasing(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    lower_bound = -(-sum(lengths) // budget)
    assert lower_bound <= len(bins) <= len(first_fit(lengths, budget))
    # Shuffled input order gives the same bins up to index relabelling: only lengths matter.
    shuffled = rng.sample(lengths, len(lengths))
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == sorted(
        sorted(shuffled[i] for i in b) for b in pack_best_fit_decreasing(shuffled, budget)
    )


def test_best_fit_decreasing_rejects_too_long_and_empty():
    with pytest.raises(ValueError, match=r"example 2 has length 11 > budget 10"):
        pack_best_fit_decreasing([3, 10, 11, 12], 10)
    with pytest.raises(ValueError, match=r"example 1 has length 0"):
        pack_best_fit_decreasing([3, 0], 10)
    with pytest.raises(ValueError, match="budget"):
        pack_best_fit_decreasing([1], 0)
    assert pack_best_fit_decreasing([], 10) == []


def _example(ids, mask):
    ids = torch.tensor(ids)
    return {"input_ids": ids[:-1], "labels": ids[1:], "response_mask": torch.tensor(mask[1:])}


def test_collate_packed_hand_case():
    examples = [
        _example([11, 12, 13], [0, 1, 1]),  # 2 tokens after the shift
        _example([21, 22, 23, 24], [0, 0, 1, 1]),  # 3 tokens
        _example([31, 32], [0, 1]),  # 1 token
    ]
    out = collate_packed(examples, [[1, 2], [0]], pad_id=0)
    assert out["input_ids"].tolist() == [[21, 22, 23, 31], [11, 12, 0, 0]]
    assert out["labels"].tolist() == [[22, 23, 24, 32], [12, 13, 0, 0]]
    assert out["response_mask"].tolist() == [[False, True, True, True], [True, True, False, False]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert out["document_ids"].tolist() == [[0, 0, 0, 1], [0, 0, -1, -1]]
    assert out["example_index"].tolist() == [[1, 1, 1, 2], [0, 0, -1, -1]]
    assert all(v.shape == (2, 4) for v in out.values())
    assert out["input_ids"].dtype == torch.long and out["response_mask"].dtype == torch.bool

    fixed = collate_packed(examples, [[1, 2], [0]], pad_id=7, pad_to=6)
    assert fixed["input_ids"].tolist() == [[21, 22, 23, 31, 7, 7], [11, 12, 7, 7, 7, 7]]
    assert fixed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="shorter than the longest bin"):
        collate_packed(examples, [[1, 2], [0]], pad_id=0, pad_to=3)
    bad = {**examples[0], "labels": torch.tensor([1, 2, 3])}
    with pytest.raises(ValueError, match="example 0"):
        collate_packed([bad], [[0]], pad_id=0)


def test_document_causal_mask_hand_case():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == expected
    additive = document_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]), dtype=torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float32).min).all()


def test_cu_seqlens_hand_case():
    # row 0: docs of 2 and 3 tokens + 1 padding; row 1: docs of 4 and 2. Rows never share a segment.
    doc = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 1, 1]])
    cu, max_len = cu_seqlens_from_document_ids(doc)
    assert cu.tolist() == [0, 2, 5, 6, 10, 12] and cu.dtype == torch.int32 and max_len == 4
    pos = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]])
    assert cu_seqlens_from_position_ids(pos)[0].tolist() == [0, 2, 5, 6, 10, 12]
    # the same id in two rows is two segments; one document per row is one segment per row
    assert cu_seqlens_from_document_ids(torch.zeros(2, 3, dtype=torch.long))[0].tolist() == [0, 3, 6]
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        cu_seqlens_from_document_ids(torch.zeros(5, dtype=torch.long))


def test_boundaries_from_positions_match_collated_documents():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (30,), generator=g).tolist()
    examples = [{k: torch.randint(0, 50, (n,), generator=g) for k in ("input_ids", "labels")} for n in lengths]
    for ex, n in zip(examples, lengths):
        ex["response_mask"] = torch.ones(n, dtype=torch.bool)
    bins = pack_best_fit_decreasing(lengths, 64)
    batch = collate_packed(examples, bins, pad_id=0, pad_to=64)
    by_doc, max_doc = cu_seqlens_from_document_ids(batch["document_ids"])
    by_pos, max_pos = cu_seqlens_from_position_ids(batch["position_ids"])
    assert torch.equal(by_doc, by_pos) and max_doc == max_pos
    real = (batch["document_ids"] >= 0).sum(-1) < 64  # rows with padding add one segment each
    assert len(by_doc) - 1 == len(lengths) + int(real.sum())


def test_packed_model_inputs_rejects_bad_input():
    pos = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="do not restart"):  # two documents, but positions run on
        packed_model_inputs(pos, torch.tensor([[0, 0, 1, 1]]), "flex")
    with pytest.raises(ValueError, match="unknown attention backend"):
        packed_model_inputs(pos, torch.zeros(1, 4, dtype=torch.long), "xformers")


def test_stream_row_positions_and_documents_hand_case():
    # documents start at stream offsets 0, 3, 7; the row covers offsets 2..7: the tail of document 0, all of
    # document 1 and the head of document 2, each restarting at position 0
    doc_starts = torch.tensor([0, 3, 7])
    position_ids, document_ids = row_positions_and_documents(doc_starts, 2, 6)
    assert position_ids.tolist() == [0, 0, 1, 2, 3, 0]
    assert document_ids.tolist() == [0, 1, 1, 1, 1, 2]
    # a row starting exactly on a document start has no empty fragment before it
    assert row_positions_and_documents(doc_starts, 3, 4)[1].tolist() == [0, 0, 0, 0]


def test_rows_to_batch_masks_ignored_labels_and_adds_document_boundaries():
    rows = [{"input_ids": torch.tensor([5, 6, 7, 8]), "labels": torch.tensor([-100, 7, 8, 9]),
             "position_ids": torch.tensor([0, 1, 0, 1]), "document_ids": torch.tensor([0, 0, 1, 1])},
            {"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([2, 3, -100, -100]),
             "position_ids": torch.tensor([0, 1, 2, 3]), "document_ids": torch.tensor([0, 0, 0, 0])}]
    batch = rows_to_batch(rows, [1, 0], "doc", "varlen")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert batch["response_mask"].tolist() == [[True, True, False, False], [False, True, True, True]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 6, 8] and batch["max_length_q"] == 4
    plain = rows_to_batch(rows, [0], "concat", "varlen")  # concat packing: attention runs across the whole row
    assert set(plain) == {"input_ids", "labels", "response_mask"}


@pytest.fixture(scope="module")
def tiny_qwen_model(tiny_qwen_tokenizer):
    tok = tiny_qwen_tokenizer
    model = build_tiny_model("qwen2", len(tok), hidden_size=64, num_heads=2, eos_token_id=tok.eos_token_id)
    return model.eval()


@pytest.fixture(scope="module")
def sample_examples(tiny_qwen_tokenizer):
    """Nine sample records as unpadded per-example rows of tokenize_prompt_and_output (response mask included)."""
    template = load_prompt("alpaca_sft")
    records = read_jsonl(DATA_DIR / "sft-instruct" / "sample_train.jsonl")[:9]
    examples = []
    for rec in records:
        doc, prompt_part = fill_template(template, rec["prompt"], rec["response"])
        row = tokenize_prompt_and_output([prompt_part], [doc[len(prompt_part) :]], tiny_qwen_tokenizer)
        examples.append({k: v[0] for k, v in row.items()})  # one example: no padding to strip
    return examples


@pytest.mark.parametrize(
    "attn,mask_form",
    [("sdpa", "bool"), ("sdpa", "additive"), ("sdpa", "position_ids_only"), ("eager", "additive")],
)
def test_packed_rows_match_each_example_alone(tiny_qwen_model, tiny_qwen_tokenizer, sample_examples, attn, mask_form):
    model, examples = tiny_qwen_model, sample_examples
    model.set_attn_implementation(attn)
    lengths = [len(ex["input_ids"]) for ex in examples]
    bins = pack_best_fit_decreasing(lengths, budget=300)
    assert len(bins) < len(examples) and any(len(b) >= 3 for b in bins)  # real packing, several docs per row
    batch = collate_packed(examples, bins, pad_id=tiny_qwen_tokenizer.pad_token_id)

    # use_cache=False as in training: with a cache object transformers skips packed-sequence detection.
    kwargs = {"position_ids": batch["position_ids"], "use_cache": False}
    if mask_form == "bool":
        kwargs["attention_mask"] = document_causal_mask(batch["document_ids"])
    elif mask_form == "additive":
        kwargs["attention_mask"] = document_causal_mask(batch["document_ids"], dtype=torch.float32)
    # position_ids_only: transformers splits sequences where the position ids restart (find_packed_sequence_indices).
    with torch.no_grad():
        packed = get_response_log_probs(model, batch["input_ids"], batch["labels"], **kwargs)["log_probs"]
        plain = get_response_log_probs(model, batch["input_ids"], batch["labels"], use_cache=False)["log_probs"]

    index, mask = batch["example_index"], batch["response_mask"]
    # Per-example normalization from the packed row: each example's response log-prob sum / its response tokens.
    sums = torch.zeros(len(examples)).index_add_(0, index[mask], packed[mask])
    means = sums / torch.zeros(len(examples)).index_add_(0, index[mask], torch.ones(int(mask.sum())))
    leaked = 0.0
    for i, ex in enumerate(examples):
        with torch.no_grad():
            alone = get_response_log_probs(model, ex["input_ids"][None], ex["labels"][None])["log_probs"][0]
        torch.testing.assert_close(packed[index == i], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(means[i], alone[ex["response_mask"]].mean(), atol=1e-5, rtol=0)
        leaked = max(leaked, (plain[index == i] - alone).abs().max().item())
    assert leaked > 1e-3  # plain causal attention over the row does see other examples: the mask is what matters
