"""Reasoning SFT: fine-tune a causal LM on r1_zero-format reasoning traces, validating in-loop by sampling and grading.

Reference run (Qwen2.5-Math-1.5B on 3,496 correct MATH traces, 38 steps of 128; published 0.520 val accuracy):
    python train_sft_reason.py --train-file data/sft-reason/sft_gpt-oss-120b_filtered.jsonl \\
        --val-file data/sft-reason/val.jsonl --run-name qwen-math-filtered
CPU demo (tiny model trained from scratch on bundled two-digit addition; a few minutes on 2 cores):
    python train_sft_reason.py --preset demo
Smoke run of the real pipeline on the demo data:
    python train_sft_reason.py --preset demo --max-steps 20 --eval-every 10 --run-name smoke

Each run writes results/<run>/config.json (before step 0), metrics.jsonl (train/* per step, eval/* per eval),
samples/step_XXXXX.jsonl (fixed example generations) and checkpoints/step_XXXXXX (HF folders vLLM loads; with
--lora-r the adapter in PEFT's format, plus merged/ with --merge-on-save).

Flags in more detail:
  --loss-normalization  per_example: mean over each example's response tokens, then over examples (the reference's
                        best runs); constant: sum / --normalize-constant; step_tokens: mean over all response tokens
                        of the step.
  --precision           mixed = fp32 master weights + bf16 autocast; bf16 = pure bf16 weights as the reference run
                        did (AdamW updates smaller than bf16 resolution round away).
  --packing bfd         each step's examples best-fit packed into rows of --pack-tokens, attention and positions
                        restarting per example: the same objective without padding; --micro-batch-size and
                        --gradient-accumulation-steps then only set the examples per step.
  --min-lr              replaces --min-lr-ratio (still accepted: --min-lr = --lr x ratio).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from utils.cli_flags import (add_data_source_flags, add_deprecated_alias, add_gpu_node_flags, add_lora_flags,
                             add_run_flags, add_speed_flags, check_flag_ranges, check_lora_flags, check_speed_flags,
                             parse_with_presets, wandb_tags)

PRESETS = {
    # Tiny Qwen2 from scratch on bundled addition problems: short prompt (the r1_zero preamble is ~7x slower to
    # train through on CPU), greedy validation, one-cycle-like schedule. Measured on 2 CPU cores: see README.
    "demo": dict(
        model="tiny",
        train_file="data/demo/train.jsonl",
        val_file="data/demo/val.jsonl",
        prompt_template="data/demo/demo.prompt",
        micro_batch_size=32,
        gradient_accumulation_steps=1,
        lr=3e-3,
        lr_schedule="cosine",
        warmup_ratio=0.05,
        max_steps=500,
        eval_every=100,
        val_size=200,
        temperature=0.0,
        max_tokens=64,
        max_seq_len=128,
        save_every=-1,
        run_name="demo",
        gpu_memory_utilization=0.3,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of defaults; flags still override")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-Math-1.5B",
                   help="HF hub id or local folder; 'tiny' = a tiny Qwen2 + BPE built from the training texts")
    g.add_argument("--train-file", default="data/sft-reason/sft_gpt-oss-120b_filtered.jsonl",
                   help="{problem, reasoning_trace|response, expected_answer}: JSONL, JSON, Parquet or a hub id")
    g.add_argument("--val-file", default="data/sft-reason/val.jsonl",
                   help="JSONL, JSON array or Parquet of {problem, expected_answer}, or a hub dataset id")
    add_data_source_flags(g, {"--train-split": ("train", "split of a hub --train-file"),
                              "--val-split": ("test", "split of a hub --val-file")})
    g.add_argument("--prompt-template", default="data/r1_zero.prompt", help="prompt file with a {question} slot")
    g.add_argument("--num-examples", type=int, default=-1,
                   help="first N training records after a seeded shuffle (-1 = all)")
    g.add_argument("--max-seq-len", type=int, default=2048,
                   help="tokens; longer prompt+response examples are dropped and counted")
    g = p.add_argument_group("optimization")
    g.add_argument("--micro-batch-size", type=int, default=2, help="examples per forward/backward")
    g.add_argument("--gradient-accumulation-steps", type=int, default=64, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                   help="after warmup: flat, or decay to --min-lr at the last step")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear warmup")
    g.add_argument("--min-lr", type=float, default=0.0, help="final learning rate of cosine and linear (absolute)")
    add_deprecated_alias(g, "--min-lr-ratio", "--min-lr (absolute: --lr x ratio)", dest="min_lr_ratio", type=float)
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay (0 = none)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = no clipping)")
    g.add_argument("--max-steps", type=int, default=38, help="optimizer steps (ignored when --epochs > 0)")
    g.add_argument("--epochs", type=float, default=-1,
                   help="passes over the data; sets the steps (-1 = use --max-steps)")
    g.add_argument("--loss-normalization", choices=["per_example", "constant", "step_tokens"], default="per_example",
                   help="how token losses are averaged (see above); per_example = the reference's")
    g.add_argument("--normalize-constant", type=float, default=1.0, help="divisor for --loss-normalization constant")
    g.add_argument("--precision", choices=["auto", "fp32", "mixed", "bf16"], default="auto",
                   help="auto = mixed on CUDA, fp32 on CPU; bf16 = pure bf16 weights, the reference (see above)")
    g.add_argument("--packing", choices=["none", "bfd"], default="none",
                   help="none = padded micro-batches (the reference); bfd = best-fit packed rows (see above)")
    g.add_argument("--pack-tokens", type=int, default=4096, help="tokens in a packed row (>= --max-seq-len)")
    add_speed_flags(g)
    g = p.add_argument_group("validation")
    g.add_argument("--eval-every", type=int, default=10,
                   help="steps between evals (also before step 1 and after the last; -1 = never)")
    g.add_argument("--val-size", type=int, default=1000, help="fixed random subset of the val file (-1 = all)")
    g.add_argument("--val-seed", type=int, default=0, help="seed of the val subset")
    g.add_argument("--num-samples-logged", type=int, default=20,
                   help="fixed val examples whose generations are saved per eval")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--max-tokens", type=int, default=1024, help="max generated tokens per answer")
    g.add_argument("--stop", default="</answer>", help="stop string, kept in the output")
    g.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto",
                   help="generation backend (auto = vLLM when installed)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="vLLM's share of GPU memory when colocated (0-1)")
    g.add_argument("--vllm-device", default=None,
                   help="vLLM's GPU, e.g. cuda:1 beside a policy on cuda:0 (default: logical GPU 0)")
    g.add_argument("--grader-workers", type=int, default=2, help="grader processes")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=1337, help="seed of data order, model init (tiny) and sampling")
    g.add_argument("--run-name", default="", help="default: reason_<model>_<n>ex_<timestamp>")
    add_run_flags(g)
    add_gpu_node_flags(p.add_argument_group("GPU node: saved dtype, memory plan, vLLM sleep, wandb"),
                       colocated_vllm=True)  # fmt: skip
    add_lora_flags(p)
    args = parse_with_presets(p, PRESETS, argv)
    if "min_lr_ratio" in vars(args):  # the deprecated relative spelling, turned into the absolute one
        args.min_lr = args.lr * vars(args).pop("min_lr_ratio")
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject out-of-range values and bad flag combinations before any model loads."""
    from utils.data_sources import is_hub_id
    from utils.model_setup import check_model_flag

    check_flag_ranges(args)
    check_model_flag(args.model)
    if args.epochs == -1 and args.max_steps < 1:
        raise SystemExit("--max-steps must be >= 1 when --epochs is -1")
    if args.resume and not args.run_name:
        raise SystemExit("--resume needs --run-name (the run folder to continue)")
    if args.packing == "bfd" and args.pack_tokens < args.max_seq_len:
        raise SystemExit(f"--pack-tokens {args.pack_tokens} < --max-seq-len {args.max_seq_len}: "
                         "a kept example would not fit a row")
    if args.loss_normalization != "constant" and args.normalize_constant != 1.0:
        raise SystemExit("--normalize-constant only applies with --loss-normalization constant")
    check_lora_flags(args.lora_r, args.lora_alpha, args.lora_dropout, args.merge_on_save)
    for f in ("train_file", "val_file", "prompt_template"):
        if f != "prompt_template" and is_hub_id(getattr(args, f)):
            continue  # loaded (or refused, offline) through `datasets` before the model
        if not Path(getattr(args, f)).exists():
            download = " (download it: python play-scripts/data-scripts/download_data.py)"
            hint = download if "sft-reason" in getattr(args, f) else ""
            raise SystemExit(f"--{f.replace('_', '-')} {getattr(args, f)}: file not found{hint}")


