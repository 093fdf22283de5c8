"""The one training step, teacher-forced evaluation, learning-rate schedules, precision setup and MFU accounting;
both train scripts use these (checkpoints: `utils.checkpoints`; model loading: `utils.model_setup`).

A step = `len(micro_batches)` forward/backward passes accumulating into `.grad`, one clip, one optimizer update.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable

import torch

from utils.post_train import (LossNormalization, final_hidden_and_head, get_response_log_probs, masked_normalize,
                              microbatch_token_weights, sft_microbatch_train_step, weighted_nll_train_step)

PRECISIONS = ("auto", "fp32", "mixed", "bf16")
SCHEDULES = ("constant", "cosine", "linear")
# micro-batch keys passed through to the model (the cu_seq_lens / max_length ones: `utils.doc_attention`)
MODEL_INPUT_KEYS = ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN/inf; the caller names the last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------- MFU
MFU_FORMULA = ("MFU = ((4 x matmul parameters + 2 x trainable matmul parameters) x tokens + 12 x layers x "
               "attention width x causal query-key pairs) / step time / peak FLOP/s; 6 x parameters x tokens when "
               "all train (LoRA: frozen weights get no weight gradient); matmul parameters = the weight matrices "
               "but the input embedding (a tied lm head counted once), tokens and pairs exclude padding, pairs "
               "stay inside documents")


def matmul_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Weight-matrix entries that take part in a matmul per token: every matrix but the input embedding (a lookup, no
    FLOPs); the lm head counts, tied or not (a tied head is the embedding matrix used once as a matmul); biases and
    norm scales do not. `trainable_only`: those with requires_grad (under LoRA the adapters)."""
    model = getattr(model, "_orig_mod", model)
    # weight matrices only: biases and norm scales are additions, not multiply-adds (tied weights listed once)
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and (p.requires_grad or not trainable_only))
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    if not tied and (embedding.requires_grad or not trainable_only):
        total -= embedding.numel()
    return total


