"""A weight sync must not leave vLLM reusing prompt KV computed with the old weights.

vLLM caches the KV of full prompt blocks (prefix caching, on by default) keyed by token ids only. A prompt shorter
than one KV block (128 tokens on CPU, 16 on GPU) is never cached, so these tests use prompts spanning several blocks:
a short-prompt test would pass with a stale cache.

Engines here are built one at a time, each closed before the next (vLLM's parallel state is process-global).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import diversified_copy, has_vllm

from utils.inference import SamplingConfig, make_engine

pytestmark = pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed (pip install -r requirements-cpu.txt)")

CPU_KV_BLOCK = 128  # tokens per KV block of vLLM's CPU backend
GREEDY = SamplingConfig(temperature=0.0, max_tokens=24)
SENTENCES = [
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it.",
    "Let me add the numbers step by step. 12 + 35 = 47, so the answer is 47.",
    "Write a short poem about the sea. The waves roll in, the gulls cry, and the tide goes out again.",
    "The fraction \\frac{1}{2} equals 0.5 and \\sqrt{2}/2 is about 0.707.",
]


def _long_prompts(tokenizer, min_tokens: int) -> list[str]:
    """Three different prompts, each at least `min_tokens` tokens long."""
    prompts = []
    for shift in range(3):
        text = ""
        i = shift
        while len(tokenizer(text)["input_ids"]) < min_tokens:
            text += SENTENCES[i % len(SENTENCES)] + " "
            i += 1
        prompts.append(text + "Question " + str(shift) + ":")
    return prompts


def _ids(outs):
    return [[c.token_ids for c in x] for x in outs]


def _perturb(policy, seed: int) -> None:
    """New weights for every matrix: greedy continuations of every prompt change."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_sync_after_long_prompts_equals_fresh_engine_and_hf(family, tmp_path, tiny_qwen_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    src = tiny_qwen_dir if family == "qwen2" else tiny_llama_dir
    dir_a = diversified_copy(src, tmp_path / "a")
    policy = AutoModelForCausalLM.from_pretrained(dir_a, dtype=torch.float32)
    tokenizer = make_engine(policy, engine="hf").tokenizer
    prompts = _long_prompts(tokenizer, min_tokens=3 * CPU_KV_BLOCK + 20)  # three full blocks cached per prompt
    assert all(len(tokenizer(p)["input_ids"]) > 3 * CPU_KV_BLOCK for p in prompts)

    engine = make_engine(policy, engine="vllm", max_model_len=1024, max_num_seqs=4, enforce_eager=True)
    try:
        before = engine.generate(prompts, GREEDY, use_tqdm=False)  # fills the prefix cache with weights-A KV
        assert _ids(before) == _ids(make_engine(policy, engine="hf").generate(prompts, GREEDY, use_tqdm=False))
        policy_b = copy.deepcopy(policy)
        _perturb(policy_b, seed=3)
        engine.load_weights(policy_b)
        synced = engine.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        engine.close()

    hf_b = make_engine(policy_b, engine="hf").generate(prompts, GREEDY, use_tqdm=False)
    assert _ids(hf_b) != _ids(before)  # the new weights change every test's outcome
    dir_b = tmp_path / "b"
    policy_b.save_pretrained(dir_b)
    tokenizer.save_pretrained(dir_b)
    fresh = make_engine(dir_b, engine="vllm", dtype="float32", max_model_len=1024, max_num_seqs=4, enforce_eager=True)
    try:
        fresh_b = fresh.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        fresh.close()
    assert _ids(fresh_b) == _ids(hf_b)
    assert _ids(synced) == _ids(fresh_b)  # fails when the sync keeps weights-A prompt KV
