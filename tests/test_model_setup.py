"""Model setup: decoder layers compiled in place."""

import torch
from transformers import AutoModelForCausalLM


def test_compiled_decoder_layers_match_eager_on_packed_chunked_rows(tiny_qwen_dir):
    """--compile compiles each decoder layer in place: the chunked path (which calls the decoder directly) runs the
    compiled layers, results match eager, and state-dict keys keep their names (checkpoints, vLLM weight sync)."""
    import torch._dynamo

    from utils.doc_attention import set_attention_backend
    from utils.packing import packed_model_inputs
    from utils.post_train import get_response_log_probs
    from utils.model_setup import compile_decoder_layers

    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 500, (1, 24), generator=g), torch.randint(0, 500, (1, 24), generator=g)
    doc = torch.tensor([[0] * 10 + [1] * 8 + [2] * 6])
    pos = torch.cat([torch.arange(10), torch.arange(8), torch.arange(6)])[None]
    extra = packed_model_inputs(pos, doc, "varlen")
    results = []
    for compiled in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
        set_attention_backend(model, "varlen", "cpu")
        keys = list(model.state_dict())
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            assert compile_decoder_layers(model) == 2
        lp = get_response_log_probs(model, ids, labels, chunk_size=8, **extra)["log_probs"]
        lp.sum().backward()
        results.append((lp.detach(), {n: p.grad for n, p in model.named_parameters()}))
        assert list(model.state_dict()) == keys
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the layers really went through dynamo
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
