"""In-loop validation with a sleeping vLLM engine: before each evaluation the engine is woken and given the current
weights, after it the engine sleeps again; the engine is built with sleep mode. A recording engine stands in for vLLM
(sleep mode is CUDA only), so this checks the order of calls, not vLLM."""

from __future__ import annotations

import pytest

from utils.engine_base import Completion, SamplingConfig


class RecordingEngine:
    def __init__(self, calls):
        self.calls = calls

    def load_weights(self, policy):
        self.calls.append("load_weights")  # VLLMEngine.load_weights wakes first, then syncs

    def generate(self, prompts, sampling, request_keys=None):
        self.calls.append("generate")
        return [[Completion("<think> x </think> <answer> 3 </answer>", [1], "stop")] for _ in prompts]

    def sleep(self):
        self.calls.append("sleep")

    def close(self):
        self.calls.append("close")


class Logger:
    def log(self, metrics, step):
        pass

    def log_table(self, *a):
        pass


@pytest.mark.parametrize("vllm_sleep", [True, False])
def test_engine_sleeps_between_evaluations(tmp_path, monkeypatch, model_and_batch, vllm_sleep):
    import utils.inference
    from utils.reason_validation import ReasonValidator

    model, tok, _, _ = model_and_batch
    calls, settings = [], {}

    def fake_make_engine(policy, **kwargs):
        settings.update(kwargs)
        return RecordingEngine(calls)

    monkeypatch.setattr(utils.inference, "make_engine", fake_make_engine)
    records = [{"problem": "1+2", "expected_answer": "3"}, {"problem": "2+2", "expected_answer": "4"}]
    validator = ReasonValidator(model, tok, records, "{question}", tmp_path, "cpu", "fp32",
                                SamplingConfig(temperature=0.0, max_tokens=4), grader_workers=1,
                                engine="vllm", vllm_sleep=vllm_sleep)  # fmt: skip
    try:
        validator.run(0, Logger())
        validator.run(1, Logger())
    finally:
        validator.close()
    assert settings["enable_sleep_mode"] is vllm_sleep
    # the engine's own sleep() is a no-op unless built with sleep mode; the validator always hands it back
    assert calls == ["load_weights", "generate", "sleep"] * 2 + ["close"]
    assert validator.history[0]["accuracy"] == 0.5
