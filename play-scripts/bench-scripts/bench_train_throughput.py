"""Training-step throughput: the reference-style padded loop vs our packed step, on synthetic SFT data.

    python play-scripts/bench-scripts/bench_train_throughput.py --shape qwen2.5-1.5b --device cuda   # GPU numbers
    python play-scripts/bench-scripts/bench_train_throughput.py --shape tiny --steps 2                # CPU smoke

Synthetic data follows the GPU throughput issue: prompt 60-300 tokens (uniform), response log-normal around 500
tokens, sequence capped at 2048, loss on response tokens only; random weights of the chosen architecture. Every
configuration trains a fresh copy of the same model on the same examples, so the loss after step 1 must agree
(packing changes speed, not the objective): the table prints it and the script fails if they differ.

tokens/s counts real (non-padding) tokens. TFLOP/s = 6 x parameters x tokens / time (matmul FLOPs of forward +
backward, attention excluded); MFU = TFLOP/s / --peak-tflops. TRL's SFTTrainer comparison is not built yet.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
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
CONFIGS = {
    "padded": dict(packing="none", chunk_size=0),  # the reference implementation's loop
    "packed": dict(packing="bfd", chunk_size=0),
    "packed+chunked": dict(packing="bfd", chunk_size=4096),
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


def run_config(name, cfg, args, shape, steps_examples, device):
    import torch

    from utils.dataloader import pack_examples
    from utils.tiny_models import build_tiny_model
    from utils.training import build_optimizer, model_dtype_for, resolve_precision, train_step

    precision = resolve_precision(args.precision, device)
    spec = {k: v for k, v in shape.items() if k not in ("family", "vocab_size")}
    model = build_tiny_model(shape["family"], shape["vocab_size"], seed=0, tie_word_embeddings=False, **spec)
    model = model.to(device=device, dtype=model_dtype_for(precision))
    n_params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, args.lr, 0.0)
    step_model = torch.compile(model) if args.compile else model
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, times, real_tokens = [], [], 0
    for i, exs in enumerate(steps_examples):
        if cfg["packing"] == "bfd":
            micro = pack_examples(exs, args.pack_tokens, 0, "per_example")
        else:
            micro = pad_batches(exs, args.micro_batch_size, 0)
        stats = train_step(step_model, opt, micro, args.lr, "per_example", grad_clip=1.0, precision=precision,
                           chunk_size=cfg["chunk_size"])
        losses.append(stats["loss"])
        if i >= args.warmup_steps:
            times.append(stats["step_time_s"])
            real_tokens += sum(len(e["input_ids"]) for e in exs)
    dt = sum(times)
    tps = real_tokens / dt if dt else float("nan")
    tflops = 6 * n_params * tps / 1e12
    return {
        "config": name, "tokens_per_s": tps, "tflops": tflops, "mfu": tflops / args.peak_tflops,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "first_loss": losses[0], "last_loss": losses[-1], "params": n_params,
    }  # fmt: skip


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--examples-per-step", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="measured steps + warmup steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps excluded from timing (compilation, allocator)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="padded configs")
    p.add_argument("--pack-tokens", type=int, default=16384, help="packed row budget")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply synthetic lengths (e.g. 0.05 on CPU)")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "mixed", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="", help="JSON file for the results (with machine, date, versions)")
    args = p.parse_args(argv)

    import torch

    from utils.helper_fns import pick_device, write_json

    device = pick_device(args.device)
    shape = SHAPES[args.shape]
    if args.pack_tokens < args.max_len:
        raise SystemExit(f"--pack-tokens {args.pack_tokens} < --max-len {args.max_len}")
    examples = synthetic_examples(args.examples_per_step * args.steps, shape["vocab_size"], args.seed, args.max_len,
                                  args.length_scale)
    steps = [examples[i * args.examples_per_step : (i + 1) * args.examples_per_step] for i in range(args.steps)]
    rows = [run_config(name, CONFIGS[name], args, shape, steps, device) for name in args.configs.split(",")]
    ref = rows[0]["first_loss"]
    print(f"{'config':16s} {'tok/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} {'loss@1':>9s} {'loss@N':>9s}")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['config']:16s} {r['tokens_per_s']:10.0f} {r['tflops']:8.2f} {r['mfu']:6.1%} {peak:>9s} "
              f"{r['first_loss']:9.5f} {r['last_loss']:9.5f}")
    tol = 2e-2 if device.startswith("cuda") else 1e-4  # bf16 compute on GPU reorders sums
    bad = [r["config"] for r in rows if abs(r["first_loss"] - ref) > tol * max(1.0, abs(ref))]
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "device": device,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None, "torch": torch.__version__,
            "shape": args.shape, "args": vars(args)}  # fmt: skip
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.output, {"meta": meta, "results": rows})
    if bad:
        raise SystemExit(f"loss after step 1 differs from {rows[0]['config']} for {bad}: packing changed the objective")
    return rows


if __name__ == "__main__":
    main()
