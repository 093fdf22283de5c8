"""Tiny models and tokenizers built offline, for tests and the CPU demo (no hub access).

Two families mirror the project's real models:
- `qwen2`: byte-level BPE with Qwen2's pre-tokenizer split (single digits), `<|endoftext|>` as pad and eos, no BOS,
  as Qwen2.5-Math-1.5B.
- `llama`: byte-level BPE with Llama-3's split (digits in groups of up to 3), `<|begin_of_text|>` added to every
  encoding, `<|end_of_text|>` as eos, no pad token, as Llama-3.1-8B (base).

transformers 5 rebuilds the pre-tokenizer of a `Qwen2Tokenizer` from its own regex when the folder is loaded, so the
tiny Qwen2 tokenizer is trained with exactly that regex: ids then agree between `tokenizers`, transformers and vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5 special tokens, in id order after the 151,643 BPE ranks (from the Qwen2.5 tokenizer_config.json).
QWEN25_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip


def _llama3_special_tokens() -> list[str]:
    """Llama-3's 256 reserved special tokens, ids 128000..128255, in order."""
    named = {
        0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>", 6: "<|start_header_id|>",
        7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>", 10: "<|python_tag|>",
    }  # fmt: skip
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def _byte_level_tokenizer(split_regex: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _wrap(tok, family: str):
    """Wrap a `tokenizers.Tokenizer` as a transformers tokenizer with the family's special tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if family == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
        )
    if family == "llama":
        bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
                ),
            ]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, add_bos_token=True)
    raise ValueError(f"unknown tokenizer family {family!r} (expected 'qwen2' or 'llama')")


def train_tiny_tokenizer(texts: Iterable[str], family: str = "qwen2", vocab_size: int = 512):
    """Train a byte-level BPE tokenizer of the given family on `texts` (seconds on CPU).

    Returns a transformers fast tokenizer. Special tokens take the first ids; all 256 byte symbols are in the
    vocabulary, so any text is encodable.
    """
    from tokenizers import pre_tokenizers, trainers

    if family == "qwen2":
        tok, specials = _byte_level_tokenizer(QWEN2_SPLIT_REGEX), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    elif family == "llama":
        tok, specials = _byte_level_tokenizer(LLAMA3_SPLIT_REGEX), ["<|begin_of_text|>", "<|end_of_text|>"]
    else:
        raise ValueError(f"unknown tokenizer family {family!r} (expected 'qwen2' or 'llama')")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(tok, family)


def convert_tiktoken_file(path: str | os.PathLike, family: str):
    """Convert a tiktoken BPE rank file (Qwen2.5's `qwen.tiktoken` or Llama-3's `tokenizer.model`) to a fast tokenizer.

    Special tokens get the real models' ids: Qwen2.5 151,643.., Llama-3 128,000.. .
    """
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if family == "qwen2":
        regex, specials = QWEN2_SPLIT_REGEX, QWEN25_SPECIAL_TOKENS
    elif family == "llama":
        regex, specials = LLAMA3_SPLIT_REGEX, _llama3_special_tokens()
    else:
        raise ValueError(f"unknown tokenizer family {family!r} (expected 'qwen2' or 'llama')")
    tok = TikTokenConverter(vocab_file=str(path), pattern=regex).converted()
    tok.normalizer = None  # tiktoken applies no normalization
    if family == "qwen2":
        from tokenizers import normalizers

        tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalizes NFC
    n_ranks = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if tok.token_to_id(specials[0]) != n_ranks:
        raise RuntimeError(f"{path}: special tokens did not land after the {n_ranks} BPE ranks")
    return _wrap(tok, family)


def build_tiny_model(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """A randomly initialised Qwen2 or Llama causal LM of tiny size, float32.

    head_dim = hidden_size / num_heads must be >= 32: vLLM's CPU attention crashes at the first generate with 16.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if hidden_size // num_heads < 32:
        raise ValueError(f"head_dim = {hidden_size}/{num_heads} < 32; vLLM's CPU backend needs head_dim >= 32")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )
    if family == "qwen2":
        config = Qwen2Config(**common, rope_theta=10000.0)
    elif family == "llama":
        config = LlamaConfig(**common, rope_theta=500000.0)
    else:
        raise ValueError(f"unknown model family {family!r} (expected 'qwen2' or 'llama')")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def save_model_and_tokenizer(model, tokenizer, out_dir: str | os.PathLike, family: str) -> Path:
    """`save_pretrained` both into one folder that HF and vLLM load; records the family's tokenizer class."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # Qwen2Tokenizer makes transformers rebuild the (identical) Qwen2 pre-tokenizer; Llama-3 folders use the generic
    # class.
    cfg["tokenizer_class"] = "Qwen2Tokenizer" if family == "qwen2" else "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out
