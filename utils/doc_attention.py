"""Attention kept inside documents for packed rows: three backends behind one flag (`--attention`).

- `varlen` (default): a transformers attention function registered as "sft_varlen". Packed micro-batches carry
  `cu_seq_lens_q/k` (int32 document boundaries over the flattened B*T tokens) and `max_length_q/k`; each layer runs
  a flash-attention varlen kernel on CUDA in bf16/fp16 (flash-attn's when installed, else PyTorch's
  `torch.nn.attention.varlen.varlen_attn`) or, elsewhere, causal SDPA once per document. Work and memory grow with
  sum(n_i^2), never T^2. Calls without boundaries (padded batches, generation) run transformers' own SDPA path, so
  the same model serves every caller.
- `sdpa`: a (B, 1, T, T) block-diagonal causal mask (`utils.packing.document_causal_mask`) to SDPA: the reference
  the others are tested against; the mask is O(T^2) and SDPA computes every masked-out block.
- `flex`: transformers' FlexAttention, which builds a block mask from the restarting `position_ids` and skips empty
  blocks, registered as "sft_flex" so that inputs follow autocast (FlexAttention ignores autocast and would run
  fp32 kernels on the fp32 q/k that RoPE leaves). PyTorch has no FlexAttention backward on CPU, so this backend
  needs CUDA for training.

Every backend also restarts RoPE positions at each document (`position_ids`), so a packed document sees exactly what
it would see alone.
"""

from __future__ import annotations

import inspect

import torch

from utils.packing import cu_seqlens_from_position_ids

