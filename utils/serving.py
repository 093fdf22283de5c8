"""What makes a checkpoint servable as it is: the dtype its weights are saved and served in, the training prompt as
the tokenizer's chat template, and the EOS in generation_config.json.

A trained folder goes to vLLM, `from_pretrained` or the Hub unchanged: `apply_chat_template` of one user message
reproduces the prompt the model was trained on, byte for byte, and generation stops at the EOS training taught.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SAVE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def declared_dtype(model_path) -> str:
    """The dtype a model's config.json declares ("bfloat16" for Qwen2.5 and Llama-3, "float32" for the tiny test
    models); "float32" when it declares none (transformers' own default)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path))
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(declared).removeprefix("torch.") if declared is not None else "float32"


def resolve_save_dtype(choice: str, base_model_path) -> str:
    """`--save-dtype`: "auto" = the base model's declared dtype (what users of the base model already serve), else
    the named one."""
    if choice not in SAVE_DTYPES:
        raise ValueError(f"save dtype {choice!r}: expected one of {', '.join(SAVE_DTYPES)}")
    return declared_dtype(base_model_path) if choice == "auto" else choice


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to `dtype` on the CPU (others, e.g. integer buffers, unchanged); a new dict.
    Cast on the CPU: a GPU-side copy of every weight would be a memory spike beside the optimizer state."""
    target = getattr(torch, dtype)
    return {k: v.detach().to(device="cpu", dtype=target) if v.is_floating_point() else v
            for k, v in state_dict.items()}  # fmt: skip


def write_config_dtype(folder: str | Path, dtype: str) -> None:
    """Set `dtype` in `folder/config.json`: `save_pretrained` writes the dtype of the live model, not of the tensors
    it was handed, and vLLM's dtype="auto" and `from_pretrained(dtype="auto")` read this key."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    config.pop("torch_dtype", None)  # the pre-v5 spelling; one key, one answer
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def resolve_eval_dtype(requested: str, model_path, on_cuda: bool) -> tuple[str, str]:
    """The dtype an evaluation runs a checkpoint in, and why (one printable clause).

    "auto" on CUDA runs a float32 checkpoint in bfloat16 (half the memory, the tensor-core path, what vLLM serves a
    bf16 model in); on CPU it keeps the checkpoint's dtype (CPU bf16 kernels are slower, and fp32 keeps greedy
    outputs equal to the HF reference). An explicit dtype is always kept.
    """
    if requested != "auto":
        return requested, "--dtype"
    try:
        declared = declared_dtype(model_path)
    except (OSError, ValueError):  # not a local folder the engine can read: let the engine decide
        return "auto", "the engine's default (no readable config.json)"
    if on_cuda and declared == "float32":
        return "bfloat16", "a float32 checkpoint on CUDA; --dtype float32 keeps fp32"
    return declared, "the checkpoint's dtype"


def choose_eval_dtype(requested: str, model_path, device: str | None) -> str:
    """`resolve_eval_dtype` for an evaluation script's `--dtype` and `--device` (None = cuda if available), printing
    what it chose and why."""
    if device is None:
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = str(device).startswith("cuda")
    dtype, why = resolve_eval_dtype(requested, model_path, on_cuda)
    print(f"dtype: {dtype} ({why})", flush=True)
    return dtype


def chat_template_for(template: str, slot: str, bos_token: str | None = None, eos_token: str | None = None) -> str:
    """A Jinja chat template that renders one user message into `template` exactly as training filled it.

    `template` is the training prompt with a `slot` ("{question}" for r1_zero, "{instruction}" for Alpaca) and,
    for instruction documents, a "{response}" slot: the text before "{response}" is the prompt, the text after it
    follows the response. With `add_generation_prompt` the render ends where the response starts; an assistant
    message appends its content, the template's tail and `eos_token` (when given), as a training document does.
    `bos_token` is prepended when training's tokenization added it (the rendered text is tokenized with
    `add_special_tokens=False` by `apply_chat_template`).

    The template's literal text is embedded as JSON string literals inside `{{ ... }}`, so braces, `{%` and
    newlines in a prompt file cannot be read as Jinja syntax, and trim/lstrip of block tags cannot touch it.
    """
    if slot not in template:
        raise ValueError(f"template has no {slot} slot")
    prompt, has_response, doc_tail = template.partition("{response}")
    if not has_response:
        doc_tail = ""

    def filled(text: str) -> str:  # every occurrence of the slot gets the user message, as training's replace does
        return "{{ messages[0]['content'] }}".join("{{ " + json.dumps(piece) + " }}" if piece else ""
                                                    for piece in text.split(slot))

    return "".join([
        "{%- if messages | length == 0 or messages[0]['role'] != 'user' or messages | length > 2 -%}",
        "{{ raise_exception('this model was trained on one user message, optionally followed by one assistant "
        "message') }}{%- endif -%}",
        "{{ bos_token }}" if bos_token else "",
        filled(prompt),
        "{%- if messages | length == 2 -%}{{ messages[1]['content'] }}", filled(doc_tail),
        "{{ eos_token }}" if eos_token else "", "{%- endif -%}",
    ])  # fmt: skip


def adds_bos(tokenizer) -> bool:
    """Whether plain `tokenizer(text)` prepends BOS (Llama-3 does, Qwen2 does not)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return (tokenizer.bos_token_id is not None and len(with_special) > len(plain)
            and with_special[0] == tokenizer.bos_token_id)  # fmt: skip


def set_training_chat_template(tokenizer, template: str, slot: str, with_bos: bool, with_eos: bool) -> None:
    """Install `chat_template_for(...)` on `tokenizer` (saved with it by `save_pretrained`)."""
    tokenizer.chat_template = chat_template_for(template, slot, tokenizer.bos_token if with_bos else None,
                                                tokenizer.eos_token if with_eos else None)  # fmt: skip


def ensure_generation_eos(folder: str | Path, eos_token_id: int | None) -> None:
    """Make `folder/generation_config.json` list `eos_token_id` (the EOS training ended documents with) among its
    stop ids, so vLLM and `generate` stop where the model learned to; a no-op when it already does or there is none."""
    if eos_token_id is None:
        return
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        gen = GenerationConfig()
    ids = gen.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if eos_token_id in ids:
        return
    gen.eos_token_id = ids + [eos_token_id] if ids else eos_token_id
    gen.save_pretrained(str(folder))
