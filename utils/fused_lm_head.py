"""Fused lm-head + weighted negative log-likelihood: gradients computed in the forward pass, chunk by chunk.

The chunked path of `utils.post_train.get_response_log_probs` keeps memory low by recomputing each chunk's logits
in backward: four (chunk x H x V) matmuls per chunk. When the loss is a fixed weighted sum of token log-probs —
every normalization of this repo is (`utils.post_train.microbatch_token_weights`) — the gradient with respect to
each chunk's logits is known in the forward pass, so the forward can produce the hidden-state and lm-head gradients
right away: three matmuls per chunk, one softmax, no logits kept. Liger's fused linear cross-entropy works this way
but takes no per-token weights (per-example normalization needs them) and returns no log-probs or entropies.
"""

from __future__ import annotations

import torch


class _FusedWeightedNLL(torch.autograd.Function):
    """loss = -sum_t w_t log p(y_t | h_t); forward also returns detached log-probs and entropies."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk_size: int):
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        N, V = hidden.shape[0], weight.shape[0]
        with torch.autocast(device_type, enabled=False):
            w_mat = weight.to(dtype)  # (V, H), one cast for all chunks
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            grad_weight = None
            if ctx.needs_input_grad[1]:  # accumulated over chunks in fp32
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            log_probs = torch.empty(N, dtype=torch.float32, device=hidden.device)
            entropy = torch.empty(N, dtype=torch.float32, device=hidden.device)
            for s in range(0, N, chunk_size):
                h = hidden[s : s + chunk_size].to(dtype)  # (n, H)
                y, tw = labels[s : s + chunk_size], token_weights[s : s + chunk_size].float()
                valid = (y >= 0) & (y < V)
                y = y.clamp(0, V - 1)
                logits = (h @ w_mat.t()).float()  # (n, V) fp32
                lse = torch.logsumexp(logits, dim=-1)
                log_probs[s : s + chunk_size] = (logits.gather(-1, y[:, None]).squeeze(-1) - lse) * valid
                probs = (logits - lse[:, None]).exp_()  # softmax
                entropy[s : s + chunk_size] = lse - logits.mul_(probs).sum(-1)  # in place: two (n, V) buffers at most
                del logits
                # d(loss)/d(logits) = w_t * (softmax - onehot(y_t)); invalid labels carry no loss
                coef = tw * valid
                grad_logits = probs.mul_(coef[:, None])
                grad_logits.scatter_add_(-1, y[:, None], -coef[:, None])
                grad_logits = grad_logits.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[s : s + chunk_size] = grad_logits @ w_mat
                if grad_weight is not None:
                    grad_weight += (grad_logits.t() @ h).float()
        loss = -(token_weights.float() * log_probs).sum()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(log_probs, entropy)
        return loss, log_probs, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_log_probs, _grad_entropy):
        # Scaled in place: no second (V, H) fp32 buffer (0.9 GB for Qwen2.5-1.5B's head). The graph is freed after
        # this backward (no retain_graph in the train step), so the saved gradients are not read again.
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = grad_weight.mul_(grad_loss).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def fused_weighted_nll(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor,
    chunk_size: int = 4096,
) -> dict[str, torch.Tensor]:
    """Weighted NLL of `labels` from final hidden states, gradients computed during the forward pass.

    Args:
        hidden: (B, T, H) final hidden states (after the last norm).
        lm_head_weight: (V, H), an lm head without bias.
        labels: (B, T) int64; values outside [0, V) get log-prob 0 and no loss.
        token_weights: (B, T) float, w_t of loss = -sum_t w_t log p(y_t); zero where a token does not count.
        chunk_size: tokens per chunk (> 0); peak extra memory is about two (chunk, V) fp32 buffers.

    Returns:
        {"loss": 0-d fp32, differentiable; "log_probs": (B, T) fp32 and "token_entropy": (B, T) fp32, both
        detached}. The loss must be back-propagated as is or scaled by a scalar: the gradients were fixed in the
        forward pass for this loss.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    B, T, H = hidden.shape
    if token_weights.shape != (B, T) or labels.shape != (B, T):
        raise ValueError(f"labels {tuple(labels.shape)} and token_weights {tuple(token_weights.shape)} must be "
                         f"{(B, T)}")
    loss, log_probs, entropy = _FusedWeightedNLL.apply(hidden.reshape(B * T, H), lm_head_weight,
                                                       labels.reshape(B * T), token_weights.reshape(B * T), chunk_size)
    return {"loss": loss, "log_probs": log_probs.reshape(B, T), "token_entropy": entropy.reshape(B, T)}