def step_flop_counts(micro_batches: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """(real tokens, causal query-key pairs) of one step's micro-batches, counted on the host.

    A token at position p of its document attends to p + 1 keys, so the pairs are sum(position_ids + 1) over real
    tokens; packed rows restart `position_ids` at each document. Padded rows (an `attention_mask` of 0/1, right
    padding) count their real tokens only.
    """
    tokens = pairs = 0
    for mb in micro_batches:
        mask = mb.get("attention_mask")
        if "position_ids" in mb:
            positions = mb["position_ids"].to("cpu", torch.long)
            tokens += positions.numel()
            pairs += int((positions + 1).sum())
        elif mask is not None and mask.dim() == 2:
            mask = mask.to("cpu", torch.long)
            tokens += int(mask.sum())
            pairs += int((mask.cumsum(-1) * mask).sum())
        else:
            B, T = mb["input_ids"].shape
            tokens += B * T
            pairs += B * T * (T + 1) // 2
    return tokens, pairs


def training_flops(matmul_params: int, n_layers: int, attention_width: int, tokens: int, attention_pairs: int,
                   trainable_matmul_params: int | None = None) -> float:
    """Model FLOPs of forward + backward over `tokens` tokens, 2 FLOPs per multiply-add: per matmul parameter and
    token 2 forward, 2 for the gradient of its input and, if it trains, 2 for its own gradient (6 when everything
    trains, the usual 3 x forward; `trainable_matmul_params` None = all); per causal query-key pair and layer 12 x d
    (QK^T and AV, d = heads x head_dim, forward and input gradients). Recomputation (gradient checkpointing) is not
    counted: MFU counts the model's work, not the work done. Under LoRA the input gradient of the first layer is
    counted although nothing below it trains (one layer's share of 2 x parameters, a small overcount)."""
    trainable = matmul_params if trainable_matmul_params is None else trainable_matmul_params
    return (4.0 * matmul_params + 2.0 * trainable) * tokens + 12.0 * n_layers * attention_width * attention_pairs


def attention_width(config) -> int:
    """Query width of one attention layer (heads x head_dim) from an HF config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def gpu_step_metrics(flops: float, step_time_s: float, peak_tflops: float, device: str) -> dict[str, float]:
    """Peak memory of `device` (the policy's GPU, named explicitly: vLLM may have changed the current device) and
    MFU (`MFU_FORMULA`) of one step on CUDA; {} elsewhere."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {}
    return {"train/peak_mem_gib": torch.cuda.max_memory_allocated(torch.device(device)) / 2**30,
            "train/mfu": flops / step_time_s / (peak_tflops * 1e12)}



# ----------------------------------------------------------------------------------------------------------- precision
def resolve_precision(precision: str, device: str) -> str:
    """`auto` -> `mixed` on CUDA (fp32 master weights, bf16 autocast), `fp32` on CPU (bf16 matmuls are slow there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        return "mixed" if device.startswith("cuda") else "fp32"
    return precision


def model_dtype_for(precision: str) -> torch.dtype:
    """Weights dtype: bf16 only for pure-bf16 training; fp32 master weights otherwise."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast_context(precision: str, device: str):
    """bf16 autocast for `mixed`; nothing otherwise (pure bf16 weights already compute in bf16)."""
    if precision == "mixed":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------- schedules
def lr_at_step(
    step: int, base_lr: float, schedule: str, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0
) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from base_lr/warmup_steps to base_lr over the first `warmup_steps` steps, then:
    `constant` stays at base_lr; `cosine` decays to `min_lr` at the last step (step = total_steps - 1), following
    half a cosine; `linear` decays linearly to `min_lr` at the last step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: expected one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if schedule == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr + (min_lr - base_lr) * progress


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    """AdamW over trainable parameters; fused on CUDA (one kernel for all parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=on_cuda or None)


# ----------------------------------------------------------------------------------------------------------- the step
def to_device(micro_batch: dict, device) -> dict:
    """Tensors moved to `device`; other values (the ints `max_length_q/k`) kept as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in micro_batch.items()}


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    lr: float,
    normalization: LossNormalization = "per_example",
    normalize_constant: float = 1.0,
    grad_clip: float = 1.0,
    precision: str = "fp32",
    chunk_size: int = 0,
    step_response_tokens: float | None = None,
    dist_info=None,
    fused_lm_head: bool = False,
) -> dict[str, float]:
    """One optimizer step over `micro_batches` (gradient accumulation = their number).

    Each micro-batch holds `input_ids`, `labels` (B, T) int64 and `response_mask` (B, T) bool, and optionally
    `position_ids` / `attention_mask` passed to the model (packed rows) and `loss_weights` (B, T) float: packed
    micro-batches carry per-token weights fixed for the whole step (`utils.post_train.weighted_nll_train_step`),
    which replace `normalization`. Loss normalization follows
    `utils.post_train.sft_microbatch_train_step`; for `step_tokens` the denominator is the response-token count of
    all micro-batches (or `step_response_tokens` when given).

    `fused_lm_head` (needs `chunk_size` > 0): the lm-head gradients are computed during the forward pass
    (`utils.fused_lm_head`), the same loss with one matmul per chunk fewer than recomputation in backward.

    Data parallel (`dist_info` from `utils.distributed` with world_size > 1, model sharded with FSDP, which averages
    gradients over ranks): `step_tokens` divides by the global token count / world size so the averaged gradient is
    the global per-token mean, and the returned statistics are global (summed over ranks; `loss` is the objective).

    Returns (floats): `loss` (the optimized objective), `nll_per_token` (mean -log p over response tokens, comparable
    across normalizations), `grad_norm` (before clipping), `token_entropy` (mean over response tokens),
    `response_tokens`, `tokens` (all input positions), `examples`, `lr`, `step_time_s`, `tokens_per_s`.

    Raises:
        NonFiniteLossError: the loss or gradient norm is NaN/inf; parameters are left un-updated.
    """
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    if fused_lm_head and chunk_size <= 0:
        raise ValueError("fused_lm_head needs chunk_size > 0")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    n_step_examples = sum(mb["input_ids"].shape[0] for mb in micro_batches)
    world = dist_info.world_size if dist_info is not None and dist_info.enabled else 1
    if normalization == "step_tokens" and step_response_tokens is None:
        step_response_tokens = float(sum(int(mb["response_mask"].sum()) for mb in micro_batches))
        if world > 1:
            from utils.distributed import all_reduce_sum

            step_response_tokens = all_reduce_sum([step_response_tokens], dist_info)[0] / world
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    # Sums stay on the device until the step ends: one host sync per step, not several per micro-batch, so the
    # host can queue the next micro-batch's kernels while the GPU works.
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, nll, entropy
    resp_tokens = tokens = examples = 0
    for mb in micro_batches:
        resp_tokens += int(mb["response_mask"].sum())  # host-side counts, before the copy to the device
        tokens += mb["input_ids"].numel()
        examples += mb["input_ids"].shape[0]
        mb = to_device(mb, device)
        extra = {k: mb[k] for k in MODEL_INPUT_KEYS if k in mb}
        mask = mb["response_mask"]
        if fused_lm_head:
            loss, meta, out = _fused_microbatch(model, mb, extra, precision, chunk_size, n_step_examples,
                                                normalization, normalize_constant, step_response_tokens)
        else:
            with autocast_context(precision, device.type):
                out = get_response_log_probs(
                    model, mb["input_ids"], mb["labels"], return_token_entropy=True, chunk_size=chunk_size, **extra
                )
            if "loss_weights" in mb:
                loss, meta = weighted_nll_train_step(out["log_probs"], mask, mb["loss_weights"])
            else:
                # Dividing by N_step / B_i instead of GA keeps per-example and constant normalization exact when the
                # micro-batches differ in size (equal to GA when they do not).
                loss, meta = sft_microbatch_train_step(
                    out["log_probs"],
                    mask,
                    n_step_examples / mb["input_ids"].shape[0],
                    normalize_constant=normalize_constant,
                    normalization=normalization,
                    step_response_tokens=step_response_tokens,
                )
        ent = masked_normalize(out["token_entropy"].detach(), mask)
        sums += torch.stack([loss.detach(), meta["nll_sum"].detach(), ent]).to(sums.dtype)
    loss_sum, nll_sum, ent_sum = sums.tolist()
    if world > 1:
        from utils.distributed import all_reduce_sum

        loss_sum, nll_sum, ent_sum, resp_tokens, tokens, examples = all_reduce_sum(
            [loss_sum, nll_sum, ent_sum, resp_tokens, tokens, examples], dist_info
        )
        loss_sum /= world  # FSDP averages gradients, so the optimized objective is the mean of the ranks' losses
        resp_tokens, tokens, examples = int(resp_tokens), int(tokens), int(examples)
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"non-finite loss {loss_sum} / grad norm {grad_norm}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {
        "loss": loss_sum,
        "nll_per_token": nll_sum / max(1, resp_tokens),
        "grad_norm": grad_norm,
        "token_entropy": ent_sum / max(1, resp_tokens),
        "response_tokens": resp_tokens,
        "tokens": tokens,
        "examples": examples,
        "lr": lr,
        "step_time_s": dt,
        "tokens_per_s": tokens / dt,
    }


