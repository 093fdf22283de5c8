"""The one training step, learning-rate schedules, precision setup and checkpoints; both train scripts use these.

A step = `len(micro_batches)` forward/backward passes accumulating into `.grad`, one clip, one optimizer update.
Checkpoints are HF `save_pretrained` folders (vLLM loads them) plus `trainer_state.pt` (optimizer, RNG states,
step); they are written to a temp folder and renamed, so a crash mid-save never leaves a half checkpoint as latest.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch

from utils.doc_attention import set_attention_backend
from utils.post_train import (LossNormalization, final_hidden_and_head, get_response_log_probs, masked_normalize,
                              microbatch_token_weights, sft_microbatch_train_step, weighted_nll_train_step)

PRECISIONS = ("auto", "fp32", "mixed", "bf16")
SCHEDULES = ("constant", "cosine", "linear")
# micro-batch keys passed through to the model (the cu_seq_lens / max_length ones: `utils.doc_attention`)
MODEL_INPUT_KEYS = ("position_ids", "attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN/inf; the caller names the last good checkpoint."""


# ----------------------------------------------------------------------------------------------------------- flags
def add_run_flags(group) -> None:
    """Flags both train scripts share: device, run folder, checkpoints, resume, wandb."""
    group.add_argument("--device", default="auto", help="auto = cuda if available else cpu")
    group.add_argument("--output-dir", default="results", help="runs go to <output-dir>/<run-name>")
    group.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    group.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    group.add_argument("--resume", action="store_true", help="continue <output-dir>/<run-name> from its latest checkpoint")
    group.add_argument("--wandb-project", default="", help="mirror metrics to this wandb project (empty = local only)")
    group.add_argument("--peak-tflops", type=float, default=989.0,
                       help="accelerator bf16 dense peak for MFU on CUDA (H100/H200 SXM: 989)")


def add_speed_flags(group) -> None:
    """Flags both train scripts share that change speed and memory, not the objective."""
    from utils.doc_attention import ATTENTION_BACKENDS

    group.add_argument("--attention", choices=ATTENTION_BACKENDS, default="varlen",
                       help="attention inside documents of packed rows: varlen = flash varlen kernel on CUDA (one SDPA call per document elsewhere); sdpa = block-diagonal (T, T) mask; flex = FlexAttention (CUDA only)")
    group.add_argument("--chunk-size", type=int, default=0,
                       help="tokens per chunk for the lm-head log-softmax (0 = plain; >0 avoids B x T x V fp32 logits)")
    group.add_argument("--fused-lm-head", action="store_true",
                       help="with --chunk-size: lm-head gradients computed in the forward pass (3 matmuls a chunk instead of 4; same loss)")
    group.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument("--liger", action="store_true",
                       help="Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA; pip install liger-kernel)")


def check_speed_flags(args, device: str) -> None:
    """Refuse --attention flex and --liger off CUDA (neither has a CPU training path) and --fused-lm-head without
    --chunk-size, before any model loads."""
    if args.fused_lm_head and args.chunk_size <= 0:
        raise SystemExit("--fused-lm-head works chunk by chunk: set --chunk-size (e.g. 4096)")
    if not device.startswith("cuda"):
        if args.attention == "flex":
            raise SystemExit(f"--attention flex needs CUDA (PyTorch has no FlexAttention backward on CPU); device is "
                             f"{device}: use --attention varlen")
        if args.liger:
            raise SystemExit(f"--liger needs CUDA (Liger's kernels are Triton); device is {device}")


MFU_FORMULA = ("MFU = (6 x matmul parameters x tokens + 12 x layers x attention width x causal query-key pairs) "
               "/ step time / peak FLOP/s; matmul parameters = all but the input embedding (a tied lm head counted "
               "once), tokens and pairs exclude padding, pairs stay inside documents")


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (a lookup, no FLOPs); the lm
    head counts, tied or not (a tied head is the embedding matrix used once as a matmul)."""
    model = getattr(model, "_orig_mod", model)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    return total - embedding + (embedding if tied else 0)


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


def training_flops(matmul_params: int, n_layers: int, attention_width: int, tokens: int, attention_pairs: int) -> float:
    """Model FLOPs of forward + backward (3 x forward) over `tokens` tokens: 2 FLOPs per multiply-add, so 6 per
    matmul parameter per token, and 12 x d per causal query-key pair per layer (QK^T and AV, d = heads x head_dim).
    Recomputation (gradient checkpointing) is not counted: MFU counts the model's work, not the work done."""
    return 6.0 * matmul_params * tokens + 12.0 * n_layers * attention_width * attention_pairs


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