def plan_memory_or_stop(args: argparse.Namespace, device: str) -> None:
    """The per-GPU memory plan of these flags, printed before loading on CUDA (and with --plan-only anywhere);
    stops a run that cannot fit. vLLM's share counts when it is colocated on the policy's GPU, and not during
    training steps when it sleeps."""
    from utils.memory_plan import TrainSetup, check_memory_plan, device_memory_bytes
    from utils.reason_validation import gpu_index, resolve_vllm_sleep
    from utils.training import resolve_precision

    plan_device = device if device.startswith("cuda") else "cuda"  # --plan-only on a CPU box plans for a GPU
    colocated = args.engine != "hf" and args.eval_every > 0 and gpu_index(args.vllm_device) == gpu_index(plan_device)
    bfd = args.packing == "bfd"
    setup = TrainSetup(precision=resolve_precision(args.precision, plan_device), world_size=1,
                       micro_batch_size=1 if bfd else args.micro_batch_size,
                       seq_len=args.pack_tokens if bfd else args.max_seq_len,
                       gradient_checkpointing=args.gradient_checkpointing, chunk_size=args.chunk_size,
                       lora_r=args.lora_r,
                       vllm_share=args.gpu_memory_utilization if colocated else 0.0,
                       vllm_sleeps=resolve_vllm_sleep(args.vllm_sleep, args.engine, plan_device, args.vllm_device)[0])
    check_memory_plan(args.model, setup, device_memory_bytes(args.gpu_memory_gib, device), args.plan_only)