def _fused_microbatch(model, mb, extra, precision, chunk_size, n_step_examples, normalization, normalize_constant,
                      step_response_tokens):
    """One micro-batch's forward + backward through `utils.fused_lm_head`, weights as the unfused path's loss."""
    from utils.fused_lm_head import fused_weighted_nll

    mask = mb["response_mask"]
    if "loss_weights" in mb:
        weights = mb["loss_weights"] * mask
    else:
        weights = microbatch_token_weights(mask, n_step_examples / mb["input_ids"].shape[0], normalization,
                                           normalize_constant, step_response_tokens)
    with autocast_context(precision, mask.device.type):
        hidden, head_weight = final_hidden_and_head(model, mb["input_ids"], **extra)
        out = fused_weighted_nll(hidden, head_weight, mb["labels"], weights, chunk_size)
    out["loss"].backward()
    meta = {"nll_sum": -(out["log_probs"] * mask).sum(), "response_tokens": mask.sum()}
    return out["loss"].detach(), meta, out


@torch.no_grad()
def teacher_forced_eval(
    model: torch.nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], precision: str = "fp32",
    chunk_size: int = 0,
) -> dict[str, float]:
    """Mean -log p and entropy over response tokens of reference data (never the model's own samples).

    Returns `loss` and `token_entropy` (means) plus the sums `nll_sum`, `entropy_sum`, `response_tokens`, which
    data-parallel callers add up over ranks before dividing.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = ent = 0.0
    n = 0
    for mb in micro_batches:
        mb = to_device(mb, device)
        extra = {k: mb[k] for k in MODEL_INPUT_KEYS if k in mb}
        with autocast_context(precision, device.type):
            out = get_response_log_probs(
                model, mb["input_ids"], mb["labels"], return_token_entropy=True, chunk_size=chunk_size, **extra
            )
        nll -= float(masked_normalize(out["log_probs"], mb["response_mask"]))
        ent += float(masked_normalize(out["token_entropy"], mb["response_mask"]))
        n += int(mb["response_mask"].sum())
    model.train(was_training)
    return {"loss": nll / max(1, n), "token_entropy": ent / max(1, n), "nll_sum": nll, "entropy_sum": ent,
            "response_tokens": n}


def evaluate_loss(model: torch.nn.Module, n_rows: int, make_batch: Callable[[list[int]], dict], micro_batch_size: int,
                  dist_info, precision: str = "fp32", chunk_size: int = 0, max_rows: int = -1) -> dict[str, float]:
    """Teacher-forced loss on the test rows, split evenly over ranks (every rank runs the same number of forwards).

    Rows `0 .. min(n_rows, max_rows) - 1` (`max_rows` -1 = all), cut to a multiple of the world size; rank r takes
    rows r, r + world, ...; `make_batch(row_indices)` turns `micro_batch_size` of them into a micro-batch for
    `teacher_forced_eval`. `dist_info` comes from `utils.distributed.init_distributed` (world size 1 = one process).

    Returns global (all ranks) `eval/test_loss`, `eval/test_token_entropy` (means over response tokens) and
    `eval/test_tokens`.
    """
    from utils.distributed import all_reduce_sum

    n = n_rows if max_rows < 0 else min(n_rows, max_rows)
    n -= n % dist_info.world_size
    rows = list(range(dist_info.rank, n, dist_info.world_size))
    batches = (make_batch(rows[i : i + micro_batch_size]) for i in range(0, len(rows), micro_batch_size))
    out = teacher_forced_eval(model, batches, precision, chunk_size)
    nll, ent, tokens = all_reduce_sum([out["nll_sum"], out["entropy_sum"], out["response_tokens"]], dist_info)
    return {"eval/test_loss": nll / max(1, tokens), "eval/test_token_entropy": ent / max(1, tokens),
            "eval/test_tokens": tokens}
