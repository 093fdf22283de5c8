"""LoRA adapters (PEFT) for both trainers: wrap the policy, read its merged weights, save and load the adapter.

A LoRA layer computes W x + s B A x with the base W frozen, A (r, in) and B (out, r) trained and s = alpha / r
(Hu et al. 2021, "LoRA"; PEFT's default scaling). The merged weight W + s B A gives the same outputs, so vLLM,
`from_pretrained` and the evaluation scripts see the adapted model as a plain checkpoint of the base architecture.
`import peft` happens inside the functions, so the package imports where peft is not installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# The attention and MLP projections of Qwen2 and Llama (QLoRA, Dettmers et al. 2023: adapting all linear layers
# of the blocks is what matches full fine-tuning; the embeddings and lm head stay frozen).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"


def is_peft_model(model) -> bool:
    """True for a PEFT-wrapped model (torch.compile'd or not)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(getattr(model, "_orig_mod", model), PeftModel)


def apply_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str] | tuple[str, ...],
               gradient_checkpointing: bool = False):
    """Wrap `model` in PEFT LoRA adapters of rank `r` on the `target_modules` linear layers; everything else frozen.

    B starts at zero (PEFT's default), so the wrapped model computes exactly what the base did until the first step.
    With gradient checkpointing, the embedding output is made to require grad: reentrant checkpointing otherwise
    sees no input needing a gradient and drops the adapters' gradients inside each checkpointed layer.

    Returns the `peft.PeftModel`; its `config`, `get_output_embeddings()` and `get_decoder()` are the base model's.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if gradient_checkpointing:
        peft_model.enable_input_require_grads()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    print(f"lora: r {r}, alpha {alpha:g} (scale {alpha / r:g}), dropout {dropout:g} on {', '.join(target_modules)}: "
          f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters ({100 * trainable / total:.2f}%)")
    return peft_model


def _lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    """The LoRA layers of a PeftModel by module name inside the base model (e.g. `model.layers.0.mlp.up_proj`)."""
    from peft.tuners.lora import LoraLayer

    base = getattr(peft_model, "_orig_mod", peft_model).get_base_model()
    return {name.replace("_orig_mod.", ""): m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def lora_delta(layer, adapter: str = "default") -> torch.Tensor:
    """s B A of one LoRA linear layer, (out, in), computed in at least float32 and returned in that dtype."""
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
    dtype = torch.promote_types(A.dtype, torch.float32)
    return (B.to(dtype) @ A.to(dtype)) * layer.scaling[adapter]


@torch.no_grad()
def merged_state_dict(peft_model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The base model's state dict, in base names, with every adapted weight replaced by W + s B A.

    The adapters are left untouched (no `merge_adapter`, which would change the live weights): the merged tensors
    are new; the others are the live tensors detached. Each merged weight is summed in at least float32 and cast to
    the base weight's dtype. Tied embeddings keep both names, as `utils.engine_base.policy_state_dict` expects.
    """
    layers = _lora_layers(peft_model)
    base = getattr(peft_model, "_orig_mod", peft_model).get_base_model()
    out = {}
    for name, tensor in base.state_dict().items():
        name = name.replace("_orig_mod.", "")
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor.detach()
    for module_name, layer in layers.items():
        key = f"{module_name}.weight"
        W = out[key]
        out[key] = (W.to(torch.promote_types(W.dtype, torch.float32)) + lora_delta(layer, adapter)).to(W.dtype)
    return out


def save_merged_model(peft_model, tokenizer, folder: str | Path) -> Path:
    """Write the merged model (`merged_state_dict`) as a plain HF folder + tokenizer that vLLM and `from_pretrained`
    load; written to `<folder>.tmp` and renamed, so `folder` is complete or absent."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    base = getattr(peft_model, "_orig_mod", peft_model).get_base_model()
    # save_pretrained of the base model writes the base names; the PEFT wrapping is invisible to it given the state
    base.save_pretrained(tmp, state_dict=merged_state_dict(peft_model))
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def load_adapter_state(peft_model, folder: str | Path) -> None:
    """Load the adapter weights saved by `PeftModel.save_pretrained` in `folder` into `peft_model`, exactly.

    Raises:
        RuntimeError: the folder's adapter does not cover every adapter tensor of the model (another r or targets).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(Path(folder) / "adapter_model.safetensors")
    target = getattr(peft_model, "_orig_mod", peft_model)
    result = set_peft_model_state_dict(target, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{folder}: the saved adapter does not match the model's LoRA layers "
                           f"(missing {missing[:4]}, unexpected {list(result.unexpected_keys)[:4]})")
