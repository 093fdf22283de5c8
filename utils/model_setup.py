"""Model setup for training: the policy and tokenizer (or a tiny one built), compiled decoder layers, Liger kernels."""

from __future__ import annotations

from pathlib import Path

import torch

from utils.doc_attention import set_attention_backend


def check_model_flag(model: str, flag: str = "--model") -> None:
    """Before anything loads: `tiny`, a local model folder (with config.json), or a hub id (`org/name`, not a local
    path). SystemExit naming the flag for a missing folder or a folder that holds no model."""
    import re

    if model == "tiny":
        return
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SystemExit(f"{flag} {model}: the folder has no config.json, so it is not a model folder (a run "
                             f"folder's models are under checkpoints/, e.g. {path / 'checkpoints' / 'latest'})")
        return
    if path.exists():
        raise SystemExit(f"{flag} {model}: a file, not a model folder or hub id")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model) or model.startswith("."):
        raise SystemExit(f"{flag} {model}: no such folder (and not a hub id of the form org/name)")


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
