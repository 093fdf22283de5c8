"""Evaluate a model on MATH with the r1_zero prompt: sample, grade with the r1_zero reward, write records and a summary.

Reference evaluation (5,000 MATH validation problems, temperature 1, stop at </answer>):
    python evaluate_reason.py --model Qwen/Qwen2.5-Math-1.5B --data data/sft-reason/val.jsonl
Smoke run (the 20 bundled problems; any checkpoint folder works in place of a hub id):
    python evaluate_reason.py --model Qwen/Qwen2.5-Math-1.5B --data data/sft-reason/sample_val.jsonl --max-tokens 256
CPU check of the CPU demo's checkpoint on its own val set (greedy; matches the trainer's last in-loop eval):
    python evaluate_reason.py --model results/demo/checkpoints/step_000500 --data data/demo/val.jsonl \\
        --prompt-template data/demo/demo.prompt --temperature 0 --max-tokens 64

Writes <output-dir>/config.json (these flags, before generating), records.jsonl (one record per example, appended as
chunks finish), generation.json and summary.json. Rerunning the same command after an interruption continues where
it stopped. `--config data/eval_configs/math.yaml` sets defaults from a YAML file; flags override it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.cli_flags import (FLAG_RANGES, add_data_source_flags, add_deprecated_alias, add_engine_flags,
                             check_engine_flags,
                             check_flag_ranges)

# YAML keys of renamed flags, still read under the new name (--config)
RENAMED_KEYS = {"prompt": "prompt_template", "output": "output_dir"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file of flag defaults (keys = flag names), e.g. data/eval_configs/math.yaml")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-Math-1.5B", help="HF hub id or local model folder")
    g.add_argument("--data", default="data/sft-reason/val.jsonl",
                   help="{problem|question, expected_answer|answer|ground_truth}: JSONL, JSON, Parquet or hub id")
    add_data_source_flags(g, {"--data-split": ("test", "split of a hub --data")})
    g.add_argument("--prompt-template", default="data/r1_zero.prompt",
                   help="prompt file with a {question} slot (the one training uses)")
    add_deprecated_alias(g, "--prompt", "--prompt-template")
    g.add_argument("--max-examples", type=int, default=-1, help="first N problems of the file (-1 = all)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--max-tokens", type=int, default=1024, help="max generated tokens per sample")
    g.add_argument("--stop", nargs="+", default=["</answer>"], help="stop strings")
    g.add_argument("--include-stop-str", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the matched stop string in the response (the format reward needs </answer>)")
    g.add_argument("--n-samples", type=int, default=1,
                   help="samples per problem; > 1 adds pass@k and majority-vote accuracy")
    g.add_argument("--seed", type=int, default=0, help="sampling seed: sample j of example i is seeded by (seed, i, j)")
    g = p.add_argument_group("engine")
    add_engine_flags(g)
    g = p.add_argument_group("grading and output")
    g.add_argument("--grader-workers", type=int, default=None, help="grader processes (default: min(4, CPUs))")
    g.add_argument("--grader-timeout-s", type=float, default=5.0,
                   help="seconds one answer may take to grade; over it counts wrong")
    g.add_argument("--chunk-size", type=int, default=512,
                   help="problems per generate call; records are appended after each (-1 = one call)")
    g.add_argument("--output-dir", default="",
                   help="output folder ('' = results/eval_reason_<model>_<data>_T<temperature>_n<n-samples>)")
    add_deprecated_alias(g, "--output", "--output-dir")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    pre, _ = p.parse_known_args(argv)
    if pre.config:
        p.set_defaults(**_config_defaults(p, pre.config))
    return p.parse_args(argv)


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Flag defaults from a YAML file; unknown keys and a benchmark other than math are errors."""
    from utils.benchmarks.eval_config import load_eval_config

    try:
        values = load_eval_config(path, set(vars(parser.parse_args([]))) | set(RENAMED_KEYS))
    except ValueError as e:
        raise SystemExit(f"--config {e}") from None
    for old, new in RENAMED_KEYS.items():
        if old in values:
            print(f"--config {path}: key {old!r} is deprecated: use {new!r}", file=sys.stderr)
            values[new] = values.pop(old)
    benchmark = values.pop("benchmark", "math")
    if benchmark != "math":
        raise SystemExit(f"--config {path}: benchmark {benchmark!r}; evaluate_reason.py runs 'math' "
                         "(see evaluate_instruct.py)")
    return values


