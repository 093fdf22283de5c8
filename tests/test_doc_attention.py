"""Document attention backends: the per-document kernel against a block mask, gradients through
a real model, and the varlen implementation leaving padded batches and generation exactly as SDPA has them."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import diversified_copy

from utils.doc_attention import (FLEX_IMPLEMENTATION, VARLEN_IMPLEMENTATION, register_attention_functions,
                                 sdpa_per_document, set_attention_backend, varlen_call_options)
from utils.inference import HFEngine, SamplingConfig
from utils.packing import (collate_packed, cu_seqlens_from_document_ids, document_causal_mask,
                           pack_best_fit_decreasing, packed_model_inputs)
from utils.post_train import get_response_log_probs


def test_sdpa_per_document_matches_block_mask():
    """float64, grouped-query heads (4 query heads on 2 KV heads), segments of length 1 to 9 across two rows."""
    g = torch.Generator().manual_seed(1)
    doc = torch.tensor([[0] * 9 + [1] + [2] * 4 + [-1] * 2, [0] * 3 + [1] * 7 + [2] * 6])  # (2, 16)
    B, T, H, Hkv, D = 2, 16, 4, 2, 8
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc),
                                                           enable_gqa=True)  # (B, H, T, D)
    cu, _ = cu_seqlens_from_document_ids(doc)
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)  # noqa: E731
    out = sdpa_per_document(flat(q), flat(k), flat(v), cu, scale=None).reshape(B, T, H, D).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # a different scale is honoured, not silently replaced by 1/sqrt(D)
    scaled = sdpa_per_document(flat(q), flat(k), flat(v), cu, scale=0.5).reshape(B, T, H, D).transpose(1, 2)
    ref_scaled = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(doc),
                                                                  enable_gqa=True, scale=0.5)
    torch.testing.assert_close(scaled, ref_scaled, atol=1e-12, rtol=0)
    assert (scaled - out).abs().max() > 1e-3


@pytest.mark.parametrize(
    "parameters,expected",
    [
        (["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal"],  # torch 2.10
         {"causal": {"is_causal": True}, "gqa": False, "scale": False}),
        (["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale", "window_size", "enable_gqa"],
         {"causal": {"window_size": (-1, 0)}, "gqa": True, "scale": True}),
        (["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "window_size"],
         {"causal": {"window_size": (-1, 0)}, "gqa": False, "scale": False}),
    ],
)
def test_varlen_call_options(parameters, expected):
    assert varlen_call_options(parameters) == expected


def test_varlen_call_options_unknown_api():
    with pytest.raises(RuntimeError, match="neither window_size nor is_causal"):
        varlen_call_options(["query", "key", "value"])


def test_installed_torch_varlen_signature_is_understood():
    import inspect

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    options = varlen_call_options(inspect.signature(varlen.varlen_attn).parameters)
    assert options["causal"] in ({"is_causal": True}, {"window_size": (-1, 0)})


def test_flash_attn_package_is_preferred_and_called_right(monkeypatch):
    """With flash-attn importable its varlen function is the CUDA kernel: called causal, with the scale, and with
    the KV heads as they are (it shares them itself); the result equals the per-document reference."""
    import sys
    import types

    import utils.doc_attention as da

    calls = []

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and dropout_p == 0.0 and k.shape[1] == 2 and q.shape[1] == 4
        calls.append(softmax_scale)
        return sdpa_per_document(q, k, v, cu_q, softmax_scale)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    kernel = da._load_varlen_kernel()
    assert kernel[1]["name"] == "flash-attn"
    monkeypatch.setattr(da, "_VARLEN_KERNEL", kernel)
    monkeypatch.setattr(da, "_flash_capable", lambda q: True)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(12, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(12, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 5, 12])
    torch.testing.assert_close(da.varlen_attention(q, k, v, cu, 7, scale=0.25),
                               sdpa_per_document(q, k, v, cu, 0.25), atol=1e-12, rtol=0)
    assert calls == [0.25]
    monkeypatch.delitem(sys.modules, "flash_attn")
    assert da._load_varlen_kernel()[1]["name"] == "torch varlen_attn"  # without the package: PyTorch's


def _packed_batch(tokenizer, n_docs=7, budget=96, pad_to=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 40, (n_docs,), generator=g).tolist()
    examples = []
    for n in lengths:
        ids = torch.randint(0, len(tokenizer), (n + 1,), generator=g)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 3 :] = True
        examples.append({"input_ids": ids[:-1], "labels": ids[1:], "response_mask": mask})
    bins = pack_best_fit_decreasing(lengths, budget)
    assert len(bins) >= 2 and any(len(b) >= 2 for b in bins)
    return examples, collate_packed(examples, bins, tokenizer.pad_token_id or 0, pad_to=pad_to)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_varlen_model_matches_block_mask_and_each_document_alone(family, tiny_qwen_dir, tiny_llama_dir,
                                                                 tiny_qwen_tokenizer, tiny_llama_tokenizer):
    """Two packed rows through a real model: log-probs and every parameter gradient under "sft_varlen" equal the
    block-mask SDPA run, and each document's log-probs equal the document run alone."""
    path, tok = (tiny_qwen_dir, tiny_qwen_tokenizer) if family == "qwen2" else (tiny_llama_dir, tiny_llama_tokenizer)
    examples, batch = _packed_batch(tok)
    results = {}
    for attention in ("sdpa", "varlen"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        set_attention_backend(model, attention, "cpu")
        extra = packed_model_inputs(batch["position_ids"], batch["document_ids"], attention)
        lp = get_response_log_probs(model, batch["input_ids"], batch["labels"], use_cache=False, **extra)["log_probs"]
        (lp * batch["response_mask"]).sum().backward()
        results[attention] = (lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.config._attn_implementation == VARLEN_IMPLEMENTATION
    torch.testing.assert_close(results["varlen"][0], results["sdpa"][0], atol=1e-5, rtol=0)
    for name, grad in results["sdpa"][1].items():
        torch.testing.assert_close(results["varlen"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    index = batch["example_index"]
    with torch.no_grad():
        for i, ex in enumerate(examples):
            alone = get_response_log_probs(model, ex["input_ids"][None], ex["labels"][None])["log_probs"][0]
            torch.testing.assert_close(results["varlen"][0][index == i], alone, atol=1e-5, rtol=0)


def test_varlen_without_boundaries_finds_documents_from_positions(tiny_qwen_dir, tiny_qwen_tokenizer):
    """A caller that passes packed position_ids but no boundaries still gets per-document attention, not
    attention across the row."""
    _, batch = _packed_batch(tiny_qwen_tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    set_attention_backend(model, "varlen", "cpu")
    with torch.no_grad():
        full = packed_model_inputs(batch["position_ids"], batch["document_ids"], "varlen")
        ref = get_response_log_probs(model, batch["input_ids"], batch["labels"], use_cache=False, **full)
        positions_only = get_response_log_probs(model, batch["input_ids"], batch["labels"], use_cache=False,
                                                position_ids=batch["position_ids"])
        across = get_response_log_probs(model, batch["input_ids"], batch["labels"], use_cache=False)
    torch.testing.assert_close(positions_only["log_probs"], ref["log_probs"], atol=1e-6, rtol=0)
    assert (across["log_probs"] - ref["log_probs"]).abs().max() > 1e-3  # the negative control


def test_varlen_leaves_padded_batches_and_generation_as_sdpa(tiny_qwen_dir, tmp_path):
    """Right-padded training batches and left-padded cached generation are unchanged by the varlen
    implementation (it hands them to transformers' SDPA path)."""
    path = diversified_copy(tiny_qwen_dir, tmp_path / "model")
    models = {a: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for a in ("sdpa", "varlen")}
    set_attention_backend(models["varlen"], "varlen", "cpu")
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.randint(0, len(tok), (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        out = {a: m(ids, attention_mask=mask).logits for a, m in models.items()}
    keep = mask.bool()
    torch.testing.assert_close(out["varlen"][keep], out["sdpa"][keep], atol=1e-6, rtol=0)
    prompts = ["What is 2+3?", "A much longer question about adding numbers: what is 12+30?", "Hi"]
    greedy = SamplingConfig(temperature=0.0, max_tokens=12)
    texts = {a: [c[0].token_ids for c in HFEngine(m, tok).generate(prompts, greedy, use_tqdm=False)]
             for a, m in models.items()}
    assert texts["varlen"] == texts["sdpa"] and all(len(t) > 0 for t in texts["sdpa"])


def test_flex_matches_block_mask_forward(tiny_qwen_dir, tiny_qwen_tokenizer):
    """FlexAttention from restarting positions equals the block mask (forward only: no FlexAttention backward
    on CPU, which is why --attention flex is refused off CUDA)."""
    _, batch = _packed_batch(tiny_qwen_tokenizer, seed=5)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="flex needs CUDA"):
        set_attention_backend(model, "flex", "cpu")
    with torch.no_grad():
        ref = get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                     **packed_model_inputs(batch["position_ids"], batch["document_ids"], "sdpa"))
        register_attention_functions()
        model.set_attn_implementation(FLEX_IMPLEMENTATION)
        flex = get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                      **packed_model_inputs(batch["position_ids"], batch["document_ids"], "flex"))
    torch.testing.assert_close(flex["log_probs"], ref["log_probs"], atol=1e-5, rtol=0)


def test_kernels_get_autocast_dtype_inputs(monkeypatch, tiny_qwen_dir, tiny_qwen_tokenizer):
    """Under bf16 autocast RoPE hands fp32 q/k to attention; the varlen and flex functions cast them as autocast
    casts SDPA's inputs (FlexAttention would otherwise run fp32 kernels, the flash varlen kernel refuse them)."""
    import transformers.integrations.flex_attention as hf_flex

    import utils.doc_attention as da

    seen = []
    real_varlen, real_flex = da.varlen_attention, hf_flex.flex_attention_forward
    monkeypatch.setattr(da, "varlen_attention", lambda q, k, v, *a: seen.append(("varlen", q.dtype, k.dtype, v.dtype))
                        or real_varlen(q, k, v, *a))
    monkeypatch.setattr(hf_flex, "flex_attention_forward",
                        lambda m, q, k, v, *a, **kw: seen.append(("flex", q.dtype, k.dtype, v.dtype))
                        or real_flex(m, q, k, v, *a, **kw))
    _, batch = _packed_batch(tiny_qwen_tokenizer, seed=6)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    register_attention_functions()
    for implementation, attention in ((VARLEN_IMPLEMENTATION, "varlen"), (FLEX_IMPLEMENTATION, "flex")):
        model.set_attn_implementation(implementation)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                   **packed_model_inputs(batch["position_ids"], batch["document_ids"], attention))
    assert {s[0] for s in seen} == {"varlen", "flex"}
    assert all(s[1:] == (torch.bfloat16,) * 3 for s in seen), seen


def test_backend_is_not_saved_with_the_model(tiny_qwen_dir, tmp_path):
    """vLLM and later loads read config.json: the training-time attention choice must not end up there."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    set_attention_backend(model, "varlen", "cpu")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert VARLEN_IMPLEMENTATION not in json.dumps(config)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("options", [
    {"causal": {"is_causal": True}, "gqa": False, "scale": False},  # torch 2.10's API
    {"causal": {"window_size": (-1, 0)}, "gqa": True, "scale": True},
])
def test_kernel_call_follows_each_api(monkeypatch, options):
    """The CUDA branch of `varlen_attention` with a stand-in kernel that checks the call and computes attention the
    way flash varlen defines it (1/sqrt(D) unless given a scale, KV heads shared only with enable_gqa): the
    result must equal the per-document reference for a non-default scale and grouped-query heads."""
    import utils.doc_attention as da

    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, window_size=(-1, -1), enable_gqa=False,
                    scale=None):
        assert is_causal or window_size == (-1, 0), "not causal"
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k == 9
        if not enable_gqa:
            assert k.shape[1] == q.shape[1], "GQA heads passed to a kernel without enable_gqa"
        calls.append(scale)
        return sdpa_per_document(q, k, v, cu_q, scale)

    monkeypatch.setattr(da, "_flash_capable", lambda q: True)
    monkeypatch.setattr(da, "_varlen_kernel", lambda: (fake_varlen, options))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(16, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(16, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 9, 10, 16])
    out = da.varlen_attention(q, k, v, cu, 9, scale=0.3)
    torch.testing.assert_close(out, sdpa_per_document(q, k, v, cu, 0.3), atol=1e-12, rtol=0)
    assert calls == ([0.3] if options["scale"] else [None])


@torch.library.custom_op("sft_tests::varlen_standin", mutates_args=())
def _varlen_standin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int, window_size: list[int], enable_gqa: bool, scale: float) -> torch.Tensor:
    return sdpa_per_document(q, k, v, cu_q, scale)


@_varlen_standin.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, window_size, enable_gqa, scale):
    return torch.empty_like(q)


def test_compiled_layer_on_the_packed_path_has_no_graph_break(monkeypatch, tiny_qwen_dir, tiny_qwen_tokenizer):
    """One decoder layer as --compile compiles it, packed inputs, bf16 autocast, with an opaque stand-in for the
    CUDA varlen op (PyTorch registers the real one as a custom op too): dynamo must capture one graph with no break,
    or every layer would split into eager pieces on the GPU."""
    import utils.doc_attention as da

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False, scale=None):
        return _varlen_standin(q, k, v, cu_q, cu_k, max_q, max_k, list(window_size), enable_gqa, scale)

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    set_attention_backend(model, "varlen", "cpu")
    monkeypatch.setattr(da, "_flash_capable", lambda q: True)
    options = {"causal": {"window_size": (-1, 0)}, "gqa": True, "scale": True}
    monkeypatch.setattr(da, "_VARLEN_KERNEL", (kernel, options))
    _, batch = _packed_batch(tiny_qwen_tokenizer, seed=7)
    extra = packed_model_inputs(batch["position_ids"], batch["document_ids"], "varlen")
    layer = model.get_decoder().layers[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.get_decoder().embed_tokens(batch["input_ids"])
        rope = model.get_decoder().rotary_emb(hidden, batch["position_ids"])
        kwargs = {k: v for k, v in extra.items() if k != "position_ids"}
        eager = layer(hidden, attention_mask=None, position_ids=batch["position_ids"], position_embeddings=rope,
                      use_cache=False, **kwargs)
        explained = torch._dynamo.explain(layer.__call__)(
            hidden, attention_mask=None, position_ids=batch["position_ids"], position_embeddings=rope, use_cache=False,
            **kwargs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    ref = model.get_decoder().layers[0]
    set_attention_backend(model, "sdpa", "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the stand-in path computed the right thing, too
        masked = ref(hidden, attention_mask=document_causal_mask(batch["document_ids"]),
                     position_ids=batch["position_ids"], position_embeddings=rope, use_cache=False)
    out, want = (x[0] if isinstance(x, tuple) else x for x in (eager, masked))
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=0)


def test_varlen_refuses_attention_features_it_does_not_implement(tiny_qwen_dir, tiny_qwen_tokenizer):
    """A sliding window (or softcap, or sinks) would be silently ignored by per-document causal attention: refuse."""
    cfg = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).config
    cfg.use_sliding_window, cfg.sliding_window, cfg.layer_types = True, 4, ["sliding_attention"] * cfg.num_hidden_layers
    model = AutoModelForCausalLM.from_config(cfg)
    set_attention_backend(model, "varlen", "cpu")
    _, batch = _packed_batch(tiny_qwen_tokenizer, seed=8)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        get_response_log_probs(model, batch["input_ids"], batch["labels"],
                               **packed_model_inputs(batch["position_ids"], batch["document_ids"], "varlen"))
