"""Exact checks of the core SFT helpers against hand computations and naive float64 references."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.post_train import (
    chunked_log_probs_from_hidden,
    compute_entropy,
    get_response_log_probs,
    masked_normalize,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
)


class ToyTokenizer:
    """Character tokenizer: 'a'..'z' -> 1..26, ' ' -> 27; pad id 0. Lets tests write expected ids by hand."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[27 if c == " " else ord(c) - 96 for c in t] for t in texts]}


def test_tokenize_hand_computed_with_padding():
    out = tokenize_prompt_and_output(["ab", "c"], ["cd", "e f"], ToyTokenizer())
    # full rows: [a b c d] and [c e _ f], both length 4 (no padding here; the next case pads)
    assert out["input_ids"].tolist() == [[1, 2, 3], [3, 5, 27]]
    assert out["labels"].tolist() == [[2, 3, 4], [5, 27, 6]]
    assert out["response_mask"].tolist() == [[False, True, True], [True, True, True]]

    out = tokenize_prompt_and_output(["abc", "a"], ["d", "bc"], ToyTokenizer())
    # [a b c d] and [a b c]+pad: padding is never in the mask
    assert out["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3]]
    assert out["labels"].tolist() == [[2, 3, 4], [2, 3, 0]]
    assert out["response_mask"].tolist() == [[False, False, True], [True, True, False]]
    assert out["input_ids"].dtype == torch.long and out["response_mask"].dtype == torch.bool


def test_tokenize_keeps_boundary_where_bpe_would_merge(qwen25_tokenizer):
    tok = qwen25_tokenizer
    prompt, output = "Assistant: <think>", " 12 + 35 = 47"
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    o_ids = tok(output, add_special_tokens=False)["input_ids"]
    # "Hello" + " world" vs "Hel" + "lo world": tokenizing jointly merges across the cut; separately it must not.
    out = tokenize_prompt_and_output(["Hel", prompt], ["lo world", output], tok)
    hel, lo = tok("Hel", add_special_tokens=False)["input_ids"], tok("lo world", add_special_tokens=False)["input_ids"]
    assert tok("Hello world", add_special_tokens=False)["input_ids"] != hel + lo
    row0 = hel + lo
    full1 = p_ids + o_ids
    L = max(len(row0), len(full1))
    pad = tok.pad_token_id
    exp0 = row0 + [pad] * (L - len(row0))
    exp1 = full1 + [pad] * (L - len(full1))
    assert out["input_ids"].tolist() == [exp0[:-1], exp1[:-1]]
    assert out["labels"].tolist() == [exp0[1:], exp1[1:]]
    m1 = [False] * (len(p_ids) - 1) + [True] * len(o_ids) + [False] * (L - len(full1))
    assert out["response_mask"][1].tolist() == m1
    assert out["response_mask"][0].sum().item() == len(lo)


@pytest.mark.parametrize(
    "prompts,outputs,msg",
    [(["a"], ["b", "c"], "1 prompts but 2 outputs"), ([], [], "empty batch")],
)
def test_tokenize_bad_input(prompts, outputs, msg):
    with pytest.raises(ValueError, match=msg):
        tokenize_prompt_and_output(prompts, outputs, ToyTokenizer())


def test_tokenize_requires_pad_token():
    tok = ToyTokenizer()
    tok.pad_token_id = None
    with pytest.raises(ValueError, match="no pad token"):
        tokenize_prompt_and_output(["a"], ["b"], tok)


def _entropy_f64(logits):
    p = torch.softmax(logits.double(), -1)
    return -(p * torch.log_softmax(logits.double(), -1)).sum(-1)


def test_entropy_matches_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17) * 4
    ent = compute_entropy(logits)
    assert ent.dtype == torch.float32 and ent.shape == (3, 5)
    torch.testing.assert_close(ent.double(), _entropy_f64(logits), atol=1e-5, rtol=0)
    # uniform over V: log V; one-hot-ish: ~0
    assert compute_entropy(torch.zeros(7)).item() == pytest.approx(math.log(7), abs=1e-6)
    assert compute_entropy(torch.tensor([1e4, 0.0, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_extreme_logits_finite_and_bf16_input():
    logits = torch.tensor([[1e4, 1e4, -1e4, 0.0], [-1e4, -1e4, -1e4, -1e4]])
    ent = compute_entropy(logits)
    assert torch.isfinite(ent).all()
    torch.testing.assert_close(ent, torch.tensor([math.log(2), math.log(4)]), atol=1e-5, rtol=0)
    assert compute_entropy(logits.bfloat16()).dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_qwen(tiny_qwen_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()


def test_log_probs_match_naive_loop(tiny_qwen):
    torch.manual_seed(1)
    V = tiny_qwen.config.vocab_size
    input_ids = torch.randint(0, V, (2, 9))
    labels = torch.randint(0, V, (2, 9))
    out = get_response_log_probs(tiny_qwen, input_ids, labels, return_token_entropy=True)
    assert set(out) == {"log_probs", "token_entropy"}
    with torch.no_grad():
        for b in range(2):
            for t in range(9):
                # the model is causal: position t only sees the prefix input_ids[b, :t+1]
                logits = tiny_qwen(input_ids[b : b + 1, : t + 1]).logits[0, -1].double()
                ref = torch.log_softmax(logits, -1)[labels[b, t]]
                assert out["log_probs"][b, t].item() == pytest.approx(ref.item(), abs=1e-5)
                assert out["token_entropy"][b, t].item() == pytest.approx(_entropy_f64(logits).item(), abs=1e-5)
    assert "token_entropy" not in get_response_log_probs(tiny_qwen, input_ids, labels)


def test_chunked_path_equals_plain_path_values_and_grads(tiny_qwen):
    torch.manual_seed(2)
    V = tiny_qwen.config.vocab_size
    input_ids = torch.randint(0, V, (3, 11))
    labels = torch.randint(0, V, (3, 11))
    labels[0, -2:] = -100  # ignored positions get log-prob 0 on both paths
    grads = []
    for chunk in (0, 5, 64):
        tiny_qwen.zero_grad()
        out = get_response_log_probs(tiny_qwen, input_ids, labels, return_token_entropy=True, chunk_size=chunk)
        (out["log_probs"] * torch.linspace(0.1, 1, 11)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tiny_qwen.named_parameters()})
        if chunk == 0:
            plain = out
        else:
            torch.testing.assert_close(out["log_probs"], plain["log_probs"], atol=1e-5, rtol=0)
            torch.testing.assert_close(out["token_entropy"], plain["token_entropy"], atol=1e-5, rtol=0)
    assert plain["log_probs"][0, -2:].tolist() == [0.0, 0.0]
    for g in grads[1:]:
        for n in g:
            torch.testing.assert_close(g[n], grads[0][n], atol=1e-5, rtol=1e-4)
    tiny_qwen.zero_grad()


def test_chunked_from_hidden_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_log_probs_from_hidden(torch.zeros(1, 2, 4), torch.zeros(3, 4), torch.zeros(1, 2, dtype=torch.long), 0)


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_masked_normalize(dim):
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, True, True]])
    expected = {
        None: torch.tensor(15.0) / 2,
        0: torch.tensor([1.0, 5.0, 9.0]) / 2,
        1: torch.tensor([4.0, 11.0]) / 2,
        -1: torch.tensor([4.0, 11.0]) / 2,
    }[dim]
    out = masked_normalize(t, m, normalize_constant=2.0, dim=dim)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def _leaf_log_probs(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[:, 0] = True  # every example has at least one response token
    return lp, mask


def test_microbatch_step_constant_closed_form():
    lp, mask = _leaf_log_probs()
    B, GA, nc = lp.shape[0], 3, 2.5
    loss, meta = sft_microbatch_train_step(lp, mask, GA, normalize_constant=nc)
    expected = -(lp.detach() * mask).sum() / nc / B / GA
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # d loss / d lp = -1/(nc*B*GA) on masked positions, 0 elsewhere
    torch.testing.assert_close(lp.grad, torch.where(mask, -1.0 / (nc * B * GA), 0.0))
    assert meta["response_tokens"].item() == mask.sum().item()
    # a second call accumulates (no zeroing)
    sft_microbatch_train_step(lp, mask, GA, normalize_constant=nc)
    torch.testing.assert_close(lp.grad, torch.where(mask, -2.0 / (nc * B * GA), 0.0))


def test_microbatch_step_per_example_closed_form():
    lp, mask = _leaf_log_probs(seed=1)
    B, GA = lp.shape[0], 2
    loss, _ = sft_microbatch_train_step(lp, mask, GA, normalization="per_example")
    counts = mask.sum(-1, keepdim=True).float()
    expected = (-(lp.detach() * mask).sum(-1) / counts.squeeze(-1)).mean() / GA
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(lp.grad, torch.where(mask, -1.0 / (counts * B * GA), torch.zeros(())))


def test_step_tokens_is_gradient_accumulation_invariant():
    lp_full, mask = _leaf_log_probs(seed=2, B=8, T=5)
    total = int(mask.sum())
    sft_microbatch_train_step(lp_full, mask, 1, normalization="step_tokens", step_response_tokens=total)
    lp_split = lp_full.detach().clone().requires_grad_()
    for k in range(4):  # GA = 4 micro-batches of 2
        sl = slice(2 * k, 2 * k + 2)
        lp_mb = lp_split[sl]
        sft_microbatch_train_step(lp_mb, mask[sl], 4, normalization="step_tokens", step_response_tokens=total)
    torch.testing.assert_close(lp_split.grad, lp_full.grad, atol=1e-7, rtol=0)
    torch.testing.assert_close(lp_full.grad, torch.where(mask, -1.0 / total, 0.0))


def test_microbatch_step_rejects_bad_arguments():
    lp, mask = _leaf_log_probs()
    with pytest.raises(ValueError, match="step_response_tokens"):
        sft_microbatch_train_step(lp, mask, 1, normalization="step_tokens")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        sft_microbatch_train_step(lp, mask, 0)
    with pytest.raises(ValueError, match="unknown normalization"):
        sft_microbatch_train_step(lp, mask, 1, normalization="mean")


@pytest.mark.parametrize("chunk_size", [0, 8])
def test_scoring_forward_builds_no_kv_cache(tiny_qwen, tiny_qwen_tokenizer, chunk_size):
    """A KV cache in a training forward costs memory and, under per-layer torch.compile, one recompile per layer
    (its per-layer state is guarded): both paths must call the model with use_cache=False."""
    model, tok = tiny_qwen, tiny_qwen_tokenizer
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("use_cache")),
                                             with_kwargs=True)
    try:
        batch = tokenize_prompt_and_output(["Hi"], [" there"], tok)
        get_response_log_probs(model, batch["input_ids"], batch["labels"], chunk_size=chunk_size)
    finally:
        handle.remove()
    assert seen == [False]
