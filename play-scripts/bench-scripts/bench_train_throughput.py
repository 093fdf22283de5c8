"""Training-step throughput: the reference-style padded loop vs our packed step vs TRL's SFTTrainer, synthetic SFT data.

    python play-scripts/bench-scripts/bench_train_throughput.py --shape qwen2.5-1.5b --device cuda   # GPU numbers
    python play-scripts/bench-scripts/bench_train_throughput.py --shape tiny --steps 3 --length-scale 0.1 \\
        --max-len 256 --pack-tokens 512 --examples-per-step 8                                       # CPU smoke, 10 s

Synthetic data follows the GPU throughput issue: prompt 60-300 tokens (uniform), response log-normal around 500
tokens, sequence capped at 2048, loss on response tokens only; random weights of the chosen architecture. Our
configurations each train a fresh copy of the same model on the same examples, so the loss after step 1 must agree
(packing changes speed, not the objective): the table prints it and the script fails if they differ.

Our configurations (CONFIGS) map to the trainers' flags: `padded` is the reference loop (micro-batches of 4, fp32
log-softmax over the full vocabulary); `packed-mask` packs rows of --pack-tokens with a (T, T) block mask;
`packed` uses varlen attention (`--attention varlen`: flash varlen kernel on CUDA); `+chunked` computes the
lm-head log-softmax 4,096 tokens at a time (recomputed in backward); `+fused` does the same with the lm-head
gradients computed in the forward pass (`--fused-lm-head`); `flex` is FlexAttention; `+compile` is torch.compile of
each decoder layer; `+liger` swaps in Liger's RMSNorm / SwiGLU / RoPE kernels. flex and liger rows need CUDA
(skipped with a printed reason elsewhere); liger rows run last because Liger patches transformers' modules for the
whole process.

tokens/s counts real (non-padding) tokens. TFLOP/s = model FLOPs / time, with the trainers' formula
(`utils.training.MFU_FORMULA`: 6 x matmul parameters per token, input embedding excluded, plus the causal attention
inside each example; recomputation not counted); MFU = TFLOP/s / --peak-tflops. Every row counts the same
examples' FLOPs, whatever its kernels compute (a dense packed row does more attention work than it is credited).

TRL rows (when `trl` imports; a printed line says why one is skipped) train SFTTrainer on the same synthetic
examples, pre-tokenized (full sequences, prompt labels -100), from a fresh model with the same weights, dtype,
precision, lr (constant) and AdamW, micro 4 x accumulation 8 as in the issue's TRL runs, `max_length` = --max-len
(nothing truncated); TRL's other defaults stay (gradient checkpointing, random order, bfd packing, which is
padding-free: SDPA with a block mask built from the position ids unless flash-attn is installed). Each TRL row runs
one epoch over a pool sized to about --steps optimizer steps (a packed row holds ~2.6 examples), so every example
is consumed once. TRL's loss is a per-token mean over the optimizer step, ours a per-example mean: the
packed-vs-padded loss check covers our configs only. Step times exclude data collation for both.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import math
import platform
import sys
import time
import traceback
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "qwen2.5-1.5b": dict(family="qwen2", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                         intermediate_size=8960, vocab_size=151936),
    "llama-3.1-8b-4layers": dict(family="llama", hidden_size=4096, num_layers=4, num_heads=32, num_kv_heads=8,
                                 intermediate_size=14336, vocab_size=128256),
    "tiny": dict(family="qwen2", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
                 vocab_size=1000),
}
# Our step under each configuration: the trainers' flags --packing, --attention, --chunk-size, --compile, --liger.
CONFIGS = {
    "padded": dict(packing="none", attention="sdpa", chunk_size=0),  # the reference implementation's loop
    "packed-mask": dict(packing="bfd", attention="sdpa", chunk_size=0),  # (T, T) block mask: O(T^2)
    "packed": dict(packing="bfd", attention="varlen", chunk_size=0),
    "packed+chunked": dict(packing="bfd", attention="varlen", chunk_size=4096),
    "packed+fused": dict(packing="bfd", attention="varlen", chunk_size=4096, fused=True),
    "packed-flex+fused": dict(packing="bfd", attention="flex", chunk_size=4096, fused=True),
    "packed+fused+compile": dict(packing="bfd", attention="varlen", chunk_size=4096, fused=True, compile=True),
    "packed+chunked+liger": dict(packing="bfd", attention="varlen", chunk_size=4096, liger=True),
    "packed+fused+liger": dict(packing="bfd", attention="varlen", chunk_size=4096, fused=True, liger=True),
    "packed+fused+liger+compile": dict(packing="bfd", attention="varlen", chunk_size=4096, fused=True, liger=True,
                                       compile=True),
}
CUDA_ONLY = ("flex", "liger")  # no FlexAttention backward and no Triton kernels on CPU
# SFTConfig overrides per TRL row; TRL 1.16's defaults otherwise (gradient checkpointing on, bfd packing when packing).
TRL_CONFIGS = {
    "trl-default": dict(packing=False),
    "trl-packing": dict(packing=True),
    "trl-packing-nogc": dict(packing=True, gradient_checkpointing=False),
    "trl-packing-liger": dict(packing=True, gradient_checkpointing=False, use_liger_kernel=True),
}


def synthetic_examples(n: int, vocab: int, seed: int, max_len: int, scale: float = 1.0) -> list[dict]:
    """Examples as 1-D `input_ids` / `labels` / `response_mask`, lengths as in the issue (times `scale`)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(60, 301, (1,), generator=g)) * scale
        r = math.exp(math.log(500) + 0.5 * float(torch.randn(1, generator=g))) * scale
        p, r = max(2, int(p)), max(2, int(r))
        r = min(r, max_len - p)
        full = torch.randint(0, vocab, (p + r,), generator=g)
        mask = torch.zeros(p + r, dtype=torch.bool)
        mask[p:] = True
        out.append({"input_ids": full[:-1], "labels": full[1:], "response_mask": mask[1:]})
    return out


