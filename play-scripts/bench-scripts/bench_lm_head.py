"""The loss head alone: plain (full fp32 logits), chunked (recomputed in backward) and fused (gradients in the
forward pass) log-prob + weighted NLL, forward and backward, on random hidden states. Prints one table (ms a call,
tokens/s, peak GiB on CUDA, largest gradient difference from the plain path) and writes JSON.

    python play-scripts/bench-scripts/bench_lm_head.py --device cuda            # Qwen2.5-1.5B's head, 8,192 tokens
    python play-scripts/bench-scripts/bench_lm_head.py --tokens 1024 --vocab 16384 --out results/bench/lm-head-cpu.json

The three paths compute the same loss and gradients (checked here and in tests/test_fused_lm_head.py); only speed
and memory differ. Per chunk, chunked does 4 (chunk x H x V) matmuls and fused 3.

Measured on the 2-core CPU container (1 thread), 2026-11-26, torch 2.13.0+cpu, 1,024 tokens, H 1,536, V 16,384,
chunk 256, fp32 (results/bench/lm-head-cpu.json): plain 1,617 ms, chunked 2,188 ms, fused 1,693 ms a forward +
backward, gradients equal to 4e-9. Fused runs at the plain path's speed (both 3 matmuls) with the chunked path's
memory; chunked pays ~35% for its recomputation. GPU numbers: the next GPU session (gpu_bench.sh runs this).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def run(path: str, hidden, weight, labels, token_weights, chunk_size: int):
    """One forward + backward of `path`; returns (loss, grad_hidden, grad_weight)."""
    import torch

    from utils.fused_lm_head import fused_weighted_nll
    from utils.post_train import chunked_log_probs_from_hidden

    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if path == "fused":
        loss = fused_weighted_nll(h, w, labels, token_weights, chunk_size)["loss"]
    elif path == "chunked":
        lp = chunked_log_probs_from_hidden(h, w, labels, chunk_size, return_token_entropy=True)["log_probs"]
        loss = -(lp * token_weights).sum()
    else:  # plain: (B, T, V) fp32 logits, as the reference implementation
        log_probs = torch.log_softmax((h @ w.t()).float(), dim=-1)
        lp = log_probs.gather(-1, labels[..., None]).squeeze(-1)
        _ = -(log_probs.exp() * log_probs).sum(-1)  # entropy, as the train step logs it
        loss = -(lp * token_weights).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per call (one packed row)")
    p.add_argument("--hidden", type=int, default=1536, help="hidden size (Qwen2.5-1.5B: 1536)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (Qwen2.5: 151936)")
    p.add_argument("--chunk-size", type=int, default=4096, help="tokens per chunk of the chunked and fused paths")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="", help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--paths", default="plain,chunked,fused", help="comma-separated loss-head paths to time")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per path (after one warm-up call)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (two busy threads on 2 cores crawl)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random hidden states and head")
    p.add_argument("--out", default="", help="JSON file for the results (with machine, date, versions)")
    args = p.parse_args(argv)

    import torch

    from utils.helper_fns import pick_device, write_json

    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    paths = args.paths.split(",")
    if set(paths) - {"plain", "chunked", "fused"}:
        raise SystemExit(f"--paths: unknown {sorted(set(paths) - {'plain', 'chunked', 'fused'})}")
    g = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g).to(device, dtype)
    weight = (0.02 * torch.randn(args.vocab, args.hidden, generator=g)).to(device, dtype)
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g).to(device)
    token_weights = torch.full((1, args.tokens), 1.0 / args.tokens, device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    print(f"{'path':8s} {'ms':>9s} {'tok/s':>10s} {'peak GiB':>8s} {'loss':>10s} {'max|dgrad|':>12s}"
          f"  ({args.tokens} tokens, H {args.hidden}, V {args.vocab}, {dtype}, {device})")
    rows, reference = [], None
    for path in paths:
        run(path, hidden, weight, labels, token_weights, args.chunk_size)  # warm-up (allocator, kernels)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            loss, gh, gw = run(path, hidden, weight, labels, token_weights, args.chunk_size)
            sync()
            times.append(time.perf_counter() - t0)
        ms = 1000 * min(times)
        row = {"path": path, "ms": ms, "tokens_per_s": args.tokens / (ms / 1000), "loss": float(loss),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip
        if reference is None:
            reference = (gh.float(), gw.float())
        row["max_grad_diff"] = max(float((gh.float() - reference[0]).abs().max()),
                                   float((gw.float() - reference[1]).abs().max()))
        rows.append(row)
        peak = f"{row['peak_gib']:6.2f}" if cuda else "     -"
        print(f"{path:8s} {ms:9.1f} {row['tokens_per_s']:10.0f} {peak:>8s} {row['loss']:10.6f} "
              f"{row['max_grad_diff']:12.2e}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, {
            "results": rows, "args": vars(args), "device": device, "dtype": str(dtype),
            "gpu": torch.cuda.get_device_name() if cuda else None, "threads": torch.get_num_threads(),
            "machine": {"platform": platform.platform(), "processor": platform.processor()},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": importlib.metadata.version("transformers")},
        })  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