def parse_with_presets(parser, presets: dict[str, dict], argv: list[str] | None):
    """Parse `argv`; a `--preset NAME` first replaces the defaults with the preset's, so explicit flags still win."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "preset", None):
        parser.set_defaults(**presets[pre.preset])
    return parser.parse_args(argv)


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
    model: torch.nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], precision: str = "fp32", chunk_size: int = 0
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


# ----------------------------------------------------------------------------------------------------------- model
def load_policy(
    model_name: str, run_dir: Path, family: str, texts: list[str], dtype: torch.dtype, device: str, seed: int,
    gradient_checkpointing: bool = False, build_model: bool = True, attention: str = "varlen", liger: bool = False,
):
    """The policy and tokenizer from a hub id or folder; `tiny` builds a fresh tiny model of `family` and a BPE
    tokenizer trained on `texts` once, saved under `<run_dir>/base_model` (so vLLM and later evals can load it).

    The model's attention is set to `attention` (see `utils.doc_attention`; packed micro-batches must be built for
    the same backend) and, with `liger`, Liger's kernels replace its RMSNorm, SwiGLU and RoPE.

    Returns (model or None when `build_model` is False, tokenizer, model_path). A tokenizer without a pad token gets
    its eos as pad (padding never counts in the loss).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path: str | Path = model_name
    if model_name == "tiny":
        from utils.tiny_models import build_tiny_model, save_model_and_tokenizer, train_tiny_tokenizer

        model_path = Path(run_dir) / "base_model"
        if not (model_path / "config.json").exists():
            tok = train_tiny_tokenizer(texts, family=family, vocab_size=1000)
            tiny = build_tiny_model(family, len(tok), hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                    tie_word_embeddings=family == "qwen2", eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, seed=seed)
            save_model_and_tokenizer(tiny, tok, model_path, family)
            print(f"built a tiny {family} ({sum(p.numel() for p in tiny.parameters()) / 1e6:.2f}M parameters, "
                  f"vocab {len(tok)}) in {model_path}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        print(f"tokenizer has no pad token; padding with eos {tokenizer.eos_token!r} (never counted in the loss)")
    model = None
    if build_model:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        set_attention_backend(model, attention, device)
        if liger:
            apply_liger_kernels(model)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
    return model, tokenizer, model_path


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place (`nn.Module.compile`); returns how many.

    Per layer rather than the whole model: all layers share one compiled graph, the loss code around the model
    (chunked or fused lm head) stays eager, and state-dict keys stay free of `_orig_mod.`. Apply before FSDP
    sharding, as torchtitan does.
    """
    layers = model.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


def apply_liger_kernels(model) -> None:
    """Liger's Triton kernels for RMSNorm, SwiGLU and RoPE in a Qwen2 or Llama `model` on CUDA.

    The loss stays ours (plain, chunked or fused log-probs): Liger's fused linear cross-entropy returns neither
    per-token log-probs nor entropies and has no per-token weights, which per-example normalization needs. Liger
    swaps functions and classes in transformers' modeling module, so models of the same family built later in this
    process get its kernels too.

    Raises:
        SystemExit: liger-kernel not installed, the model not on CUDA, or a model type Liger is not wired for here.
    """
    if not next(model.parameters()).is_cuda:
        raise SystemExit("--liger: Liger's Triton kernels need a CUDA device")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen2
    except ImportError as e:
        raise SystemExit(f"--liger: liger-kernel does not import ({e}); pip install liger-kernel") from e
    apply = {"qwen2": apply_liger_kernel_to_qwen2, "llama": apply_liger_kernel_to_llama}.get(model.config.model_type)
    if apply is None:
        raise SystemExit(f"--liger: model type {model.config.model_type!r} is not wired up (qwen2, llama)")
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    print(f"liger: RMSNorm, SwiGLU and RoPE kernels applied to the {model.config.model_type} model")


# ----------------------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying module of a `torch.compile`d model (its state-dict keys carry no `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    trainer_state: dict,
    keep_last: int = 2,
    state_dict: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write `ckpt_root/step_XXXXXX/` atomically and point the `ckpt_root/latest` symlink at it; keep the newest
    `keep_last`.

    The folder is a complete HF model + tokenizer (loadable by vLLM and `from_pretrained`) plus
    `trainer_state.pt` with the optimizer state, RNG states and `trainer_state` (step, data position, ...).
    Under FSDP, rank 0 passes the consolidated `state_dict` and `optimizer_state` (see `utils.distributed`).
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    torch.save(
        {
            "optimizer": optimizer_state,
            "rng": rng_state(),
            "trainer_state": trainer_state,
        },
        tmp / "trainer_state.pt",
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # `latest` is a relative symlink, so `--model <run>/checkpoints/latest` works for HF, vLLM and the eval scripts;
    # replacing a symlink with os.replace is atomic.
    latest_tmp = root / ".latest.tmp"
    if latest_tmp.is_symlink() or latest_tmp.exists():
        latest_tmp.unlink()
    os.symlink(final.name, latest_tmp)
    os.replace(latest_tmp, root / "latest")
    if keep_last > 0:
        done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").exists())
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` points to, or else the newest complete `step_*` folder; None if there is none."""
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_symlink():
        cand = root / os.readlink(pointer)
        if (cand / "trainer_state.pt").exists():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, dist_info=None
) -> dict:
    """Load weights, optimizer state and RNG states from a checkpoint folder; returns its `trainer_state` dict.

    With FSDP (`dist_info.enabled`) every rank reads the consolidated files and loads its shard.
    """
    from safetensors.torch import load_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights in checkpoint")
    state = {}
    for f in files:
        state.update(load_file(f))
    target = unwrap_model(model)
    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if dist_info is not None and dist_info.enabled:
        from utils.distributed import load_full_state

        if getattr(target.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # save_pretrained drops the tied copy
        load_full_state(target, optimizer, state, blob["optimizer"])
    else:
        missing, unexpected = target.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(target.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")
        if optimizer is not None and blob["optimizer"] is not None:
            optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return blob["trainer_state"]
