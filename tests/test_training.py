"""The shared training step, teacher-forced evaluation, schedules and MFU accounting."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from utils.post_train import tokenize_prompt_and_output
from utils.training import (NonFiniteLossError, build_optimizer, evaluate_loss, lr_at_step, teacher_forced_eval,
                            train_step)


def test_lr_schedules_at_known_steps():
    # constant with warmup 4: 0.25, 0.5, 0.75, 1.0, then flat
    assert [lr_at_step(s, 1.0, "constant", 10, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # cosine, warmup 3% of 100 steps = 3, from 2e-5 to 2e-6 (the instruction reference)
    lrs = [lr_at_step(s, 2e-5, "cosine", 100, 3, 2e-6) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-5 / 3) and lrs[2] == pytest.approx(2e-5)
    assert lrs[3] == pytest.approx(2e-5)  # decay starts at peak
    assert lrs[99] == pytest.approx(2e-6)  # ends at min_lr
    mid = 3 + (99 - 3) / 2  # halfway through the decay the cosine is at the midpoint
    assert lr_at_step(int(mid), 2e-5, "cosine", 100, 3, 2e-6) == pytest.approx(1.1e-5)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at_step(5, 1.0, "linear", 11, 0, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        lr_at_step(0, 1.0, "step", 10)


def test_train_step_lowers_loss_and_changes_every_parameter(model_and_batch):
    model, tok, prompts, outputs = model_and_batch
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    mb = tokenize_prompt_and_output(prompts, outputs, tok)
    losses = [train_step(model, opt, [mb], lr=1e-2)["nll_per_token"] for _ in range(8)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"


@pytest.mark.parametrize("split", [(0, 2, 4), (0, 3, 4)])
@pytest.mark.parametrize("normalization", ["step_tokens", "per_example", "constant"])
def test_gradient_accumulation_matches_one_big_batch(model_and_batch, tiny_qwen_dir, normalization, split):
    """4 examples in one micro-batch == micro-batches of 2 + 2 or 3 + 1, for every normalization.

    SGD with lr 1 makes the update equal the gradient, so parameters compare gradients exactly (Adam's first step
    is ~lr * sign(g) and would amplify rounding where g ~ 0).
    """
    model, tok, prompts, outputs = model_and_batch
    twin = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    opt_a, opt_b = torch.optim.SGD(model.parameters(), lr=1.0), torch.optim.SGD(twin.parameters(), lr=1.0)
    big = [tokenize_prompt_and_output(prompts, outputs, tok)]
    small = [tokenize_prompt_and_output(prompts[i:j], outputs[i:j], tok) for i, j in zip(split, split[1:])]
    a = train_step(model, opt_a, big, 1.0, normalization, grad_clip=0.0)
    b = train_step(twin, opt_b, small, 1.0, normalization, grad_clip=0.0)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert a["nll_per_token"] == pytest.approx(b["nll_per_token"], rel=1e-6)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_evaluate_loss_takes_the_first_rows_in_micro_batches_and_equals_one_big_batch(model_and_batch):
    """The instruction trainer's test loss: `max_rows` rows, `micro_batch_size` at a time, the same per-token mean
    and entropy as one teacher-forced pass over those rows (padding never counts)."""
    from utils.distributed import DistInfo

    model, tok, prompts, outputs = model_and_batch
    asked = []

    def make_batch(rows):
        asked.append(rows)
        return tokenize_prompt_and_output([prompts[i] for i in rows], [outputs[i] for i in rows], tok)

    got = evaluate_loss(model, len(prompts), make_batch, 2, DistInfo(), max_rows=3)
    assert asked == [[0, 1], [2]]
    ref = teacher_forced_eval(model, [tokenize_prompt_and_output(prompts[:3], outputs[:3], tok)])
    assert got["eval/test_tokens"] == ref["response_tokens"] > 0
    assert got["eval/test_loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["eval/test_token_entropy"] == pytest.approx(ref["token_entropy"], rel=1e-5)


def test_non_finite_loss_raises_and_leaves_weights(model_and_batch):
    model, tok, prompts, outputs = model_and_batch
    opt = build_optimizer(model, 1e-2, 0.0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NonFiniteLossError):
        train_step(model, opt, [tokenize_prompt_and_output(prompts, outputs, tok)], 1e-2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], equal_nan=True)


@pytest.mark.parametrize("attention", ["varlen", "sdpa"])
@pytest.mark.parametrize("normalization", ["per_example", "step_tokens", "constant"])
def test_packed_step_equals_padded_step(model_and_batch, tiny_qwen_dir, normalization, attention):
    """Best-fit packed rows, attention kept inside examples (varlen boundaries or a block mask) and step-level
    weights give the padded path's update exactly."""
    from utils.dataloader import make_micro_batches
    from utils.packing import make_packed_micro_batches
    from utils.doc_attention import set_attention_backend

    model, tok, prompts, outputs = model_and_batch
    twin = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    set_attention_backend(twin, attention, "cpu")
    opt_a, opt_b = torch.optim.SGD(model.parameters(), lr=1.0), torch.optim.SGD(twin.parameters(), lr=1.0)
    idx = [0, 1, 2, 3]
    padded = make_micro_batches(prompts, outputs, idx, 2, tok)  # GA = 2 equal micro-batches
    lengths = [len(tok(p + o)["input_ids"]) for p, o in zip(prompts, outputs)]
    packed = make_packed_micro_batches(prompts, outputs, idx, tok, token_budget=sum(lengths) // 2 + 8,
                                       normalization=normalization, normalize_constant=3.0, attention=attention)
    assert len(packed) < len(idx)
    if attention == "varlen":  # some row holds several examples: more than one segment
        assert any(len(r["cu_seq_lens_q"]) > 2 for r in packed) and "attention_mask" not in packed[0]
    else:
        assert any(int(r["attention_mask"][0, 0].sum()) < r["input_ids"].numel() ** 2 for r in packed)
    a = train_step(model, opt_a, padded, 1.0, normalization, normalize_constant=3.0, grad_clip=0.0)
    b = train_step(twin, opt_b, packed, 1.0, normalization, normalize_constant=3.0, grad_clip=0.0)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["nll_per_token"] == pytest.approx(a["nll_per_token"], rel=1e-5)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-4, msg=n)