def causal_pairs(n: int) -> int:
    """Query-key pairs of causal attention over one document of n tokens."""
    return n * (n + 1) // 2


def pad_batches(examples: list[dict], micro: int, pad_id: int) -> list[dict]:
    import torch

    out = []
    for s in range(0, len(examples), micro):
        chunk = examples[s : s + micro]
        T = max(len(e["input_ids"]) for e in chunk)
        b = {k: torch.full((len(chunk), T), pad_id, dtype=torch.long) for k in ("input_ids", "labels")}
        b["response_mask"] = torch.zeros((len(chunk), T), dtype=torch.bool)
        for i, e in enumerate(chunk):
            for k in b:
                b[k][i, : len(e[k])] = e[k]
        out.append(b)
    return out


def fresh_model(shape: dict, precision: str, device: str, attention: str = "sdpa", liger: bool = False):
    """The shape's model with seed-0 random weights, built on `device` (identical for every config in a run), with
    the trainers' attention backend and optional Liger kernels."""
    import torch

    from utils.doc_attention import set_attention_backend
    from utils.model_setup import apply_liger_kernels
    from utils.tiny_models import build_tiny_model
    from utils.training import model_dtype_for

    spec = {k: v for k, v in shape.items() if k not in ("family", "vocab_size")}
    with torch.device(device):  # initializing 1.5B parameters on the CPU takes longer than the benchmark
        model = build_tiny_model(shape["family"], shape["vocab_size"], seed=0, tie_word_embeddings=False, **spec)
    model = model.to(device=device, dtype=model_dtype_for(precision))  # device: in case the builder ignored it
    set_attention_backend(model, attention, device)
    if liger:
        apply_liger_kernels(model)
    return model


def run_config(name, cfg, args, shape, steps_examples, device):
    import torch

    from utils.model_setup import compile_decoder_layers
    from utils.packing import pack_examples
    from utils.training import (attention_width, build_optimizer, matmul_parameters, resolve_precision, train_step,
                                training_flops)  # fmt: skip

    precision = resolve_precision(args.precision, device)
    model = fresh_model(shape, precision, device, cfg["attention"], cfg.get("liger", False))
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul, n_layers = matmul_parameters(model), model.config.num_hidden_layers
    attn_width = attention_width(model.config)
    opt = build_optimizer(model, args.lr, 0.0)
    def batches(exs):
        if cfg["packing"] == "bfd":
            return pack_examples(exs, args.pack_tokens, 0, "per_example", attention=cfg["attention"])
        return pad_batches(exs, args.micro_batch_size, 0)

    def step(optimizer, micro, lr):
        return train_step(model, optimizer, micro, lr, "per_example", grad_clip=1.0, precision=precision,
                          chunk_size=cfg["chunk_size"], fused_lm_head=cfg.get("fused", False))

    if cfg.get("compile"):
        compile_decoder_layers(model)
        # Compile (and the recompiles for new row lengths) before timing: steps through SGD at lr 0 leave the
        # weights bit for bit as they were, so step 1's loss still matches the other configs.
        frozen = torch.optim.SGD(model.parameters(), lr=0.0)
        t0 = time.perf_counter()
        for exs in steps_examples[: args.compile_warmup_steps]:
            step(frozen, batches(exs), 0.0)
        print(f"{name}: {args.compile_warmup_steps} compile warm-up steps at lr 0, {time.perf_counter() - t0:.0f} s")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, times, real_tokens, pairs = [], [], 0, 0
    for i, exs in enumerate(steps_examples):
        stats = step(opt, batches(exs), args.lr)
        losses.append(stats["loss"])
        if i >= args.warmup_steps:
            times.append(stats["step_time_s"])
            real_tokens += sum(len(e["input_ids"]) for e in exs)
            pairs += sum(causal_pairs(len(e["input_ids"])) for e in exs)
    dt = sum(times)
    tps = real_tokens / dt if dt else float("nan")
    tflops = training_flops(n_matmul, n_layers, attn_width, real_tokens, pairs) / dt / 1e12 if dt else float("nan")
    return {
        "config": name, "tokens_per_s": tps, "tflops": tflops, "mfu": tflops / args.peak_tflops,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "first_loss": losses[0], "last_loss": losses[-1], "params": n_params,
    }  # fmt: skip


