"""LoRA (utils/lora.py): only adapters train, merged weights equal the adapted forward, vLLM sees the adapted model,
checkpoints resume exactly, and both trainers run with --lora-r."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import diversified_copy, has_vllm
from transformers import AutoModelForCausalLM

from utils.lora import DEFAULT_TARGET_MODULES, apply_lora, merged_state_dict, save_merged_model
from utils.post_train import tokenize_prompt_and_output
from utils.training import build_optimizer, train_step


def _randomize_adapters(peft_model, seed: int = 0, std: float = 0.2) -> None:
    """B starts at zero (the adapted model = the base); random B makes the adapters' contribution visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied and untied lm head
def test_merged_weights_give_the_adapted_logits_in_float64(family, tiny_qwen_dir, tiny_llama_dir, tmp_path):
    src = tiny_qwen_dir if family == "qwen2" else tiny_llama_dir
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)
    ids = torch.randint(0, base.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    base_logits = base(ids).logits.detach()
    peft_model = apply_lora(base, r=4, alpha=8.0, dropout=0.1, target_modules=DEFAULT_TARGET_MODULES)
    _randomize_adapters(peft_model)
    peft_model.eval()  # dropout off: the merged weights are the inference-time model
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    adapted = peft_model(ids).logits.detach()
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters matter, so equality below means something

    merged = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64)
    merged.load_state_dict(merged_state_dict(peft_model), strict=True)
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-10, rtol=0)
    # reading the merged weights left the adapters and the live (frozen) base untouched
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, adapters[n]), n
    torch.testing.assert_close(peft_model(ids).logits, adapted, atol=0, rtol=0)

    # the --merge-on-save folder is a plain checkpoint of the base architecture
    folder = save_merged_model(peft_model, AutoTokenizerFor(src), tmp_path / "merged")
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(loaded(ids).logits, adapted, atol=1e-10, rtol=0)


def AutoTokenizerFor(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("speed", [
    dict(),
    dict(chunk_size=8),
    dict(chunk_size=8, fused_lm_head=True),
    dict(gradient_checkpointing=True),
    dict(precision="mixed"),
], ids=["plain", "chunked", "fused", "grad-ckpt", "mixed"])
def test_lora_step_changes_only_adapters_and_lowers_loss(speed, model_and_batch):
    model, tok, prompts, outputs = model_and_batch
    speed = dict(speed)
    if speed.pop("gradient_checkpointing", False):
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model = apply_lora(model, r=4, alpha=16.0, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES,
                       gradient_checkpointing=model.is_gradient_checkpointing)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum("lora_" in n for n in before)
    mb = tokenize_prompt_and_output(prompts, outputs, tok)
    losses = [train_step(model, opt, [mb], lr=1e-2, **speed)["nll_per_token"] for _ in range(6)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in model.named_parameters():
        if "lora_" in n:
            if "lora_B" in n:  # every B moves off zero; A moves too once B is non-zero
                assert not torch.equal(p, before[n]), f"adapter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


@pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed (pip install -r requirements-cpu.txt)")
def test_vllm_weight_sync_generates_what_the_peft_model_generates(tiny_llama_dir, tmp_path):
    """The in-loop sync path (engine.load_weights -> policy_state_dict -> vLLM reload) with a PEFT policy: vLLM's
    greedy tokens equal HF greedy generation of the adapted model, and differ from the base's."""
    from utils.inference import SamplingConfig, make_engine

    src = diversified_copy(tiny_llama_dir, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    policy = apply_lora(base, r=4, alpha=8.0, dropout=0.0, target_modules=DEFAULT_TARGET_MODULES)
    _randomize_adapters(policy, std=0.5)
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    greedy = SamplingConfig(temperature=0.0, max_tokens=16)
    prompts = ["Write a short poem about the sea.", "Let me add the numbers step by step. 12 + 35 ="]
    hf = make_engine(policy, engine="hf").generate(prompts, greedy, use_tqdm=False)
    engine = make_engine(policy, engine="vllm", max_model_len=256, max_num_seqs=2, enforce_eager=True)
    try:
        synced = engine.generate(prompts, greedy, use_tqdm=False)  # make_engine loads the folder, then syncs
    finally:
        engine.close()
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    base_out = make_engine(plain, engine="hf").generate(prompts, greedy, use_tqdm=False)
    ids = lambda outs: [[c.token_ids for c in x] for x in outs]  # noqa: E731
    assert ids(synced) == ids(hf)
    assert ids(base_out) != ids(hf)  # the adapters change the greedy tokens: vLLM did not just keep the base
    for n, p in policy.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, adapters[n]), n


# ---------------------------------------------------------------------------------------------------- the trainers
def _rows(run_dir: Path, prefix: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if any(k.startswith(prefix) for k in r)}


def _instruct_args(tmp_path, *extra):
    import train_sft_instruct as T

    return T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                         "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--lr", "1e-2", *extra])


