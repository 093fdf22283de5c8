"""The fused lm-head NLL against the plain computation: loss, log-probs, entropies and both gradients, every
normalization's weights, and a whole training step against the unfused step."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.dataloader import make_micro_batches
from utils.doc_attention import set_attention_backend
from utils.fused_lm_head import fused_weighted_nll
from utils.packing import make_packed_micro_batches
from utils.post_train import (compute_entropy, microbatch_token_weights, sft_microbatch_train_step,
                              tokenize_prompt_and_output)
from utils.training import train_step

PROMPTS = ["What is 12 + 35?", "Write a poem.", "Question: 1,000 + 2,500?", "The sea"]
OUTPUTS = [" 47 </answer>", " The waves roll in.", " 3,500. The correct answer is B.", " rolls and the gulls cry"]


def _plain(hidden, weight, labels, token_weights):
    logits = hidden @ weight.t()  # (B, T, V)
    log_softmax = torch.log_softmax(logits.double(), dim=-1)
    valid = (labels >= 0) & (labels < weight.shape[0])
    lp = log_softmax.gather(-1, labels.clamp(0, weight.shape[0] - 1)[..., None]).squeeze(-1) * valid
    return -(token_weights.double() * lp).sum(), lp, compute_entropy(logits)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_fused_matches_plain_values_and_gradients(chunk_size):
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 11, 16, 50
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # ignored positions: no log-prob, no loss
    labels[2, -1] = V + 5
    token_weights = torch.rand(B, T, generator=g, dtype=torch.float64)
    ref_loss, ref_lp, ref_ent = _plain(hidden, weight, labels, token_weights)
    ref_grads = torch.autograd.grad(2.5 * ref_loss, [hidden, weight])
    out = fused_weighted_nll(hidden, weight, labels, token_weights, chunk_size)
    grads = torch.autograd.grad(2.5 * out["loss"], [hidden, weight])  # a scaled loss scales the gradients
    torch.testing.assert_close(out["loss"].double(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["log_probs"].double(), ref_lp, atol=1e-6, rtol=1e-6)  # fp32 outputs
    torch.testing.assert_close(out["token_entropy"], ref_ent, atol=1e-5, rtol=0)
    assert out["log_probs"][0, :3].abs().max() == 0 and out["log_probs"][2, -1] == 0
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not out["log_probs"].requires_grad and not out["token_entropy"].requires_grad


def test_fused_under_bf16_autocast_tracks_fp32():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 32, generator=g, requires_grad=True)
    weight = (0.2 * torch.randn(40, 32, generator=g)).requires_grad_()
    labels = torch.randint(0, 40, (2, 9), generator=g)
    w = torch.ones(2, 9) / 18
    ref_loss, _, _ = _plain(hidden, weight, labels, w)
    ref = torch.autograd.grad(ref_loss, [hidden, weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_weighted_nll(hidden, weight, labels, w, 5)
    grads = torch.autograd.grad(out["loss"], [hidden, weight])
    assert grads[0].dtype == grads[1].dtype == torch.float32  # fp32 master weights get fp32 gradients
    assert abs(out["loss"].item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    for got, want in zip(grads, ref):
        assert (got - want).norm() < 3e-2 * want.norm()


def test_fused_rejects_bad_arguments():
    h, w = torch.zeros(1, 4, 8), torch.zeros(10, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_weighted_nll(h, w, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4), 0)
    with pytest.raises(ValueError, match="token_weights"):
        fused_weighted_nll(h, w, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3), 2)


@pytest.mark.parametrize("normalization", ["constant", "per_example", "step_tokens"])
def test_microbatch_token_weights_reproduce_the_microbatch_loss(normalization):
    g = torch.Generator().manual_seed(2)
    log_probs = -torch.rand(3, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 8, generator=g) > 0.3
    mask[1] = False  # an example with no response token
    lp = log_probs.clone().requires_grad_()
    want, _ = sft_microbatch_train_step(lp, mask, 4, normalize_constant=3.0, normalization=normalization,
                                        step_response_tokens=37)
    w = microbatch_token_weights(mask, 4, normalization, normalize_constant=3.0, step_response_tokens=37)
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(-(w.double() * log_probs).sum(), want.double(), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_train_step_equals_unfused(tiny_qwen_dir, tiny_qwen_tokenizer, packed):
    """A whole optimizer step with --fused-lm-head gives the unfused chunked step's loss, gradient norm and
    parameters (padded per-example micro-batches and packed rows with step-level weights)."""
    tok, idx = tiny_qwen_tokenizer, [0, 1, 2, 3]
    if packed:
        micro = make_packed_micro_batches(PROMPTS, OUTPUTS, idx, tok, token_budget=64)
        assert len(micro) < len(idx)
    else:
        micro = make_micro_batches(PROMPTS, OUTPUTS, idx, 2, tok)
    results = []
    for fused in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
        set_attention_backend(model, "varlen", "cpu")
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = train_step(model, opt, micro, 1.0, "per_example", grad_clip=0.0, chunk_size=16, fused_lm_head=fused)
        results.append((stats, dict(model.named_parameters())))
    (a, pa), (b, pb) = results
    for key in ("loss", "nll_per_token", "grad_norm", "token_entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert b["response_tokens"] == a["response_tokens"]
    for name, p in pa.items():
        torch.testing.assert_close(pb[name], p, atol=1e-6, rtol=1e-4, msg=name)


def test_fused_lm_head_needs_chunks(tiny_qwen_dir, tiny_qwen_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="chunk_size > 0"):
        train_step(model, opt, [tokenize_prompt_and_output(PROMPTS, OUTPUTS, tiny_qwen_tokenizer)], 1.0,
                   fused_lm_head=True)
