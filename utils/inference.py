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

import contextlib
import gc
import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingConfig:
    """Sampling parameters shared by both backends (vLLM's names and meanings).

    temperature 0 is greedy. `stop` strings end a sample; `include_stop_str_in_output` keeps the matched stop string in
    the text. `n` samples per prompt. `seed`: the HF backend draws this call's samples from a generator seeded with it
    (None: the engine's generator, seeded once by `make_engine(seed=...)`, continues). vLLM always samples from the
    engine seed (`LLM(seed=...)`): one per-request seed gives every prompt of a batch the same random stream (measured:
    correlated first tokens across prompts), and was reported to crash the vLLM 0.32 CPU engine.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = True
    n: int = 1
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")


@dataclass
class Completion:
    """One generated sample: `text` (stop-string rule applied), the generated `token_ids` (prompt excluded), and
    `finish_reason` "stop" (EOS or stop string) or "length" (max_tokens or the model's context)."""

    text: str
    token_ids: list[int]
    finish_reason: str


class InferenceEngine:
    """Common surface of the two backends. `backend` is "vllm" or "hf"; `tokenizer` is a transformers tokenizer."""

    backend: str = ""
    tokenizer: Any = None
    model_name: str = ""

    def generate(
        self, prompts: list[str], sampling: SamplingConfig, use_tqdm: bool = True
    ) -> list[list[Completion]]:
        """Generate `sampling.n` completions for each prompt.

        Returns:
            one list per prompt, in prompt order, of `sampling.n` Completions.
        """
        raise NotImplementedError

    def load_weights(self, policy) -> None:
        """Make the engine generate with `policy`'s current weights."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free accelerator memory between evaluations (vLLM sleep mode when enabled; otherwise nothing)."""

    def wake_up(self) -> None:
        """Undo `sleep()`."""

    def close(self) -> None:
        """Release the engine's memory. The engine cannot be used afterwards."""


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers


def _unwrap_compiled(model):
    """The module inside a `torch.compile` wrapper (its parameters are the same tensors)."""
    return getattr(model, "_orig_mod", model)


def policy_state_dict(policy) -> dict[str, torch.Tensor]:
    """The policy's full state dict in checkpoint names, ready for vLLM's weight loader.

    - `_orig_mod.` (torch.compile) is removed wherever it appears: whole-model and per-block compilation both add it;
    - `lm_head.weight` is present even with tied embeddings: `state_dict()` keeps both names of a tied tensor, and it
      is added from the input embedding when a wrapper dropped it. A `save_pretrained` folder lacks it, and vLLM then
      silently keeps its old head (measured on vLLM 0.32).
    """
    out = {}
    for name, tensor in _unwrap_compiled(policy).state_dict().items():
        out[name.replace("_orig_mod.", "")] = tensor.detach()
    config = getattr(_unwrap_compiled(policy), "config", None)
    if "lm_head.weight" not in out and getattr(config, "tie_word_embeddings", False):
        embed = _unwrap_compiled(policy).get_input_embeddings().weight
        out["lm_head.weight"] = embed.detach()
    return out


def find_stop(text: str, stop: list[str], include_stop_str_in_output: bool) -> int | None:
    """Where to cut `text` for the stop string that completes earliest (ties: earlier in `stop`), or None.

    Mirrors vLLM's detokenizer: with `include_stop_str_in_output` the cut is at the end of the stop string, otherwise
    at its start.
    """
    best_start, best_end = None, None
    for s in stop:
        i = text.find(s)
        if i != -1 and (best_end is None or i + len(s) < best_end):
            best_start, best_end = i, i + len(s)
    if best_end is None:
        return None
    return best_end if include_stop_str_in_output else best_start


def _decode(tokenizer, ids: list[int]) -> str:
    # vLLM's incremental detokenizer holds back bytes of an unfinished UTF-8 character; a full decode renders them as
    # U+FFFD. Dropping trailing U+FFFD gives vLLM's text (a real trailing U+FFFD is vanishingly rare in model output).
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def _eos_ids(tokenizer, model) -> set[int]:
    """EOS ids as vLLM uses them: the tokenizer's EOS plus the generation config's `eos_token_id` (int or list)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids


def _model_name(model_path_or_policy) -> str:
    if isinstance(model_path_or_policy, torch.nn.Module):
        config = getattr(_unwrap_compiled(model_path_or_policy), "config", None)
        return f"{getattr(config, 'name_or_path', '') or type(model_path_or_policy).__name__} (live policy)"
    return str(model_path_or_policy)


# ----------------------------------------------------------------------------------------------------------------------
# HF backend


def sample_next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next token per row: argmax when temperature == 0, else a draw from softmax(logits / T) restricted to
    the smallest set of tokens whose probability reaches `top_p` (nucleus sampling).

    Args:
        logits: (B, V) float32 next-token logits.

    Returns:
        (B,) int64 token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class HFEngine(InferenceEngine):
    """Batched generation with a transformers causal LM: left padding, KV cache, one forward per new token.

    `model` may be the live training policy: generation runs under `torch.no_grad()` in eval mode and restores the
    module's training mode afterwards; its weights are shared, never copied.
    """

    backend = "hf"

    def __init__(self, model, tokenizer, seed: int = 0, max_num_seqs: int = 256, max_model_len: int | None = None,
                 model_name: str = "", eos_token_ids: set[int] | None = None):  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_num_seqs = max_num_seqs
        module = _unwrap_compiled(model)
        self.max_model_len = max_model_len or getattr(module.config, "max_position_embeddings", None)
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(tokenizer, module)
        # Pads only fill masked positions, so any id works; Llama-3 has no pad token and uses its EOS.
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        self.device = next(module.parameters()).device
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def load_weights(self, policy) -> None:
        """No-op when the engine wraps `policy` itself; otherwise copies `policy`'s weights in (strict)."""
        if _unwrap_compiled(policy) is _unwrap_compiled(self.model):
            return
        target = _unwrap_compiled(self.model)
        names = set(target.state_dict())
        target.load_state_dict({k: v for k, v in policy_state_dict(policy).items() if k in names}, strict=True)

    def generate(self, prompts: list[str], sampling: SamplingConfig, use_tqdm: bool = True) -> list[list[Completion]]:
        from tqdm.auto import tqdm

        prompt_ids = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        for i, ids in enumerate(prompt_ids):
            if self.max_model_len is not None and len(ids) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, no room to generate within max_model_len "
                                 f"{self.max_model_len}")  # fmt: skip
        generator = self._generator
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        # One request per (prompt, sample); longest prompts first so each batch pads little.
        requests = [(i, j) for i in range(len(prompts)) for j in range(sampling.n)]
        requests.sort(key=lambda r: -len(prompt_ids[r[0]]))
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in prompts]
        module = _unwrap_compiled(self.model)
        was_training = module.training
        module.eval()
        try:
            bar = tqdm(total=len(requests), desc="generate (hf)", disable=not use_tqdm, leave=False)
            for start in range(0, len(requests), self.max_num_seqs):
                batch = requests[start : start + self.max_num_seqs]
                outs = self._generate_batch(module, [prompt_ids[i] for i, _ in batch], sampling, generator)
                for (i, j), completion in zip(batch, outs):
                    results[i][j] = completion
                bar.update(len(batch))
            bar.close()
        finally:
            module.train(was_training)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, model, prompt_ids: list[list[int]], sampling: SamplingConfig,
                        generator: torch.Generator) -> list[Completion]:  # fmt: skip
        B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for b, ids in enumerate(prompt_ids):  # left padding: every row's next token lands in the last column
            input_ids[b, L - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, L - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # positions restart after the padding
        budgets = [
            sampling.max_tokens if self.max_model_len is None else min(sampling.max_tokens, self.max_model_len - len(p))
            for p in prompt_ids
        ]
        generated: list[list[int]] = [[] for _ in range(B)]
        done: list[Completion | None] = [None] * B
        past, step_ids, step_pos = None, input_ids, position_ids
        for _ in range(max(budgets)):
            out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=step_pos,
                        past_key_values=past, use_cache=True, logits_to_keep=1)  # fmt: skip
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()  # (B, V)
            next_ids = sample_next_token(logits, sampling.temperature, sampling.top_p, generator)
            next_list = next_ids.tolist()
            for b in range(B):
                if done[b] is not None:
                    continue
                generated[b].append(next_list[b])
                done[b] = self._finished(generated[b], next_list[b], budgets[b], sampling)
            if all(d is not None for d in done):
                break
            finished = torch.tensor([d is not None for d in done], device=self.device)
            step_ids = next_ids.masked_fill(finished, self.pad_token_id)[:, None]  # (B, 1); finished rows idle
            step_pos = step_pos[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        # Rows still running after max(budgets) steps are at their budget.
        return [d or Completion(_decode(self.tokenizer, g), g, "length") for d, g in zip(done, generated)]

    def _finished(self, ids: list[int], last: int, budget: int, sampling: SamplingConfig) -> Completion | None:
        """The Completion if the sample ended with its latest token (EOS, stop string, budget), else None."""
        if last in self.eos_token_ids:
            return Completion(_decode(self.tokenizer, ids), list(ids), "stop")
        if sampling.stop:
            text = _decode(self.tokenizer, ids)
            cut = find_stop(text, sampling.stop, sampling.include_stop_str_in_output)
            if cut is not None:
                return Completion(text[:cut], list(ids), "stop")
        if len(ids) >= budget:
            return Completion(_decode(self.tokenizer, ids), list(ids), "length")
        return None


# ----------------------------------------------------------------------------------------------------------------------
# vLLM backend


def _import_vllm():
    """Import vLLM with the environment this project relies on; raises ImportError when it is not installed."""
    # In-process engine core: weight sync passes the policy's tensors to the model runner by reference through
    # collective_rpc (no pickling, no second process holding a model copy), and the engine starts in ~3 s instead of
    # ~16 s on CPU. Must be set before vllm is imported; forced, since the weight sync does not work otherwise.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes a large share of RAM
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # pinning threads stalls a shared machine
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
              enable_sleep_mode: bool = False, enforce_eager: bool = False):  # fmt: skip
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
    """
    if enable_sleep_mode and not torch.cuda.is_available():
        raise ValueError("vLLM sleep mode needs CUDA; on CPU build the engine with enable_sleep_mode=False")
    claim_vllm_device(device)
    vllm = _import_vllm()
    if dtype == "auto":
        dtype = checkpoint_dtype(model_path)
    kwargs: dict[str, Any] = {}
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

    def generate(self, prompts: list[str], sampling: SamplingConfig, use_tqdm: bool = True) -> list[list[Completion]]:
        vllm = _import_vllm()
        if sampling.seed is not None and sampling.temperature > 0 and not self._seed_note_printed:
            print(f"inference: vLLM samples from the engine seed; SamplingConfig.seed={sampling.seed} is not passed "
                  f"per request (it would give every prompt the same random stream)", flush=True)  # fmt: skip
            self._seed_note_printed = True
        params = vllm.SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=sampling.include_stop_str_in_output,
        )
        with cuda_device_scope(self.device):
            outputs = self.llm.generate(list(prompts), params, use_tqdm=use_tqdm)
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
        if self._asleep:
            with cuda_device_scope(self.device):
                self.llm.wake_up()
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
                enforce_eager: bool = False) -> InferenceEngine:  # fmt: skip
    """Build a generation engine and print one line saying which backend runs and why.

    Args:
        model_path_or_policy: a model folder / hub id, or a live `nn.Module`. With "hf" a module is used as is (shared
            weights: in-loop eval needs no sync); with "vllm" the engine loads the module's `config.name_or_path` and
            then receives the module's current weights.
        engine: "auto" (vLLM when importable, else HF), "vllm" or "hf".
        tokenizer: defaults to the one saved with the model.
        seed: sampling seed of the engine.
        dtype: "auto" = the checkpoint's dtype; or "bfloat16" / "float16" / "float32". Ignored for a live module.
        gpu_memory_utilization, max_model_len, max_num_seqs, device, enable_sleep_mode, enforce_eager: see `init_vllm`.
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
                    enforce_eager=enforce_eager)  # fmt: skip
    vllm_engine = VLLMEngine(llm, tokenizer or _load_tokenizer(model_path), model_name=name,
                             sleep_mode=enable_sleep_mode, device=device)  # fmt: skip
    if is_module:
        vllm_engine.load_weights(model_path_or_policy)
    return vllm_engine


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def checkpoint_dtype(model_path) -> str:
    """The dtype a checkpoint's config declares ("float32", "bfloat16", ...); "auto" when it declares none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path))
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared is not None else "auto"


def _torch_dtype(dtype: str):
    return "auto" if dtype == "auto" else getattr(torch, dtype)


__all__ = [
    "Completion", "HFEngine", "InferenceEngine", "SamplingConfig", "VLLMEngine", "check_vllm_matches_policy",
    "claim_vllm_device", "cuda_device_scope",
    "find_stop", "init_vllm", "load_policy_into_vllm_instance", "make_engine", "policy_state_dict",
    "sample_next_token",
]  # fmt: skip
