"""Core SFT tensor helpers: prompt/response tokenization with a response mask, token entropy, per-token log-probs
(plain and chunked), masked normalization and the SFT micro-batch train step.

Conventions (shared by every script):
- `response_mask` is a bool tensor, True where the *label* is a response token: it counts in the loss.
- Shapes: B = batch, T = sequence length (labels are inputs shifted by one), V = vocabulary.
- Log-probs and entropies are float32 whatever the model's dtype: a bf16 log-softmax over 151,936 entries loses
  ~3 significant digits, enough to bias the loss of long responses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LossNormalization = Literal["constant", "per_example", "step_tokens"]


def tokenize_prompt_and_output(prompt_strs: list[str], output_strs: list[str], tokenizer) -> dict[str, torch.Tensor]:
    """Tokenize prompts and outputs separately, concatenate each pair, right-pad, and build the response mask.

    No special tokens are added (no BOS, no EOS): the prompt template and the response text carry everything the
    model sees, as in the r1_zero setup where the target ends at `</answer>`. Tokenizing the two parts separately
    keeps the boundary exact even where BPE would merge the prompt's last characters with the response's first.

    Args:
        prompt_strs: B prompt strings.
        output_strs: B response strings.
        tokenizer: a tokenizer with `pad_token_id` set.

    Returns:
        dict with int64 `input_ids` (B, L-1) = full[:, :-1], int64 `labels` (B, L-1) = full[:, 1:], and bool
        `response_mask` (B, L-1), True exactly where the label is a response token (never prompt, never padding).
        L is the longest prompt+response length in the batch.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"got {len(prompt_strs)} prompts but {len(output_strs)} outputs; they must pair up")
    if len(prompt_strs) == 0:
        raise ValueError("empty batch: no prompts and outputs to tokenize")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token (e.g. to the eos token)"
        )
    prompt_ids = tokenizer(list(prompt_strs), add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    seqs = [p + o for p, o in zip(prompt_ids, output_ids)]
    max_len = max(len(s) for s in seqs)
    if max_len < 2:
        raise ValueError("every prompt+output pair tokenizes to fewer than 2 tokens; nothing to predict")
    B = len(seqs)
    full = torch.full((B, max_len), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, max_len), dtype=torch.bool)
    for i, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        full[i, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        mask[i, len(p) : len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension, in nats, float32.

    H = logsumexp(z) - sum(softmax(z) * z), computed from log-softmax so logits of magnitude 1e4 stay finite.

    Args:
        logits: (..., V) any float dtype.

    Returns:
        (...) float32.
    """
    logits = logits.float()
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def _forward_logits(model, input_ids: torch.Tensor, **model_kwargs) -> torch.Tensor:
    model_kwargs.setdefault("use_cache", False)  # see final_hidden_and_head
    return model(input_ids, **model_kwargs).logits  # (B, T, V) in the model's dtype


def final_hidden_and_head(model, input_ids: torch.Tensor, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden states (B, T, H), after the last norm, and the lm-head weight (V, H), without full logits.

    The whole model runs, so FSDP's root hooks gather and reduce the embeddings, norm and lm head, keeping logits
    for the last position only; transformers' last hidden state is the one after the final norm.
    """
    # use_cache=False unless asked: a scoring forward has no use for a KV cache, whose per-layer state would also
    # make torch.compile recompile the decoder layer once per layer.
    model_kwargs.setdefault("use_cache", False)
    out = model(input_ids, output_hidden_states=True, logits_to_keep=1, **model_kwargs)
    lm_head = model.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise NotImplementedError("chunked log-probs assume an lm_head without bias (true for Qwen2 and Llama)")
    return out.hidden_states[-1], lm_head.weight


def get_response_log_probs(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
    chunk_size: int = 0,
    **model_kwargs,
) -> dict[str, torch.Tensor]:
    """Per-token log-probabilities of `labels` under `model(input_ids)`, optionally with token entropies.

    Args:
        model: a causal LM (HF `...ForCausalLM`).
        input_ids: (B, T) int64.
        labels: (B, T) int64, the next token at each position; any value outside [0, V) (e.g. -100) gets log-prob 0.
        return_token_entropy: also return the entropy of the next-token distribution at each position.
        chunk_size: 0 = plain path (materializes (B, T, V) logits); > 0 = run the model to its final hidden
            states (logits for the last position only) and compute log-probs/entropy `chunk_size` tokens at a time
            with recomputation in backward, so no (B, T, V) float32 tensor ever exists (see
            `chunked_log_probs_from_hidden`).
        **model_kwargs: passed to the model (e.g. `attention_mask`, `position_ids`).

    Returns:
        {"log_probs": (B, T) float32} unmasked, plus {"token_entropy": (B, T) float32} when asked.
    """
    if chunk_size > 0:
        hidden, head_weight = final_hidden_and_head(model, input_ids, **model_kwargs)
        return chunked_log_probs_from_hidden(hidden, head_weight, labels, chunk_size, return_token_entropy)
    logits = _forward_logits(model, input_ids, **model_kwargs).float()  # (B, T, V) fp32
    log_softmax = torch.log_softmax(logits, dim=-1)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    log_probs = torch.gather(log_softmax, -1, labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    out = {"log_probs": log_probs * valid}
    if return_token_entropy:
        out["token_entropy"] = -(log_softmax.exp() * log_softmax).sum(-1)
    return out


def _chunk_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, with_entropy: bool):
    """Log-probs (and entropy) for one chunk: hidden (N, H), weight (V, H), labels (N,) -> (N,), (N,)."""
    logits = (hidden @ weight.t()).float()  # (N, V) fp32
    log_softmax = torch.log_softmax(logits, dim=-1)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    lp = torch.gather(log_softmax, -1, labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * valid
    if with_entropy:
        return lp, -(log_softmax.exp() * log_softmax).sum(-1)
    return lp, torch.zeros_like(lp)


def chunked_log_probs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    return_token_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Log-probs (and entropy) of `labels` from final hidden states, `chunk_size` tokens at a time.

    Each chunk's (chunk, V) fp32 logits live only inside an activation-checkpointed function: backward recomputes
    them chunk by chunk, so peak extra memory is one chunk's logits instead of (B, T, V). For Qwen's 151,936-entry
    vocabulary a 4 x 2048 micro-batch's fp32 log-softmax alone is ~5 GB; with chunk 1024 it is ~0.6 GB.

    Args:
        hidden: (B, T, H) final hidden states (after the last norm).
        lm_head_weight: (V, H).
        labels: (B, T) int64; values outside [0, V) get log-prob 0.
        chunk_size: tokens per chunk (> 0).
        return_token_entropy: also return per-token entropy.

    Returns:
        {"log_probs": (B, T) float32} (+ {"token_entropy": (B, T) float32}); equal to the plain path within fp32
        rounding.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    B, T, H = hidden.shape
    flat_h = hidden.reshape(B * T, H)
    flat_y = labels.reshape(B * T)
    lps, ents = [], []
    needs_grad = torch.is_grad_enabled() and (flat_h.requires_grad or lm_head_weight.requires_grad)
    for start in range(0, B * T, chunk_size):
        h, y = flat_h[start : start + chunk_size], flat_y[start : start + chunk_size]
        if needs_grad:
            lp, ent = checkpoint(_chunk_log_probs, h, lm_head_weight, y, return_token_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_log_probs(h, lm_head_weight, y, return_token_entropy)
        lps.append(lp)
        ents.append(ent)
    out = {"log_probs": torch.cat(lps).reshape(B, T)}
    if return_token_entropy:
        # Entropy is a diagnostic: detach it so backward never recomputes a chunk for it.
        out["token_entropy"] = torch.cat(ents).reshape(B, T).detach()
    return out


def masked_normalize(
    tensor: torch.Tensor, mask: torch.Tensor, normalize_constant: float = 1.0, dim: int | None = None
) -> torch.Tensor:
    """Sum `tensor` where `mask` is True, over `dim` (all dims when None: a 0-d tensor), divided by a constant."""
    masked = tensor * mask.to(tensor.dtype)
    summed = masked.sum() if dim is None else masked.sum(dim=dim)
    return summed / normalize_constant


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
    normalization: LossNormalization = "constant",
    step_response_tokens: int | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative log-likelihood of the response tokens for one micro-batch; calls `loss.backward()`.

    Gradients accumulate into `.grad` over repeated calls (nothing is zeroed here); the caller steps and zeroes the
    optimizer once per `gradient_accumulation_steps` calls.

    Normalizations (B = micro-batch size, GA = `gradient_accumulation_steps`):
    - "constant": loss = -sum(masked log-probs) / normalize_constant / B / GA (the assignment's contract; "summed
      loss" in the reference table).
    - "per_example": each example's masked log-probs are averaged over its own response tokens, then averaged over
      the micro-batch and divided by GA; every example weighs the same whatever its length. This is the
      "per-token loss" of the reference's best runs (0.520 vs 0.511 for the summed loss).
    - "step_tokens": loss = -sum(masked log-probs) / step_response_tokens, the response-token count of the whole
      optimizer step (all micro-batches, all ranks): every token weighs the same and the gradient does not depend on
      how the step is split into micro-batches. GA and normalize_constant are not used.

    Args:
        policy_log_probs: (B, T) float log-probs of the labels.
        response_mask: (B, T) bool, True where the token counts.
        gradient_accumulation_steps: micro-batches per optimizer step (>= 1).
        normalize_constant: divisor for "constant".
        normalization: one of the three above.
        step_response_tokens: required for "step_tokens".

    Returns:
        (loss, metadata): the scalar loss that was back-propagated (already divided by GA), and detached
        diagnostics: `nll_sum` (sum of masked -log-probs), `response_tokens`, `per_example_nll` (B,).
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if policy_log_probs.shape != response_mask.shape:
        raise ValueError(f"log-probs {tuple(policy_log_probs.shape)} and mask {tuple(response_mask.shape)} differ")
    mask = response_mask.to(policy_log_probs.dtype)
    B = policy_log_probs.shape[0]
    token_counts = mask.sum(dim=-1)  # (B,)
    nll_per_example = -(policy_log_probs * mask).sum(dim=-1)  # (B,)
    if normalization == "constant":
        loss = nll_per_example.sum() / normalize_constant / B / gradient_accumulation_steps
    elif normalization == "per_example":
        loss = (nll_per_example / token_counts.clamp(min=1)).sum() / B / gradient_accumulation_steps
    elif normalization == "step_tokens":
        if not step_response_tokens:
            raise ValueError("normalization='step_tokens' needs step_response_tokens > 0 (tokens of the whole step)")
        loss = nll_per_example.sum() / step_response_tokens
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    loss.backward()
    metadata = {
        "nll_sum": nll_per_example.sum().detach(),
        "response_tokens": token_counts.sum().detach(),
        "per_example_nll": (nll_per_example / token_counts.clamp(min=1)).detach(),
    }
    return loss.detach(), metadata


def microbatch_token_weights(
    response_mask: torch.Tensor,
    gradient_accumulation_steps: float,
    normalization: LossNormalization = "constant",
    normalize_constant: float = 1.0,
    step_response_tokens: int | float | None = None,
) -> torch.Tensor:
    """Per-token weights w with loss = -sum(w * log_probs) equal to `sft_microbatch_train_step`'s loss.

    Args and normalizations as `sft_microbatch_train_step`.

    Returns:
        (B, T) float32, zero where `response_mask` is False.
    """
    mask = response_mask.float()
    B = mask.shape[0]
    if normalization == "constant":
        per_row = torch.full((B,), 1.0 / (normalize_constant * B * gradient_accumulation_steps))
    elif normalization == "per_example":
        per_row = 1.0 / (mask.sum(-1).clamp(min=1) * B * gradient_accumulation_steps)
    elif normalization == "step_tokens":
        if not step_response_tokens:
            raise ValueError("normalization='step_tokens' needs step_response_tokens > 0 (tokens of the whole step)")
        per_row = torch.full((B,), 1.0 / step_response_tokens)
    else:
        raise ValueError(f"unknown normalization {normalization!r}")
    return mask * per_row.to(mask.device)[:, None]


def weighted_nll_train_step(
    policy_log_probs: torch.Tensor, response_mask: torch.Tensor, loss_weights: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss = -sum(log_probs * weight) over response tokens, with per-token weights fixed for the whole step; backward.

    Packed micro-batches hold a varying number of examples, so the three normalizations of
    `sft_microbatch_train_step` are expressed as weights computed over the whole optimizer step (N = examples in
    the step, n_e = response tokens of example e, T = response tokens of the step):
    per_example w = 1 / (n_e * N); constant w = 1 / (normalize_constant * N); step_tokens w = 1 / T.
    With equal-size padded micro-batches these give exactly the same gradient as `sft_microbatch_train_step`.

    Args:
        policy_log_probs: (B, T) float.
        response_mask: (B, T) bool.
        loss_weights: (B, T) float, the weight of each token's -log p (ignored where the mask is False).

    Returns:
        (loss, metadata) as `sft_microbatch_train_step`.
    """
    mask = response_mask.to(policy_log_probs.dtype)
    nll = -(policy_log_probs * mask)
    loss = (nll * loss_weights.to(nll.dtype)).sum()
    loss.backward()
    return loss.detach(), {"nll_sum": nll.sum().detach(), "response_tokens": mask.sum().detach()}