def unshifted(example: dict) -> tuple[list[int], list[int]]:
    """Full sequence and HF-style labels (-100 = not in the loss; the model shifts them) of a synthetic example."""
    full = example["input_ids"].tolist() + example["labels"][-1:].tolist()
    labels = [-100] + [t if m else -100 for t, m in zip(example["labels"].tolist(), example["response_mask"].tolist())]
    return full, labels


def trl_pool_size(lengths: list[int], packing: bool, rows_per_step: int, steps: int, max_len: int) -> int:
    """Examples for `steps` optimizer steps of `rows_per_step` rows: padded rows hold one example, packed rows
    hold `max_len` tokens (largest prefix of `lengths` whose best-fit-decreasing packing fills at most that many)."""
    from utils.packing import pack_best_fit_decreasing

    target = rows_per_step * steps
    if not packing:
        return target
    lo, hi = target, len(lengths)  # at least one example per row
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(pack_best_fit_decreasing(lengths[:mid], max_len)) <= target else (lo, mid - 1)
    return lo


def trl_skip_reason(cfg: dict, device: str) -> str:
    """Why a TRL row cannot run here ('' when it can): imports are tried, since carried wheels can mismatch."""
    wanted = ["trl", "datasets"] + (["liger_kernel"] if cfg.get("use_liger_kernel") else [])
    for module in wanted:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            return f"{module} is not installed (requirements-dev.txt pins trl; gpu_bench.sh installs carried wheels)"
        except Exception as e:  # a carried wheel built against another version of its dependencies
            return f"{module} does not import: {type(e).__name__}: {e}"
    if cfg.get("use_liger_kernel") and not device.startswith("cuda"):
        return "Liger's Triton kernels need CUDA"
    return ""


def run_order(names: list[str]) -> list[str]:
    """`names` with the Liger rows moved to the end, order otherwise kept."""

    def uses_liger(name: str) -> bool:
        cfg = CONFIGS.get(name) or TRL_CONFIGS[name]
        return bool(cfg.get("liger") or cfg.get("use_liger_kernel"))

    return [n for n in names if not uses_liger(n)] + [n for n in names if uses_liger(n)]


def save_results(path: str, meta: dict, rows: list[dict]) -> None:
    if path:
        from utils.helper_fns import write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"meta": meta, "results": rows})


def our_skip_reason(cfg: dict, device: str) -> str:
    """Why one of our configs cannot run here ('' when it can)."""
    if device.startswith("cuda"):
        if cfg.get("liger"):  # imported, not just found: a carried wheel can mismatch the image's triton
            try:
                importlib.import_module("liger_kernel.transformers")
            except ModuleNotFoundError:
                return "liger-kernel is not installed (gpu_bench.sh installs carried wheels)"
            except Exception as e:
                return f"liger_kernel does not import: {type(e).__name__}: {e}"
        return ""
    needs = [what for what in CUDA_ONLY if cfg.get(what) or cfg.get("attention") == what]
    return f"{' and '.join(needs)} {'need' if len(needs) > 1 else 'needs'} CUDA" if needs else ""


