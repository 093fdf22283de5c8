"""What both generation backends share: the sampling parameters, the completion record, the engine interface, and the
policy's weights in checkpoint names. `utils.inference.make_engine` builds an engine; utils/hf_engine.py and
utils/vllm_engine.py implement it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingConfig:
    """Sampling parameters shared by both backends (vLLM's names and meanings).

    temperature 0 is greedy. `stop` strings end a sample; `include_stop_str_in_output` keeps the matched stop string in
    the text. `n` samples per prompt. `seed`: with the `request_keys` of `InferenceEngine.generate`, every sample gets
    its own seed (`request_seed`), in both backends, so samples do not depend on batching or on what ran before; without
    keys, the HF backend draws this call's samples from one generator seeded with it and vLLM from its engine seed
    (one seed shared by every prompt would give them all the same random stream).
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
        self, prompts: list[str], sampling: SamplingConfig, use_tqdm: bool = True,
        request_keys: list[int] | None = None,
    ) -> list[list[Completion]]:  # fmt: skip
        """Generate `sampling.n` completions for each prompt.

        Args:
            request_keys: one stable integer per prompt (its example index). With `sampling.seed` set, sample j of a
                prompt is drawn from its own generator seeded `request_seed(sampling.seed, key, j)`, so a prompt gets
                the same samples whatever else is in the batch: a resumed run samples what the uninterrupted run
                did. None: the engine's own random stream.

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


MAX_SAMPLES_PER_REQUEST = 1 << 10  # request_seed leaves 10 bits for the sample index
MAX_REQUEST_KEY = 1 << 22


def request_seed(seed: int, key: int, sample: int = 0) -> int:
    """The seed of sample `sample` of the prompt with stable key `key` (its example index) under run seed `seed`.

    32 bits, since PyTorch's CPU generator (Mersenne Twister) ignores higher seed bits: 22 bits place the key's block,
    offset by the run seed, 10 bits number its samples. vLLM seeds a request's n samples with `seed + j`, which stays
    inside the block. Distinct for every (key, sample) of one run seed.
    """
    if not 0 <= key < MAX_REQUEST_KEY or not 0 <= sample < MAX_SAMPLES_PER_REQUEST:
        raise ValueError(f"request key {key} (< {MAX_REQUEST_KEY}) or sample {sample} "
                         f"(< {MAX_SAMPLES_PER_REQUEST}) out of range")  # fmt: skip
    block = (seed * 2654435761 + key) % MAX_REQUEST_KEY  # a bijection of key for a fixed run seed
    return block * MAX_SAMPLES_PER_REQUEST + sample


def _unwrap_compiled(model):
    """The module inside a `torch.compile` wrapper (its parameters are the same tensors)."""
    return getattr(model, "_orig_mod", model)


def policy_state_dict(policy) -> dict[str, torch.Tensor]:
    """The policy's full state dict in checkpoint names, ready for vLLM's weight loader.

    - `_orig_mod.` (torch.compile) is removed wherever it appears: whole-model and per-block compilation both add it;
    - `lm_head.weight` is present even with tied embeddings: `state_dict()` keeps both names of a tied tensor, and it
      is added from the input embedding when a wrapper dropped it. A `save_pretrained` folder lacks it, and vLLM then
      silently keeps its old head (measured on vLLM 0.32);
    - a LoRA (PEFT) policy gives its merged weights W + s B A in the base model's names (`utils.lora`), the adapter
      itself untouched.
    """
    from utils.lora import is_peft_model, merged_state_dict

    if is_peft_model(policy):
        out = merged_state_dict(policy)
        if "lm_head.weight" not in out and getattr(_unwrap_compiled(policy).config, "tie_word_embeddings", False):
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out
    out = {}
    for name, tensor in _unwrap_compiled(policy).state_dict().items():
        out[name.replace("_orig_mod.", "")] = tensor.detach()
    config = getattr(_unwrap_compiled(policy), "config", None)
    if "lm_head.weight" not in out and getattr(config, "tie_word_embeddings", False):
        embed = _unwrap_compiled(policy).get_input_embeddings().weight
        out["lm_head.weight"] = embed.detach()
    return out
