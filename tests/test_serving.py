"""Servable checkpoints: the save dtype and what config.json says, full-precision resume state in trainer_state/,
the old layout still resuming, the training prompt as chat template (byte for byte), generation EOS, eval dtype."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from utils.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from utils.helper_fns import load_prompt
from utils.instruct_dataset import fill_template
from utils.post_train import tokenize_prompt_and_output
from utils.serving import (adds_bos, chat_template_for, resolve_eval_dtype, resolve_save_dtype,
                           set_training_chat_template)  # fmt: skip
from utils.training import build_optimizer, train_step

QUESTIONS = ["What is 12 + 35?", 'A {brace}, a "quote", {% jinja %} and é, 😀\nacross lines', ""]


def _ids(out):
    """apply_chat_template(tokenize=True) returns ids or a BatchEncoding depending on the transformers version."""
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.mark.parametrize("question", QUESTIONS)
def test_r1_zero_chat_template_reproduces_the_training_prompt(tiny_qwen_tokenizer, question):
    tok = tiny_qwen_tokenizer
    template = load_prompt("r1_zero")
    tok.chat_template = chat_template_for(template, "{question}")
    msgs = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    trained = template.replace("{question}", question)  # utils.dataloader.format_prompts
    assert text == trained
    ids = _ids(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
    assert ids == tokenize_prompt_and_output([trained], [" x"], tok)["input_ids"][0][: len(ids)].tolist()
    assert ids == tok(trained, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_alpaca_chat_template_reproduces_the_training_document(tiny_llama_tokenizer, question):
    tok = tiny_llama_tokenizer
    assert adds_bos(tok)  # the Llama tokenizer adds BOS, as Llama-3's does; the template must carry it
    template = load_prompt("alpaca_sft")
    set_training_chat_template(tok, template, "{instruction}", with_bos=True, with_eos=True)
    doc, prompt_part = fill_template(template, question, "The answer.")
    msgs = [{"role": "user", "content": question}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.bos_token + prompt_part
    ids = _ids(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True))
    assert ids == tok(prompt_part)["input_ids"]  # utils.instruct_dataset tokenizes with default special tokens
    full = _ids(tok.apply_chat_template(msgs + [{"role": "assistant", "content": "The answer."}], tokenize=True))
    assert full == tok(doc)["input_ids"] + [tok.eos_token_id]  # each training document ends in EOS
    with pytest.raises(Exception, match="one user message"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_bf16_save_is_served_in_bf16_and_resumes_exactly(model_and_batch, tmp_path, tiny_qwen_dir):
    model, tok, prompts, outputs = model_and_batch
    tok = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    set_training_chat_template(tok, load_prompt("r1_zero"), "{question}", with_bos=False, with_eos=False)
    opt = build_optimizer(model, 1e-2, 0.0)
    train_step(model, opt, [tokenize_prompt_and_output(prompts, outputs, tok)], 1e-2)
    assert resolve_save_dtype("auto", tiny_qwen_dir) == "float32"  # the tiny model declares float32
    ckpt = save_checkpoint(tmp_path, 1, model, tok, opt, {"step": 1}, save_dtype="bfloat16")

    # served folder: bf16 tensors, config.json says so, HF loads it in bf16 with dtype="auto", EOS in generation config
    served = load_file(ckpt / "model.safetensors")
    assert {v.dtype for v in served.values()} == {torch.bfloat16}
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto").dtype == torch.bfloat16
    eos = GenerationConfig.from_pretrained(ckpt).eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    reloaded = AutoTokenizer.from_pretrained(ckpt)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert reloaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        load_prompt("r1_zero").replace("{question}", "What is 2 + 2?")
    assert not (ckpt / "trainer_state.pt").exists() and (ckpt / "trainer_state" / "trainer_state.pt").is_file()

    # resume restores the fp32 weights exactly (from trainer_state/), not their bf16 rounding
    fresh = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    fresh_opt = build_optimizer(fresh, 1e-2, 0.0)
    assert load_checkpoint(ckpt, fresh, fresh_opt) == {"step": 1}
    rounded = 0
    for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)
        rounded += int(not torch.equal(q.to(torch.bfloat16).float(), q))
    assert rounded > 0  # bf16 would have changed them: the test sees the difference it guards

    # the layout before trainer_state/ (trainer_state.pt beside the weights) still resumes
    old = tmp_path / "old" / "step_000001"
    shutil.copytree(ckpt, old)
    (old / "trainer_state" / "trainer_state.pt").rename(old / "trainer_state.pt")
    shutil.rmtree(old / "trainer_state")
    assert latest_checkpoint(tmp_path / "old") == old
    assert load_checkpoint(old, fresh, build_optimizer(fresh, 1e-2, 0.0)) == {"step": 1}


def test_float32_save_keeps_no_second_copy(model_and_batch, tmp_path):
    model, tok, _, _ = model_and_batch
    ckpt = save_checkpoint(tmp_path, 1, model, tok, None, {"step": 1}, save_dtype="float32")
    assert not (ckpt / "trainer_state" / "model.safetensors").exists()
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("requested, on_cuda, expected", [
    ("auto", True, "bfloat16"), ("auto", False, "float32"), ("float32", True, "float32"), ("float16", False, "float16"),
])  # fmt: skip
def test_eval_dtype_bf16_on_cuda_for_fp32_checkpoints(tiny_qwen_dir, requested, on_cuda, expected):
    dtype, why = resolve_eval_dtype(requested, tiny_qwen_dir, on_cuda)
    assert dtype == expected and why


def test_only_the_rotary_reload_warning_is_dropped():
    import logging

    from utils.vllm_engine import HarmlessReloadWarningFilter

    def record(layer):
        return logging.LogRecord(HarmlessReloadWarningFilter.LOGGER, logging.WARNING, "layerwise.py", 266,
                                 "%s: Failed to load weights", (layer,), None)  # fmt: skip

    f = HarmlessReloadWarningFilter()
    assert not f.filter(record("RotaryEmbedding")) and not f.filter(record("Llama3RotaryEmbedding"))
    assert f.filter(record("QKVParallelLinear")) and f.filter(record("VocabParallelEmbedding"))


@pytest.mark.parametrize("requested, engine, policy, vllm_device, expected", [
    (None, "auto", "cuda", None, True),          # colocated on GPU 0: sleep by default
    (None, "vllm", "cuda:0", "cuda:0", True),
    (None, "vllm", "cuda:0", "cuda:1", False),   # vLLM on its own GPU: nothing to give back
    (True, "vllm", "cuda:0", "cuda:1", True),    # asked for: honoured
    (False, "vllm", "cuda", None, False),
    (True, "auto", "cpu", None, False),          # CPU: accepted, not applicable
    (None, "hf", "cuda", None, False),           # the HF engine is the live policy
])  # fmt: skip
def test_vllm_sleep_default_and_not_applicable_cases(requested, engine, policy, vllm_device, expected):
    from utils.reason_validation import resolve_vllm_sleep

    sleeps, why = resolve_vllm_sleep(requested, engine, policy, vllm_device)
    assert sleeps is expected and why
    if policy == "cpu" or engine == "hf":
        assert "not applicable" in why
