"""The memory plan: exact parameter counts from config.json alone, byte arithmetic by hand, verdicts and options."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from utils.memory_plan import GIB, ModelShape, TrainSetup, format_plan, options_that_fit, plan_memory

# Shapes written here (no download): the published models' config values.
LLAMA_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
            "attention_bias": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}  # fmt: skip
QWEN_15B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
            "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6}  # fmt: skip


@pytest.mark.parametrize("config, published", [(LLAMA_8B, 8_030_261_248), (QWEN_15B, 1_543_714_304)])
def test_parameter_count_equals_the_model_transformers_builds(config, published):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(hf_config)
    built = sum(p.numel() for p in model.parameters())
    assert ModelShape.from_config(config).parameters() == built == published


def test_bytes_by_hand_llama8b_mixed_one_gpu_does_not_fit():
    shape = ModelShape.from_config(LLAMA_8B, name="Llama-3.1-8B")
    P = 8_030_261_248
    setup = TrainSetup(precision="mixed", world_size=1, micro_batch_size=4, seq_len=512, chunk_size=0)
    plan = plan_memory(shape, setup, 80 * GIB)
    assert plan.terms["weights"] == 4 * P and plan.terms["gradients"] == 4 * P
    assert plan.terms["optimizer (AdamW moments)"] == 8 * P and plan.terms["bf16 weight copies (autocast)"] == 2 * P
    tokens = 4 * 512
    assert plan.terms["activations"] == tokens * 32 * (10 * 4096 + 4 * 14336) * 2
    assert plan.terms["loss head (logits)"] == tokens * 128256 * 10
    assert not plan.fits and plan.train_bytes > 128 * GIB  # ~128 GiB before activations
    text = format_plan(plan)
    assert "Llama-3.1-8B, 8.03B parameters" in text and "DOES NOT FIT" in text
    options = options_that_fit(shape, setup, 80 * GIB)
    assert "torchrun with 4 GPUs (FSDP)" in options and "torchrun with 2 GPUs (FSDP)" not in options
    for option in options:  # every option offered does fit
        assert "GPUs" in option or option.startswith("--")
    assert "--gradient-checkpointing" not in options  # the static terms alone exceed 80 GiB


def test_fsdp_divides_the_static_terms_and_sleep_frees_vllm():
    shape = ModelShape.from_config(LLAMA_8B)
    one = plan_memory(shape, TrainSetup(precision="bf16"), 80 * GIB)
    eight = plan_memory(shape, TrainSetup(precision="bf16", world_size=8), 80 * GIB)
    for term in ("weights", "gradients", "optimizer (AdamW moments)"):
        assert eight.terms[term] == one.terms[term] // 8
    assert eight.terms["activations"] == one.terms["activations"]  # per GPU, per micro-batch
    q15 = ModelShape.from_config(QWEN_15B)
    awake = plan_memory(q15, TrainSetup(vllm_share=0.3, seq_len=1024), 80 * GIB)
    asleep = plan_memory(q15, TrainSetup(vllm_share=0.3, seq_len=1024, vllm_sleeps=True), 80 * GIB)
    assert awake.train_bytes - asleep.train_bytes == int(0.3 * 80 * GIB)
    assert asleep.eval_bytes == awake.eval_bytes  # the engine is awake while it evaluates either way
    assert awake.fits and asleep.fits


def test_gradient_checkpointing_and_chunking_shrink_what_they_should():
    shape = ModelShape.from_config(QWEN_15B)
    base = TrainSetup(micro_batch_size=2, seq_len=2048)
    full = plan_memory(shape, base, 80 * GIB)
    ckpt = plan_memory(shape, TrainSetup(micro_batch_size=2, seq_len=2048, gradient_checkpointing=True), 80 * GIB)
    chunked = plan_memory(shape, TrainSetup(micro_batch_size=2, seq_len=2048, chunk_size=1024), 80 * GIB)
    per_layer = 4096 * (10 * 1536 + 4 * 8960) * 2
    assert full.terms["activations"] == 28 * per_layer
    assert ckpt.terms["activations"] == 4096 * 28 * 1536 * 2 + per_layer
    assert chunked.terms["loss head (logits)"] * 4 == full.terms["loss head (logits)"]


def test_config_without_sizes_is_a_clear_error():
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        ModelShape.from_config({"model_type": "bert"})


def test_lora_terms_by_hand_and_llama8b_fits_one_gpu_with_lora():
    """Llama-3.1-8B, pure bf16 on one GPU: full fine-tuning needs ~60 GiB of static terms, so 24 GiB says no and offers
    --lora-r 16 (frozen bf16 base 15 GiB, ~42M fp32 adapters); at 80 GiB LoRA fits without gradient checkpointing."""
    shape = ModelShape.from_config(LLAMA_8B, name="Llama-3.1-8B")
    P = 8_030_261_248
    per_layer = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336)  # q, k, v, o, gate, up, down
    A = 32 * 16 * per_layer
    assert shape.lora_parameters(16) == A == 41_943_040
    small = TrainSetup(precision="bf16", micro_batch_size=1, seq_len=2048, gradient_checkpointing=True,
                       chunk_size=4096)
    assert not plan_memory(shape, small, 24 * GIB).fits
    assert "--lora-r 16 (frozen base, adapters only)" in options_that_fit(shape, small, 24 * GIB)
    lora = plan_memory(shape, dataclasses.replace(small, lora_r=16), 24 * GIB)
    assert lora.terms["weights"] == 2 * P + 4 * A
    assert lora.terms["gradients"] == 4 * A and lora.terms["optimizer (AdamW moments)"] == 8 * A
    assert lora.terms["activations"] == plan_memory(shape, small, 24 * GIB).terms["activations"]
    assert lora.fits and lora.peak_bytes < 22 * GIB
    assert "LoRA r 16 (41.9M trainable)" in format_plan(lora)
    big = TrainSetup(precision="bf16", micro_batch_size=4, seq_len=512, lora_r=16)
    assert plan_memory(shape, big, 80 * GIB).fits
    assert not any("torchrun" in o for o in options_that_fit(shape, TrainSetup(lora_r=16, seq_len=65536), 24 * GIB))
    with pytest.raises(ValueError, match="one process"):
        plan_memory(shape, TrainSetup(lora_r=16, world_size=2), 80 * GIB)