def test_instruct_lora_resume_reproduces_uninterrupted_losses_and_merges(tmp_path):
    import train_sft_instruct as T
    from safetensors.torch import load_file

    common = ["--max-steps", "6", "--eval-every", "6", "--save-every", "3", "--keep-last", "5", "--packing", "doc",
              "--mask-prompt", "--merge-on-save"]
    full = Path(T.main(_instruct_args(tmp_path, "--run-name", "full", *common))["run_dir"])
    broken = Path(T.main(_instruct_args(tmp_path, "--run-name", "broken", *common))["run_dir"])
    shutil.rmtree(broken / "checkpoints" / "step_000006")
    (broken / "checkpoints" / "latest").unlink()
    (broken / "checkpoints" / "latest").symlink_to("step_000003")
    T.main(_instruct_args(tmp_path, "--run-name", "broken", "--resume", *common))
    a, b = _rows(full, "train/"), _rows(broken, "train/")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step]["train/loss"] == a[step]["train/loss"], step
        assert b[step]["train/grad_norm"] == a[step]["train/grad_norm"], step
    assert a[6]["train/loss"] < a[1]["train/loss"]
    evals = _rows(full, "eval/")
    assert evals[6]["eval/test_loss"] < evals[0]["eval/test_loss"]

    ckpt = full / "checkpoints" / "step_000006"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all(".lora_" in k for k in adapter)
    assert adapter.keys() == load_file(broken / "checkpoints" / "step_000006" / "adapter_model.safetensors").keys()
    # merged/: every targeted matrix moved from the base, everything else is the base exactly
    base = load_file(full / "base_model" / "model.safetensors")
    merged = load_file(ckpt / "merged" / "model.safetensors")
    assert merged.keys() == base.keys()
    for k in base:
        targeted = any(f".{m}." in k for m in DEFAULT_TARGET_MODULES)
        assert torch.equal(merged[k], base[k]) != targeted, k
    AutoModelForCausalLM.from_pretrained(ckpt / "merged")  # loads as a plain model


def test_reason_lora_run_learns_with_packing_and_merges(tmp_path):
    import train_sft_reason as R

    out = R.main(R.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--eval-every", "-1",
                               "--run-name", "lora", "--max-steps", "8", "--lora-r", "8", "--lora-dropout", "0",
                               "--packing", "bfd", "--pack-tokens", "512", "--merge-on-save"]))
    rows = _rows(Path(out["run_dir"]), "train/")
    assert rows[8]["train/loss"] < rows[1]["train/loss"]
    ckpt = Path(out["run_dir"]) / "checkpoints" / "step_000008"
    assert (ckpt / "adapter_config.json").exists() and (ckpt / "merged" / "config.json").exists()


def test_lora_with_torchrun_ranks_is_refused_before_loading(tmp_path, monkeypatch):
    import train_sft_instruct as T

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--lora-r 8 with 2 ranks"):
        T.check_args(_instruct_args(tmp_path))
    with pytest.raises(SystemExit, match="--merge-on-save needs --lora-r"):
        T.check_args(_instruct_args(tmp_path, "--lora-r", "0", "--merge-on-save"))


@pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed (pip install -r requirements-cpu.txt)")
def test_reason_lora_in_loop_vllm_validation_matches_hf_validation(tmp_path):
    """In-loop validation of a LoRA run through vLLM (merged weights synced) scores what HF generation of the PEFT
    policy scores: same greedy samples, so the same accuracy and the same saved generations."""
    import train_sft_reason as R

    outs = {}
    for engine in ("vllm", "hf"):
        out = R.main(R.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--run-name", engine,
                                   "--max-steps", "6", "--eval-every", "6", "--val-size", "8", "--lora-r", "8",
                                   "--lora-dropout", "0", "--engine", engine, "--max-tokens", "24"]))
        outs[engine] = Path(out["run_dir"])
    for name in ("step_00000.jsonl", "step_00006.jsonl"):
        a = [json.loads(x)["response"] for x in (outs["vllm"] / "samples" / name).read_text().splitlines()]
        b = [json.loads(x)["response"] for x in (outs["hf"] / "samples" / name).read_text().splitlines()]
        assert a == b and len(a) == 8, name
    before = [json.loads(x)["response"] for x in (outs["hf"] / "samples" / "step_00000.jsonl").read_text().splitlines()]
    after = [json.loads(x)["response"] for x in (outs["hf"] / "samples" / "step_00006.jsonl").read_text().splitlines()]
    assert before != after  # the adapters changed the generations: vLLM followed them
