"""One generation interface over two backends: vLLM (fast, GPU or CPU build) and HF transformers (fallback, or the
live training policy without a copy).

    engine = make_engine("Qwen/Qwen2.5-Math-1.5B")        # vLLM if importable, else HF; one log line says which
    outs = engine.generate(prompts, SamplingConfig(temperature=0.0, stop=["</answer>"]))
    outs[i][j].text, outs[i][j].token_ids, outs[i][j].finish_reason      # prompt i, sample j

In a training loop the engine is made once from the base model folder and fed the policy's weights before each eval:

    engine = make_engine(model_dir, gpu_memory_utilization=0.3)          # or make_engine(policy, engine="hf")
    engine.wake_up(); engine.load_weights(policy); outs = engine.generate(...); engine.sleep()

Both backends follow vLLM's conventions (greedy outputs agree token for token on the test models; sampled outputs
follow the same distribution from different random streams):
- prompts are tokenized with the tokenizer's special tokens (BOS for Llama-3, nothing for Qwen2), as vLLM does for text;
- generation ends at an EOS id (tokenizer + generation config), at `max_tokens` ("length"), or when a stop string
  completes; the text is cut at the end of the stop string (kept) or at its start (dropped), and `token_ids` run
  through the token that completed it, so `decode(token_ids)` starts with `text` and may run past it by part of a
  token (vLLM returns the same);
- text is decoded with special tokens skipped, and an incomplete UTF-8 sequence at the end is held back, as vLLM's
  incremental detokenizer does.

vLLM runs in-process (one engine per process at a time: closing one tears down vLLM's process-global parallel state).
"""

from __future__ import annotations

import torch

# The interface and both backends, re-exported: `from utils.inference import init_vllm, ...` is the import to use.
from utils.engine_base import (Completion, InferenceEngine, SamplingConfig, _unwrap_compiled, policy_state_dict,
                               request_seed)  # fmt: skip
from utils.hf_engine import HFEngine, find_stop, sample_next_token
from utils.vllm_engine import (VLLMEngine, _import_vllm, check_vllm_matches_policy, checkpoint_dtype, claim_vllm_device,
                               cuda_device_scope, init_vllm, load_policy_into_vllm_instance)


# ----------------------------------------------------------------------------------------------------------------------
# Factory


def _vllm_importable() -> tuple[bool, str]:
    try:
        vllm = _import_vllm()
    except Exception as e:  # a broken install (e.g. a mismatched torchvision) raises more than ImportError
        return False, f"{type(e).__name__}: {e}"
    return True, f"vllm {vllm.__version__} is importable"


def make_engine(model_path_or_policy, engine: str = "auto", tokenizer=None, seed: int = 0, dtype: str = "auto",
                gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, max_num_seqs: int = 256,
                device: str | None = None, enable_sleep_mode: bool = False,
                enforce_eager: bool = False, tensor_parallel_size: int = 1) -> InferenceEngine:  # fmt: skip
    """Build a generation engine and print one line saying which backend runs and why.

    Args:
        model_path_or_policy: a model folder / hub id, or a live `nn.Module`. With "hf" a module is used as is (shared
            weights: in-loop eval needs no sync); with "vllm" the engine loads the module's `config.name_or_path` and
            then receives the module's current weights.
        engine: "auto" (vLLM when importable, else HF), "vllm" or "hf".
        tokenizer: defaults to the one saved with the model.
        seed: sampling seed of the engine.
        dtype: "auto" = the checkpoint's dtype; or "bfloat16" / "float16" / "float32". Ignored for a live module.
        gpu_memory_utilization, max_model_len, max_num_seqs, device, enable_sleep_mode, enforce_eager,
            tensor_parallel_size: see `init_vllm`.
            For HF, `max_num_seqs` is the batch size, `device` where a loaded model goes (None: cuda if available).
    """
    if engine not in ("auto", "vllm", "hf"):
        raise ValueError(f"engine must be 'auto', 'vllm' or 'hf', got {engine!r}")
    is_module = isinstance(model_path_or_policy, torch.nn.Module)
    name = _model_name(model_path_or_policy)
    if engine == "auto":
        ok, why = _vllm_importable()
        engine = "vllm" if ok else "hf"
        print(f"inference: {'vLLM' if ok else 'HF transformers generate'} for {name} (engine=auto: {why})", flush=True)
    else:
        print(f"inference: {'vLLM' if engine == 'vllm' else 'HF transformers generate'} for {name} (engine={engine})",
              flush=True)  # fmt: skip

    if engine == "hf":
        if is_module:
            model = model_path_or_policy
            if tokenizer is None:
                tokenizer = _load_tokenizer(_unwrap_compiled(model).config.name_or_path)
        else:
            from transformers import AutoModelForCausalLM

            from utils.helper_fns import pick_device

            model = AutoModelForCausalLM.from_pretrained(str(model_path_or_policy), dtype=_torch_dtype(dtype))
            model.to(pick_device(device or "auto")).eval()
            tokenizer = tokenizer or _load_tokenizer(model_path_or_policy)
        return HFEngine(model, tokenizer, seed=seed, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                        model_name=name)  # fmt: skip

    model_path = _unwrap_compiled(model_path_or_policy).config.name_or_path if is_module else model_path_or_policy
    if is_module and dtype == "auto":
        dtype = str(next(model_path_or_policy.parameters()).dtype).removeprefix("torch.")
    llm = init_vllm(model_path, seed=seed, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                    max_num_seqs=max_num_seqs, dtype=dtype, device=device, enable_sleep_mode=enable_sleep_mode,
                    enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size)  # fmt: skip
    vllm_engine = VLLMEngine(llm, tokenizer or _load_tokenizer(model_path), model_name=name,
                             sleep_mode=enable_sleep_mode, device=device)  # fmt: skip
    if is_module:
        vllm_engine.load_weights(model_path_or_policy)
    return vllm_engine


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _model_name(model_path_or_policy) -> str:
    if isinstance(model_path_or_policy, torch.nn.Module):
        config = getattr(_unwrap_compiled(model_path_or_policy), "config", None)
        return f"{getattr(config, 'name_or_path', '') or type(model_path_or_policy).__name__} (live policy)"
    return str(model_path_or_policy)


def _torch_dtype(dtype: str):
    return "auto" if dtype == "auto" else getattr(torch, dtype)


__all__ = [
    "Completion", "HFEngine", "InferenceEngine", "SamplingConfig", "VLLMEngine", "check_vllm_matches_policy",
    "checkpoint_dtype", "claim_vllm_device", "cuda_device_scope",
    "find_stop", "init_vllm", "load_policy_into_vllm_instance", "make_engine", "policy_state_dict",
    "request_seed", "sample_next_token",
]  # fmt: skip