def main(args: argparse.Namespace) -> dict:
    """Check the flags, claim the run folder (utils.run_dir: one run per folder, locked while it trains), train."""
    from utils.helper_fns import pick_device
    from utils.run_dir import check_run_name, claimed_run

    device = pick_device(args.device)
    if args.plan_only:  # before the data checks: a plan needs only the model's config.json
        plan_memory_or_stop(args, device)
    check_args(args)
    plan_memory_or_stop(args, device)  # a run that cannot fit stops before it claims a folder
    run_name = check_run_name(args.run_name) if args.run_name else \
        f"reason_{Path(args.model).name}_{args.num_examples}ex_{time.strftime('%Y%m%d_%H%M%S')}"
    with claimed_run(args.output_dir, run_name, vars(args), args.resume, args.overwrite,
                     args.allow_config_change) as run_dir:  # fmt: skip
        return train(args, run_dir)


def train(args: argparse.Namespace, run_dir: Path) -> dict:
    """The run itself, in a folder `main` has claimed."""
    from utils.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
    from utils.data_order import ExampleStream
    from utils.dataloader import drop_overlong, format_prompts, load_reason_records, make_micro_batches, select_examples
    from utils.helper_fns import data_errors_exit, load_prompt, pick_device, seed_everything
    from utils.inference import SamplingConfig
    from utils.metrics_logger import MetricsLogger, format_step_line
    from utils.model_setup import compile_decoder_layers, load_policy
    from utils.packing import make_packed_micro_batches
    from utils.progress import TrainProgress
    from utils.reason_validation import ReasonValidator, resolve_vllm_sleep
    from utils.run_dir import record_config
    from utils.serving import resolve_save_dtype, set_training_chat_template
    from utils.training import (MFU_FORMULA, NonFiniteLossError, attention_width, build_optimizer, gpu_step_metrics,
                                lr_at_step, matmul_parameters, model_dtype_for, resolve_precision, step_flop_counts,
                                train_step, training_flops)

    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    check_speed_flags(device, args.attention, args.chunk_size, args.fused_lm_head, args.liger)
    vllm_sleep, sleep_why = resolve_vllm_sleep(args.vllm_sleep, args.engine, device, args.vllm_device)
    if args.eval_every > 0:
        print(f"vLLM sleep between evaluations: {'on' if vllm_sleep else 'off'} ({sleep_why})")
    run_name = run_dir.name
    ckpt_dir = run_dir / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if args.resume else None
    if args.resume and resume_from is None:
        raise SystemExit(f"--resume: no complete checkpoint under {ckpt_dir}")
    seed_everything(args.seed)

    # ---- data
    template = load_prompt(args.prompt_template)
    with data_errors_exit():
        train_records = select_examples(load_reason_records(args.train_file, split=args.train_split,
                                                            config=args.data_config), args.num_examples, args.seed)
        val_records = load_reason_records(args.val_file, require_response=False, split=args.val_split,
                                          config=args.data_config)
    prompts, responses = format_prompts(train_records, template), [r["response"] for r in train_records]

    # ---- model
    model, tokenizer, model_path = load_policy(args.model, run_dir, "qwen2", prompts + responses,
                                               model_dtype_for(precision), device, args.seed,
                                               args.gradient_checkpointing, attention=args.attention,
                                               liger=args.liger)
    # the checkpoints' chat template renders one question into the training prompt (no BOS: training adds none)
    set_training_chat_template(tokenizer, template, "{question}", with_bos=False, with_eos=False)
    save_dtype = resolve_save_dtype(args.save_dtype, model_path)
    print(f"checkpoints: weights saved in {save_dtype} (--save-dtype {args.save_dtype}); chat template = "
          f"{args.prompt_template}")
    if args.lora_r > 0:
        from utils.lora import apply_lora

        model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                           args.gradient_checkpointing)
    kept, lengths = drop_overlong(prompts, responses, tokenizer, args.max_seq_len)
    n_dropped = len(prompts) - len(kept)
    prompts, responses = [prompts[i] for i in kept], [responses[i] for i in kept]
    batch = args.micro_batch_size * args.gradient_accumulation_steps
    steps = math.ceil(args.epochs * len(prompts) / batch) if args.epochs > 0 else args.max_steps
    print(f"data: {len(prompts)} training examples "
          f"({n_dropped} dropped: longer than --max-seq-len {args.max_seq_len}), "
          f"mean {sum(lengths) / max(1, len(lengths)):.0f} tokens; {len(val_records)} val records")
    print(f"examples/step = {args.micro_batch_size} x {args.gradient_accumulation_steps} = {batch}; {steps} steps "
          f"= {steps * batch / max(1, len(prompts)):.2f} epochs; precision {precision} on {device}")

    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    # MFU inputs (utils.training.MFU_FORMULA), read before any FSDP sharding or compile wrapping hides them
    n_matmul, n_layers = matmul_parameters(model), model.config.num_hidden_layers
    n_trainable_matmul = matmul_parameters(model, trainable_only=True)  # < n_matmul under LoRA
    attn_width, policy_device = attention_width(model.config), next(model.parameters()).device
    if device.startswith("cuda"):
        print(f"{MFU_FORMULA}; peak {args.peak_tflops:g} TFLOP/s (--peak-tflops)")
    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, model, optimizer)["step"]
        print(f"resumed from {resume_from} at step {start_step}")
    config = dict(vars(args), run_dir=str(run_dir), resolved_model=str(model_path), device=device,
                  resolved_precision=precision, total_steps=steps, train_examples=len(prompts),
                  dropped_overlong=n_dropped, resolved_save_dtype=save_dtype, resolved_vllm_sleep=vllm_sleep)
    record_config(run_dir, config, resume=resume_from is not None, allowed_changes=args.allow_config_change)
    logger = MetricsLogger(run_dir, config, args.wandb_project, run_name, resume=resume_from is not None,
                           wandb_entity=args.wandb_entity, wandb_tags=wandb_tags(args.wandb_tags))
    if resume_from is not None:
        logger.truncate_after(start_step)
    if args.compile:
        print(f"compile: {compile_decoder_layers(model)} decoder layers (torch.compile, first steps are slow)")

    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              stop=[args.stop], include_stop_str_in_output=True, n=1, seed=args.seed)
    validator = ReasonValidator(model, tokenizer, val_records, template, run_dir, device, precision, sampling,
                                val_size=args.val_size, val_seed=args.val_seed,
                                num_samples_logged=args.num_samples_logged, grader_workers=args.grader_workers,
                                micro_batch_size=args.micro_batch_size, chunk_size=args.chunk_size, engine=args.engine,
                                engine_seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization,
                                max_model_len=args.max_seq_len + args.max_tokens, vllm_device=args.vllm_device,
                                vllm_sleep=vllm_sleep)
    if start_step == 0 and args.eval_every > 0:
        validator.run(0, logger)

    stream = ExampleStream(len(prompts), args.seed)
    warmup = int(args.warmup_ratio * steps)
    last_good = resume_from
    progress = TrainProgress(steps, start_step, batch * sum(lengths) / max(1, len(lengths)))
    try:
        for step in range(start_step + 1, steps + 1):
            idx = stream.indices((step - 1) * batch, batch)
            if args.packing == "bfd":
                micro = make_packed_micro_batches(prompts, responses, idx, tokenizer, args.pack_tokens,
                                                  args.loss_normalization, args.normalize_constant, args.attention)
            else:
                micro = make_micro_batches(prompts, responses, idx, args.micro_batch_size, tokenizer)
            lr = lr_at_step(step - 1, args.lr, args.lr_schedule, steps, warmup, args.min_lr)
            try:
                stats = train_step(model, optimizer, micro, lr, args.loss_normalization, args.normalize_constant,
                                   args.grad_clip, precision, args.chunk_size,
                                   fused_lm_head=args.fused_lm_head)
            except NonFiniteLossError as e:
                raise SystemExit(f"step {step}: {e}; stopping. "
                                 f"Last good checkpoint: {last_good or 'none (no checkpoint saved yet)'}")
            metrics = {f"train/{k}": v for k, v in stats.items()}
            if device.startswith("cuda"):
                tokens, pairs = step_flop_counts(micro)
                flops = training_flops(n_matmul, n_layers, attn_width, tokens, pairs, n_trainable_matmul)
                metrics.update(gpu_step_metrics(flops, stats["step_time_s"], args.peak_tflops, policy_device))
            progress.write(format_step_line(step, metrics))
            progress.update(stats["tokens"])
            logger.log(metrics, step)
            if args.eval_every > 0 and (step % args.eval_every == 0 or step == steps):
                validator.run(step, logger)
            if step == steps or (args.save_every > 0 and step % args.save_every == 0):
                last_good = save_checkpoint(ckpt_dir, step, model, tokenizer, optimizer, {"step": step}, args.keep_last,
                                            save_dtype=save_dtype)
                if args.merge_on_save:
                    from utils.lora import save_merged_model

                    print(f"merged model: {save_merged_model(model, tokenizer, last_good / 'merged')}")
    finally:
        progress.close()
        validator.close()
        logger.close()
    validator.print_table()
    return {"run_dir": str(run_dir), "history": validator.history, "final_step": steps}


if __name__ == "__main__":  # vLLM's workers re-import this module; the guard keeps them from re-running main
    main(parse_args())