def run_trl_config(name, cfg, args, shape, device):
    """Train TRL's SFTTrainer for one epoch over a pool of the synthetic examples; one row like `run_config`'s.

    Real tokens are counted from each collated micro-batch (attention mask when padded, positions when
    padding-free), so `tokens_total` must equal the pool's tokens: nothing truncated, dropped or repeated.
    """
    import tempfile

    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from utils.training import (attention_width, matmul_parameters, resolve_precision, step_flop_counts,
                                training_flops)  # fmt: skip

    cuda = device.startswith("cuda")
    precision = resolve_precision(args.precision, device)
    micro, accum = args.trl_micro_batch_size, args.trl_grad_accum
    # synthetic_examples is prefix-stable: these start with the examples our configs train on
    n_rows = micro * accum * args.steps
    probe = [len(e["input_ids"]) + 1 for e in synthetic_examples(n_rows, shape["vocab_size"], args.seed, args.max_len,
                                                                 args.length_scale)]
    n_pool = n_rows + (int(2 * n_rows * args.max_len * len(probe) / sum(probe)) if cfg["packing"] else 0)
    pool = synthetic_examples(n_pool, shape["vocab_size"], args.seed, args.max_len, args.length_scale)
    n = trl_pool_size([len(e["input_ids"]) + 1 for e in pool], cfg["packing"], micro * accum, args.steps,
                      args.max_len)
    if cfg["packing"] and n >= len(pool):
        raise SystemExit(f"{name}: pool of {len(pool)} examples too small for {args.steps} packed steps")
    full, labels = zip(*(unshifted(e) for e in pool[:n]))
    dataset = Dataset.from_dict({"input_ids": list(full), "labels": list(labels)})
    # TRL needs a tokenizer only for its pad id; 0 is the pad id of our padded configs too
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<pad>")

    steps, times, tokens, documents, pairs = [], [], [0], [0], [0]

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            steps.append({"tokens": tokens[0], "pairs": pairs[0]})
            tokens[0] = pairs[0] = 0

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps[-1]["loss"] = logs["loss"]

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            if "attention_mask" in inputs:  # padded rows
                tokens[0] += int(inputs["attention_mask"].sum())
                documents[0] += int(inputs["attention_mask"].shape[0])
            else:  # padding-free: one flattened row, positions restart at each document
                tokens[0] += int(inputs["position_ids"].numel())
                documents[0] += int((inputs["position_ids"] == 0).sum())
            pairs[0] += step_flop_counts([inputs])[1]
            return super().training_step(model, inputs, *rest, **kw)

    model = fresh_model(shape, precision, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul, n_layers = matmul_parameters(model), model.config.num_hidden_layers
    attn_width = attention_width(model.config)
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                           max_length=args.max_len, pad_to_multiple_of=None, num_train_epochs=1,
                           learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                           optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=precision != "fp32",
                           use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
                           disable_tqdm=True, seed=args.seed, dataloader_num_workers=0, **cfg)
        trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                                     callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # one table at the end instead of a dict per step
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    measured = slice(args.warmup_steps, None)
    dt, real = sum(times[measured]), sum(st["tokens"] for st in steps[measured])
    tps = real / dt if dt else float("nan")
    measured_pairs = sum(st["pairs"] for st in steps[measured])
    tflops = training_flops(n_matmul, n_layers, attn_width, real, measured_pairs) / dt / 1e12 if dt else float("nan")
    return {
        "config": name, "tokens_per_s": tps, "tflops": tflops, "mfu": tflops / args.peak_tflops,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_loss": steps[0].get("loss", float("nan")), "last_loss": steps[-1].get("loss", float("nan")),
        "params": n_params, "steps": len(steps), "examples": n, "documents": documents[0],
        "tokens_total": sum(st["tokens"] for st in steps), "tokens_per_step": real / max(1, len(times[measured])),
    }  # fmt: skip


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b", help="model shape (random weights)")
    p.add_argument("--num-layers", type=int, default=-1, help="decoder layers (-1 = the shape's; fewer for checks)")
    p.add_argument("--configs", default=",".join([*CONFIGS, *TRL_CONFIGS]),
                   help=f"comma list of {list(CONFIGS)} and TRL's {list(TRL_CONFIGS)}")
    p.add_argument("--examples-per-step", type=int, default=84,
                   help="our configs' examples per optimizer step (84 x 773 mean tokens ~ TRL's 4 x 8 rows of 2048)")
    p.add_argument("--steps", type=int, default=5, help="measured steps + warmup steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps excluded from timing (allocator, autotuning)")
    p.add_argument("--compile-warmup-steps", type=int, default=3,
                   help="compiled configs: untimed steps at lr 0 before step 1 (compilation and recompiles)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="padded configs")
    p.add_argument("--pack-tokens", type=int, default=8192,
                   help="packed row budget (8192 = the tokens of TRL's micro-batch of 4 x 2048, for equal peak memory)")
    p.add_argument("--trl-micro-batch-size", type=int, default=4, help="TRL rows per micro-batch (padded or packed)")
    p.add_argument("--trl-grad-accum", type=int, default=8, help="TRL micro-batches per optimizer step")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply synthetic lengths (e.g. 0.05 on CPU)")
    p.add_argument("--max-len", type=int, default=2048, help="longest sequence; TRL's max_length and packed row")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "mixed", "bf16"],
                   help="as the trainers' --precision (auto = mixed on CUDA, fp32 on CPU)")
    p.add_argument("--lr", type=float, default=1e-5, help="constant learning rate of every row")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic examples and weights")
    p.add_argument("--output", default="", help="JSON file for the results (with machine, date, versions)")
    args = p.parse_args(argv)

    import torch

    from utils.helper_fns import pick_device
    from utils.training import MFU_FORMULA

    device = pick_device(args.device)
    shape = dict(SHAPES[args.shape])
    if args.num_layers > 0:
        shape["num_layers"] = args.num_layers
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS and n not in TRL_CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}")
    # Liger patches transformers' Qwen2/Llama modules for the whole process: its rows go last, so no other row
    # (ours or TRL's) measures Liger's kernels by accident.
    names = run_order(names)
    if args.pack_tokens < args.max_len:
        raise SystemExit(f"--pack-tokens {args.pack_tokens} < --max-len {args.max_len}")
    if args.steps <= args.warmup_steps:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup-steps {args.warmup_steps}")
    print(f"examples/step: ours {args.examples_per_step}, TRL {args.trl_micro_batch_size} x {args.trl_grad_accum} "
          f"rows (padded: one example a row; packed: {args.max_len} tokens a row)")
    examples = synthetic_examples(args.examples_per_step * args.steps, shape["vocab_size"], args.seed, args.max_len,
                                  args.length_scale)
    steps = [examples[i * args.examples_per_step : (i + 1) * args.examples_per_step] for i in range(args.steps)]
    versions = {}
    for dist in ("transformers", "trl", "accelerate", "datasets", "liger-kernel"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "device": device,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None, "torch": torch.__version__,
            "versions": versions, "shape": args.shape, "num_layers": shape["num_layers"], "args": vars(args),
            "skipped": {}, "mfu_formula": MFU_FORMULA}  # fmt: skip
    rows, errors = [], []
    for name in names:
        cfg = CONFIGS.get(name) or TRL_CONFIGS[name]
        skip = trl_skip_reason(cfg, device) if name in TRL_CONFIGS else our_skip_reason(cfg, device)
        if skip:
            print(f"skip {name}: {skip}")
            meta["skipped"][name] = skip
            save_results(args.output, meta, rows)
            continue
        try:
            if name in CONFIGS:
                rows.append(run_config(name, cfg, args, shape, steps, device))
            else:
                rows.append(run_trl_config(name, cfg, args, shape, device))
        except torch.OutOfMemoryError as e:  # one config too large for the card must not lose the others' numbers
            errors.append(name)
            rows.append({"config": name, "error": f"out of memory: {str(e).splitlines()[0]}"})
        except Exception as e:  # version mismatches and GPU-only kernel failures: report, go on, fail at the end
            traceback.print_exc()
            errors.append(name)
            rows.append({"config": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        gc.collect()  # Trainer holds reference cycles: free the last model before the next one's peak is measured
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        save_results(args.output, meta, rows)  # after every row: a run cut off by its time limit keeps what it measured
    print(f"{'config':28s} {'tok/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} {'loss@1':>9s} {'loss@N':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:28s} {r['error']}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['config']:28s} {r['tokens_per_s']:10.0f} {r['tflops']:8.2f} {r['mfu']:6.1%} {peak:>9s} "
              f"{r['first_loss']:9.5f} {r['last_loss']:9.5f}")
    if any(r["config"] in TRL_CONFIGS for r in rows):
        print("note: TRL's loss is a per-token mean over its step, ours a per-example mean, and TRL's steps hold\n"
              "      other examples (JSON: steps, tokens_per_step): compare TRL's losses with each other, not ours")
    ours = [r for r in rows if r["config"] in CONFIGS and "error" not in r]
    tol = 2e-2 if device.startswith("cuda") else 1e-4  # bf16 compute on GPU reorders sums
    ref = ours[0]["first_loss"] if ours else 0.0
    bad = [r["config"] for r in ours if abs(r["first_loss"] - ref) > tol * max(1.0, abs(ref))]
    if bad:
        raise SystemExit(f"loss after step 1 differs from {ours[0]['config']} for {bad}: packing changed the objective")
    if errors:
        raise SystemExit(f"configs that failed: {errors}")
    return rows


if __name__ == "__main__":
    main()