# ----------------------------------------------------------------------------------------------------------- MFU
def test_matmul_parameters_drop_the_input_embedding_biases_and_norms(tiny_qwen_dir, tiny_llama_dir):
    from utils.training import matmul_parameters

    for folder in (tiny_qwen_dir, tiny_llama_dir):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        head = model.get_output_embeddings().weight.numel()
        tied = model.config.tie_word_embeddings
        # every weight matrix but the lookup table, plus the head as a matmul, tied or not
        matrices = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and p.dim() == 2)
        assert matmul_parameters(model) == matrices + (head if tied else 0)
        assert any(p.dim() == 1 for p in model.parameters())  # norm scales (and Qwen2's q/k/v biases) left out
        assert matmul_parameters(model, trainable_only=True) == matmul_parameters(model)  # everything trains


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_flops_equal_torch_flop_counter(lora):
    """The matmul FLOPs of one forward + backward, counted by torch's FlopCounterMode, against training_flops (no
    attention term here: CPU sdpa has no FLOP formula, so the counter sees the linear layers only). Full finetuning:
    exactly 6 x matrix entries x tokens. LoRA: frozen matrices get no weight gradient, 4 x N + 2 x trainable; the
    formula's documented overcount is the first layer's input gradient (q, k, v and their lora_A read the
    embedding output, which needs no gradient when the embedding is frozen)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config

    from utils.lora import DEFAULT_TARGET_MODULES, apply_lora
    from utils.training import matmul_parameters, training_flops

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        model = apply_lora(model, 4, 8.0, 0.0, DEFAULT_TARGET_MODULES)
    ids = torch.randint(0, 300, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    assert {str(op) for op in counts} <= {"aten.mm", "aten.addmm", "aten.bmm"}
    measured, tokens = sum(counts.values()), ids.numel()
    n, trainable = matmul_parameters(model), matmul_parameters(model, trainable_only=True)
    formula = training_flops(n, 2, 64, tokens, 0, trainable)
    if not lora:
        assert trainable == n and measured == formula == 6 * n * tokens
        return
    first_layer_inputs = sum(p.numel() for name, p in model.named_parameters() if ".layers.0.self_attn." in name
                             and any(f"{m}." in name for m in ("q_proj", "k_proj", "v_proj"))
                             and "lora_B" not in name and p.dim() == 2)  # fmt: skip
    assert 0 < trainable < n and measured == formula - 2 * first_layer_inputs * tokens
    assert 6 * n * tokens > 1.4 * measured  # what the all-trainable formula would have claimed


def test_step_flop_counts_packed_equal_padded_on_the_same_documents():
    from utils.training import step_flop_counts, training_flops

    lengths = [3, 5, 2]  # three documents
    # padded: one row each, right padding to 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    padded = [{"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": mask}]
    # packed: one row of 10, positions restart per document
    packed = [{"input_ids": torch.zeros(1, 10, dtype=torch.long),
               "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])}]
    pairs = sum(n * (n + 1) // 2 for n in lengths)  # 6 + 15 + 3
    assert step_flop_counts(padded) == (10, 24) == (sum(lengths), pairs)
    assert step_flop_counts(packed) == (10, 24)
    # no mask, no positions: every token real, one causal document per row
    assert step_flop_counts([{"input_ids": torch.zeros(2, 4, dtype=torch.long)}]) == (8, 20)
    # by hand: 6 FLOPs per matmul parameter per token, 12 x layers x width per pair
    assert training_flops(1000, 2, 64, 10, 24) == 6 * 1000 * 10 + 12 * 2 * 64 * 24
    # 100 of the 1000 train (LoRA): 4 per parameter (forward, input gradient), 2 more per trainable one
    assert training_flops(1000, 2, 64, 10, 24, 100) == (4 * 1000 + 2 * 100) * 10 + 12 * 2 * 64 * 24


def test_gpu_step_metrics_empty_off_cuda():
    from utils.training import gpu_step_metrics

    assert gpu_step_metrics(1e12, 1.0, 989.0, "cpu") == {}