ATTENTION_BACKENDS = ("varlen", "sdpa", "flex")
VARLEN_IMPLEMENTATION = "sft_varlen"  # the names registered with transformers' AttentionInterface
FLEX_IMPLEMENTATION = "sft_flex"
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_notes: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _notes:
        _notes.add(message)
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------------------- kernels
def sdpa_per_document(query, key, value, cu_seqlens: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention inside each segment, one SDPA call per segment: the portable varlen path.

    Args:
        query: (N, H, D); key, value: (N, H_kv, D) with H a multiple of H_kv (grouped-query attention).
        cu_seqlens: (S + 1,) segment offsets into N.
        scale: softmax scale (None = 1/sqrt(D)).

    Returns:
        (N, H, D).
    """
    bounds = cu_seqlens.tolist()
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # (1, heads, n, D)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                             enable_gqa=k.shape[1] != q.shape[1])
        out.append(o.squeeze(0).transpose(0, 1))
    return torch.cat(out)


def _load_varlen_kernel():
    """The CUDA varlen kernel and how to call it, or None: flash-attn's `flash_attn_varlen_func` when the package
    imports, else PyTorch's `varlen_attn` (torch >= 2.10; 2.10 takes `is_causal=True`, later releases
    `window_size=(-1, 0)`, newer ones also `scale` and `enable_gqa`).

    Returns:
        (function with varlen_attn's calling convention, options as `varlen_call_options` returns plus "name").
    """
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):  # not installed, or built against another torch / CUDA
        pass
    else:
        def flash_attn_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=True, scale=None, enable_gqa=False):
            # flash-attn shares KV heads by itself (fewer KV than query heads is allowed), so enable_gqa is moot
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=is_causal)

        return flash_attn_kernel, {"causal": {"is_causal": True}, "gqa": True, "scale": True, "name": "flash-attn"}
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    options = varlen_call_options(inspect.signature(varlen_attn).parameters)
    return varlen_attn, {**options, "name": "torch varlen_attn"}


_VARLEN_KERNEL = None  # set by register_attention_functions: looked up once, not inside torch.compile'd layers


def _varlen_kernel():
    return _VARLEN_KERNEL


def varlen_call_options(parameters) -> dict:
    """Keyword arguments that make `varlen_attn` causal, whether it can share KV heads (GQA) itself, and whether
    it takes a softmax scale.

    Args:
        parameters: the names of `varlen_attn`'s parameters.

    Returns:
        {"causal": {kwarg: value}, "gqa": bool, "scale": bool}.

    Raises:
        RuntimeError: a signature with neither causal switch (an API this code does not know).
    """
    if "window_size" in parameters:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in parameters:
        causal = {"is_causal": True}
    else:
        raise RuntimeError(f"torch's varlen_attn takes neither window_size nor is_causal: {list(parameters)}")
    return {"causal": causal, "gqa": "enable_gqa" in parameters, "scale": "scale" in parameters}


def _flash_capable(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)


def varlen_attention(query, key, value, cu_seqlens: torch.Tensor, max_len: int, scale: float | None) -> torch.Tensor:
    """Causal attention inside each segment: PyTorch's flash varlen kernel on CUDA in bf16/fp16, else
    `sdpa_per_document`. Shapes as `sdpa_per_document`."""
    kernel = _varlen_kernel()
    if not (_flash_capable(query) and kernel is not None):
        if query.is_cuda:
            why = "no flash-attn and torch has no varlen_attn" if kernel is None else f"{query.dtype} inputs"
            _say_once(f"varlen attention: one SDPA call per document ({why}; the flash varlen kernel needs bf16/fp16)")
        return sdpa_per_document(query, key, value, cu_seqlens, scale)
    fn, options = kernel
    if key.shape[1] != query.shape[1] and not options["gqa"]:
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    extra = {"enable_gqa": True} if options["gqa"] and key.shape[1] != query.shape[1] else {}
    if options["scale"]:
        extra["scale"] = scale
    elif scale is not None:  # the kernel applies 1/sqrt(D): fold the wanted scale into the queries
        query = query * (scale * query.shape[-1] ** 0.5)
    cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
    return fn(query, key, value, cu, cu, max_len, max_len, **options["causal"], **extra)


# ------------------------------------------------------------------------------------------------------- transformers
def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for "sft_varlen": (B, H, T, D) inputs -> ((B, T, H, D), None).

    With `cu_seq_lens_q` in kwargs (packed micro-batches) attention stays inside those segments and
    `attention_mask` is not used. Without them, packed `position_ids` and no mask still get per-document attention
    (segments found from the positions, which costs a device sync per layer); anything else goes to transformers'
    SDPA function with the mask transformers built, so padded batches and cached generation behave as under "sdpa".
    """
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    B, H, T, D = query.shape
    if cu is None:
        position_ids = kwargs.get("position_ids")
        same_length = key.shape[2] == T and T > 1
        if attention_mask is None and position_ids is not None and same_length:
            cu, max_len = cu_seqlens_from_position_ids(position_ids.expand(B, -1))
            if len(cu) == B + 1:  # one sequence per row: plain causal attention
                cu = None
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # not on the packed path

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout > 0.0 and module.training:
        raise NotImplementedError("sft_varlen attention has no attention dropout (Qwen2 and Llama train without)")
    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # plain causal attention per document would silently ignore them
        raise NotImplementedError(f"sft_varlen attention does not implement {unsupported} (this model uses them); "
                                  "use --attention sdpa or flex")
    if key.shape[2] != T:
        raise ValueError(f"varlen attention needs as many keys as queries ({key.shape[2]} vs {T}); no KV cache")
    query, key, value = _autocast_inputs(query, key, value)
    flat = lambda x: x.transpose(1, 2).reshape(B * T, x.shape[1], D)  # noqa: E731  (B, h, T, D) -> (B*T, h, D)
    out = varlen_attention(flat(query), flat(key), flat(value), cu, int(max_len), scaling)
    return out.reshape(B, T, H, D), None


def _autocast_inputs(*tensors):
    """Cast to the autocast dtype when autocast is on, as SDPA's inputs are: under autocast RoPE's fp32 cos/sin
    promote q and k back to fp32, and the flash varlen and FlexAttention kernels do not cast for themselves."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def flex_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' FlexAttention function for "sft_flex", with its inputs in the autocast dtype."""
    from transformers.integrations.flex_attention import flex_attention_forward as transformers_flex

    return transformers_flex(module, *_autocast_inputs(query, key, value), attention_mask, **kwargs)


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """Mask builder for "sft_varlen": none without a padding mask (segments or causality are handled in the
    attention function), transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_attention_functions() -> None:
    """Register "sft_varlen" and "sft_flex" with transformers (its public extension point; repeated calls are
    harmless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from transformers.masking_utils import flex_attention_mask

    global _VARLEN_KERNEL
    _VARLEN_KERNEL = _load_varlen_kernel()
    AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_IMPLEMENTATION, _varlen_mask)
    AttentionInterface.register(FLEX_IMPLEMENTATION, flex_attention_forward)
    AttentionMaskInterface.register(FLEX_IMPLEMENTATION, flex_attention_mask)


def set_attention_backend(model, attention: str, device: str) -> None:
    """Point `model`'s attention at the backend that `packed_model_inputs(..., attention)` feeds.

    The choice is not saved with the model: `save_pretrained` writes no attention implementation, so vLLM and later
    loads are unaffected.

    Raises:
        ValueError: an unknown backend, or `flex` off CUDA (PyTorch has no FlexAttention backward on CPU).
    """
    if attention == "varlen":
        register_attention_functions()
        model.set_attn_implementation(VARLEN_IMPLEMENTATION)
        if str(device).startswith("cuda"):
            kernel = _varlen_kernel()
            print(f"attention: varlen with the {kernel[1]['name']} kernel on packed rows (bf16/fp16)" if kernel else
                  "attention: varlen as one SDPA call per document (no flash-attn, torch has no varlen_attn)")
    elif attention == "sdpa":
        model.set_attn_implementation("sdpa")
    elif attention == "flex":
        if not str(device).startswith("cuda"):
            raise ValueError("--attention flex needs CUDA (PyTorch has no FlexAttention backward on CPU); use varlen")
        register_attention_functions()
        model.set_attn_implementation(FLEX_IMPLEMENTATION)
    else:
        raise ValueError(f"unknown attention backend {attention!r}; choose from {ATTENTION_BACKENDS}")