def check_args(args: argparse.Namespace) -> None:
    """Reject out-of-range values, bad flag combinations and missing files before any model loads."""
    from utils.data_sources import is_hub_id
    from utils.model_setup import check_model_flag

    check_flag_ranges(args, {k: v for k, v in FLAG_RANGES.items() if k != "chunk_size"})  # checked below: -1 = all
    if args.n_samples > 1 and args.temperature == 0:
        raise SystemExit(f"--n-samples {args.n_samples} with --temperature 0 gives {args.n_samples} identical greedy "
                         f"samples; use --temperature > 0 or --n-samples 1")  # fmt: skip
    if args.chunk_size == 0 or args.chunk_size < -1:
        raise SystemExit(f"--chunk-size {args.chunk_size}: must be >= 1, or -1 for one call")
    if not is_hub_id(args.data) and not Path(args.data).exists():
        hint = " (download it: python play-scripts/data-scripts/download_data.py)" if "sft-reason" in args.data else ""
        raise SystemExit(f"--data {args.data}: file not found{hint}; "
                         "a 20-problem sample: data/sft-reason/sample_val.jsonl")
    if not Path(args.prompt_template).exists():
        raise SystemExit(f"--prompt-template {args.prompt_template}: file not found")
    check_engine_flags(args.device, args.tensor_parallel_size, args.data_parallel_size)
    check_model_flag(args.model)


def default_output_dir(args: argparse.Namespace) -> str:
    """results/eval_reason_<model>_<data>_T<temperature>_n<n>: the same command resumes into the same folder."""
    from utils.benchmarks.eval_config import model_slug

    data = Path(args.data).stem
    return f"results/eval_reason_{model_slug(args.model)}_{data}_T{args.temperature:g}_n{args.n_samples}"


def main(args: argparse.Namespace) -> dict:
    from utils.benchmarks import REGISTRY, run_benchmark
    from utils.benchmarks.base import generation_settings, load_resumable
    from utils.helper_fns import check_writable_dir, load_prompt, seed_everything, write_json
    from utils.inference import SamplingConfig, make_engine
    from utils.serving import choose_eval_dtype

    check_args(args)
    args.output_dir = args.output_dir or default_output_dir(args)
    out = check_writable_dir(args.output_dir, "--output-dir")
    seed_everything(args.seed)
    benchmark = REGISTRY["math"](prompt_template=load_prompt(args.prompt_template), grader_workers=args.grader_workers,
                                 grader_timeout_s=args.grader_timeout_s)  # fmt: skip
    benchmark.data_split, benchmark.data_config = args.data_split, args.data_config  # where a hub --data is read
    try:
        examples = benchmark.load_examples(args.data, args.max_examples)  # every record checked before the model loads
    except ValueError as e:
        raise SystemExit(f"--data: {e}") from None
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              stop=list(args.stop), include_stop_str_in_output=args.include_stop_str,
                              n=args.n_samples, seed=args.seed)  # fmt: skip
    try:  # an output folder holding another setting's records fails here, not after the model loads
        done = load_resumable(out, benchmark, examples, generation_settings(benchmark, args.model, args.data, sampling))
    except ValueError as e:
        raise SystemExit(f"--output-dir: {e}") from None
    print(f"math: {len(examples)} problems x {args.n_samples} samples = {len(examples) * args.n_samples} generations "
          f"({sum(ex['index'] in done for ex in examples)} problems already done) -> {out}")  # fmt: skip
    write_json(out / "config.json", vars(args))
    engine = make_engine(args.model, engine=args.engine, seed=args.seed,
                         dtype=choose_eval_dtype(args.dtype, args.model, args.device),
                         tensor_parallel_size=args.tensor_parallel_size,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         max_model_len=None if args.max_model_len < 0 else args.max_model_len,
                         max_num_seqs=args.max_num_seqs, device=args.device,
                         enforce_eager=args.enforce_eager)  # fmt: skip
    try:
        summary = run_benchmark(benchmark, engine, args.data, sampling, out, max_examples=args.max_examples,
                                chunk_size=args.chunk_size, use_tqdm=not args.no_progress)  # fmt: skip
    finally:
        engine.close()
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    m, t = summary["metrics"], summary["throughput"]

    def num(x, fmt=".1f"):
        return "-" if x is None else format(x, fmt)

    print(f"\nmath | {m['num_examples']} problems, {m['num_samples']} samples | accuracy {num(m['accuracy'], '.4f')} "
          f"| format accuracy {num(m['format_accuracy'], '.4f')}")
    print(f"samples: correct {m['n_correct']} | formatted, wrong answer {m['n_formatted_wrong']} | "
          f"unformatted {m['n_unformatted']} | grader timeouts {m['n_grader_timeouts']}")
    print(f"response tokens: mean {num(m['mean_response_tokens'])} | correct {num(m['mean_response_tokens_correct'])}"
          f" | incorrect {num(m['mean_response_tokens_incorrect'])} | hit max-tokens {num(m['truncated_frac'], '.1%')}")
    extra = [f"{k} {v:.4f}" for k, v in m.items() if k.startswith("pass@") or k == "majority_accuracy"]
    if extra:
        print(" | ".join(extra))
    print(f"this run ({summary['engine']}): {t['examples_generated']} problems in {t['wall_s']:.1f} s | "
          f"{num(t['examples_per_s'], '.2f')} problems/s | "
          f"{num(t['generated_tokens_per_s'], '.0f')} generated tokens/s")


if __name__ == "__main__":  # vLLM's workers re-import this module; the guard keeps them from re-running main
    main(parse_args())
