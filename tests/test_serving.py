

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
