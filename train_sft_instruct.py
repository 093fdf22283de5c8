"""Instruction SFT: full fine-tune on packed Alpaca-template documents, optionally with prompt masking, on one GPU or
many (FSDP2 through torchrun).

Reference run (Llama-3.1-8B base, ~200k examples, 512-token rows, 32 rows/step, 1 epoch ~6,700 steps):
    torchrun --nproc_per_node 8 train_sft_instruct.py --micro-batch-size 4 --gradient-accumulation-steps 1 \\
        --run-name llama8b-sft [--mask-prompt] [--packing doc]
CPU demo / smoke run (tiny Llama from scratch on the bundled sample):
    python train_sft_instruct.py --preset demo

Rows per optimizer step = micro-batch x accumulation x ranks. The loss is the mean over every counted token of the
step (all ranks), the reference's per-token cross-entropy, invariant to how a step is split. Eval loss is on the
reference test split (teacher-forced), never on the model's own samples.

Flags in more detail:
  --packing doc   attention and positions restart at each document of a row (concat, the reference, lets a
                  document attend to the ones before it in the row).
  --precision     bf16 = pure bf16 weights (AdamW updates below bf16 resolution round away).
  --max-seq-len   replaces --seq-length, --prompt-template replaces --template (both still accepted).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

from utils.cli_flags import (add_data_source_flags, add_deprecated_alias, add_gpu_node_flags, add_lora_flags,
                             add_run_flags, add_speed_flags, check_flag_ranges, check_lora_flags, check_speed_flags,
                             parse_with_presets, wandb_tags)

PRESETS = {
    "demo": dict(
        model="tiny",
        train_file="data/sft-instruct/sample_train.jsonl",
        test_file="data/sft-instruct/sample_test.jsonl",
        max_seq_len=128,
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        lr=3e-3,
        min_lr=3e-4,
        epochs=-1,
        max_steps=60,
        eval_every=20,
        run_name="instruct_demo",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of defaults; flags still override")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="meta-llama/Llama-3.1-8B",
                   help="HF hub id or folder; 'tiny' = a tiny Llama + BPE built from the training texts")
    g.add_argument("--train-file", default="data/sft-instruct/train.jsonl",
                   help="{prompt, response} or chat {messages} records: JSONL (.gz ok), Parquet or a hub id")
    g.add_argument("--test-file", default="data/sft-instruct/test.jsonl",
                   help="held-out split for the eval loss (file or hub dataset id)")
    add_data_source_flags(g, {"--train-split": ("train", "split of a hub --train-file"),
                              "--test-split": ("test", "split of a hub --test-file")})
    g.add_argument("--prompt-template", default="data/alpaca_sft.prompt",
                   help="document template with {instruction} and {response}")
    add_deprecated_alias(g, "--template", "--prompt-template")
    g.add_argument("--max-seq-len", type=int, default=512,
                   help="tokens per packed row (every row has exactly this many)")
    add_deprecated_alias(g, "--seq-length", "--max-seq-len", type=int)
    g.add_argument("--mask-prompt", action="store_true",
                   help="loss on responses only (chat: assistant turns); rows without one are dropped")
    g.add_argument("--packing", choices=["concat", "doc"], default="concat",
                   help="concat = causal attention over the whole row (the reference); doc = per document (see above)")
    g.add_argument("--cache-dir", default="", help="tokenization cache folder ('' = next to the data file)")
    g = p.add_argument_group("optimization")
    g.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward/backward per rank")
    g.add_argument("--gradient-accumulation-steps", type=int, default=8,
                   help="micro-batches per optimizer step per rank")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=2e-6, help="final learning rate of cosine and linear (absolute)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup")
    g.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="cosine",
                   help="after warmup: flat, or decay to --min-lr at the last step")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (0 = none)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = no clipping)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the packed rows (-1 = use --max-steps)")
    g.add_argument("--max-steps", type=int, default=-1, help="optimizer steps when --epochs is -1")
    g.add_argument("--precision", choices=["auto", "fp32", "mixed", "bf16"], default="auto",
                   help="auto = mixed on CUDA, fp32 on CPU; mixed = fp32 master weights + bf16 compute (see above)")
    add_speed_flags(g)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=200,
                   help="steps between test-loss evals (also at step 0 and the end; -1 = never)")
    g.add_argument("--eval-max-rows", type=int, default=512, help="test rows per eval (-1 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of row order and model init (tiny)")
    g.add_argument("--run-name", default="", help="default: instruct_<model>_<mask|nomask>_<timestamp>")
    add_run_flags(g)
    add_gpu_node_flags(p.add_argument_group("GPU node: saved dtype, memory plan, wandb"), colocated_vllm=False)
    add_lora_flags(p)
    return parse_with_presets(p, PRESETS, argv)


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
    template = Path(args.prompt_template)
    placeholders = ("{instruction}", "{response}")
    if template.is_file() and not all(k in template.read_text(encoding="utf-8") for k in placeholders):
        raise SystemExit(f"--prompt-template {template}: needs both {{instruction}} and {{response}} placeholders")
    check_lora_flags(args.lora_r, args.lora_alpha, args.lora_dropout, args.merge_on_save,
                     int(os.environ.get("WORLD_SIZE", "1")))
    for flag in ("train_file", "test_file", "prompt_template"):
        if flag != "prompt_template" and is_hub_id(getattr(args, flag)):
            continue  # loaded (or refused, offline) through `datasets` before the model
        if not Path(getattr(args, flag)).exists():
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: file not found "
                             "(download: python play-scripts/data-scripts/download_data.py --only sft-instruct)")


def plan_memory_or_stop(args: argparse.Namespace, device: str, world_size: int, verbose: bool = True) -> None:
    """The per-GPU memory plan of these flags on `world_size` FSDP ranks, printed before loading on CUDA (and with
    --plan-only anywhere: `WORLD_SIZE=8 python train_sft_instruct.py --plan-only ...` plans an 8-GPU run); stops a
    run that cannot fit."""
    from utils.memory_plan import TrainSetup, check_memory_plan, device_memory_bytes
    from utils.training import resolve_precision

    plan_device = device if device.startswith("cuda") else "cuda"  # --plan-only on a CPU box plans for a GPU
    setup = TrainSetup(precision=resolve_precision(args.precision, plan_device), world_size=world_size,
                       micro_batch_size=args.micro_batch_size, seq_len=args.max_seq_len,
                       gradient_checkpointing=args.gradient_checkpointing, chunk_size=args.chunk_size,
                       lora_r=args.lora_r)
    check_memory_plan(args.model, setup, device_memory_bytes(args.gpu_memory_gib, device), args.plan_only, verbose)


def main(args: argparse.Namespace) -> dict:
    """Check the flags, claim the run folder (utils.run_dir: one run per folder, locked while it trains; under
    torchrun rank 0 claims it for all ranks), train."""
    from utils.helper_fns import pick_device
    from utils.run_dir import check_run_name, claimed_run

    if args.plan_only:  # before the data checks and before joining a process group: only config.json is read
        plan_memory_or_stop(args, pick_device(args.device), int(os.environ.get("WORLD_SIZE", "1")),
                            verbose=os.environ.get("RANK", "0") == "0")  # under torchrun: one rank prints
    check_args(args)
    mask = "mask" if args.mask_prompt else "nomask"
    run_name = check_run_name(args.run_name) if args.run_name else \
        f"instruct_{Path(args.model).name}_{mask}_{time.strftime('%Y%m%d_%H%M%S')}"
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 claims the folder; train() waits for it at a barrier
        return train(args, Path(args.output_dir) / run_name)
    with claimed_run(args.output_dir, run_name, vars(args), args.resume, args.overwrite,
                     args.allow_config_change) as run_dir:  # fmt: skip
        return train(args, run_dir)


def train(args: argparse.Namespace, run_dir: Path) -> dict:
    """The run itself, in a folder `main` has claimed."""
    import torch

    from utils import distributed as D
    from utils.checkpoints import checkpoint_name, latest_checkpoint, load_checkpoint, save_checkpoint
    from utils.data_order import ExampleStream
    from utils.helper_fns import data_errors_exit, load_prompt, pick_device, seed_everything
    from utils.instruct_dataset import PackedSFTDataset, validated_records
    from utils.metrics_logger import MetricsLogger, format_step_line
    from utils.model_setup import apply_liger_kernels, compile_decoder_layers, load_policy
    from utils.packing import rows_to_batch
    from utils.progress import TrainProgress
    from utils.run_dir import record_config
    from utils.serving import adds_bos, resolve_save_dtype, set_training_chat_template
    from utils.training import (MFU_FORMULA, NonFiniteLossError, attention_width, build_optimizer, evaluate_loss,
                                gpu_step_metrics, lr_at_step, matmul_parameters, model_dtype_for, resolve_precision,
                                step_flop_counts, train_step, training_flops)

    info = D.init_distributed(pick_device(args.device))
    device = info.device
    precision = resolve_precision(args.precision, device)
    check_speed_flags(device, args.attention, args.chunk_size, args.fused_lm_head, args.liger)
    plan_memory_or_stop(args, device, info.world_size, verbose=info.is_main)
    run_name = run_dir.name
    D.barrier(info)  # rank 0 has claimed the run folder

    def prepare_for_sharding(meta_model):
        """What `load_policy` does to a loaded model, done to the meta one before FSDP wraps it (Liger: after)."""
        from utils.doc_attention import set_attention_backend

        set_attention_backend(meta_model, args.attention, device)
        if args.gradient_checkpointing:
            meta_model.gradient_checkpointing_enable()
            meta_model.config.use_cache = False
        if args.compile:  # before sharding, as torchtitan does
            say(f"compile: {compile_decoder_layers(meta_model)} decoder layers (torch.compile, first steps are slow)")

    ckpt_dir = run_dir / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if args.resume else None
    if args.resume and resume_from is None:
        raise SystemExit(f"--resume: no complete checkpoint under {ckpt_dir}")
    seed_everything(args.seed)
    say = print if info.is_main else (lambda *a, **k: None)

    # ---- model and data (rank 0 builds a tiny model first so other ranks load the same one)
    # the tiny model's tokenizer is trained on the texts; records are validated first, as for a real model
    texts = []
    if args.model == "tiny":
        from utils.data_sources import load_records

        with data_errors_exit():
            records = validated_records(load_records(args.train_file, args.train_split, args.data_config),
                                        args.train_file)
        for _, r in records:
            parts = [m["content"] for m in r["messages"]] if "messages" in r else [r["prompt"], r["response"]]
            texts.append("\n".join(parts))
    if info.is_main:
        load_policy(args.model, run_dir, "llama", texts, torch.float32, "cpu", args.seed, build_model=False)
    D.barrier(info)
    # Under FSDP only rank 0 reads the weights; every rank builds the model on the meta device and receives its shards
    model, tokenizer, model_path = load_policy(args.model, run_dir, "llama", texts, model_dtype_for(precision), device,
                                               args.seed, args.gradient_checkpointing, attention=args.attention,
                                               liger=args.liger, build_model=not info.enabled)
    if info.enabled:
        model = D.build_sharded_from_rank0(model_path, model_dtype_for(precision), info, precision,
                                           prepare=prepare_for_sharding)
        if args.liger:
            apply_liger_kernels(model)
    if args.lora_r > 0:
        from utils.lora import apply_lora

        model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules,
                           args.gradient_checkpointing)
    template = load_prompt(args.prompt_template)
    ds_kwargs = dict(seq_length=args.max_seq_len, mask_prompt=args.mask_prompt, seed=args.seed, template=template,
                     cache_dir=args.cache_dir or None, config=args.data_config)
    # Rank 0 tokenizes (and caches) first; the other ranks then read its cache instead of repeating the work.
    for turn in ((True, False) if info.enabled else (True,)):
        if info.is_main == turn:
            with data_errors_exit():
                train_ds = PackedSFTDataset(tokenizer, args.train_file, shuffle=True, split=args.train_split,
                                            **ds_kwargs)
                test_ds = PackedSFTDataset(tokenizer, args.test_file, shuffle=False, split=args.test_split, **ds_kwargs)
        D.barrier(info)
    # The checkpoints' chat template is the format trained on, set once the data is rendered (chat records use the
    # tokenizer's own template when it has one): chat data under the tokenizer's template keeps it; otherwise the
    # Alpaca template renders one instruction into the training prompt, BOS included when training's tokenization
    # adds it (Llama-3), and an assistant turn ends in EOS as documents do.
    if not (train_ds.chat_documents and train_ds.chat_template):
        set_training_chat_template(tokenizer, template, "{instruction}", with_bos=adds_bos(tokenizer), with_eos=True)
    save_dtype = resolve_save_dtype(args.save_dtype, model_path)
    kept = "the tokenizer's" if train_ds.chat_documents and train_ds.chat_template else "the Alpaca"
    say(f"checkpoints: weights saved in {save_dtype} (--save-dtype {args.save_dtype}), {kept} chat template")
    rows_per_step = args.micro_batch_size * args.gradient_accumulation_steps * info.world_size
    steps = math.ceil(args.epochs * len(train_ds) / rows_per_step) if args.epochs > 0 else args.max_steps
    say(f"train: {train_ds.summary()}\ntest: {test_ds.summary()}")
    say(f"rows/step = {args.micro_batch_size} x {args.gradient_accumulation_steps} x {info.world_size} ranks = "
        f"{rows_per_step} ({rows_per_step * args.max_seq_len} tokens); {steps} steps; packing {args.packing}; "
        f"precision {precision} on {device}")

    # MFU inputs (utils.training.MFU_FORMULA); a sharded model's DTensors report their global sizes
    n_matmul, n_layers = matmul_parameters(model), model.config.num_hidden_layers
    n_trainable_matmul = matmul_parameters(model, trainable_only=True)  # < n_matmul under LoRA
    attn_width, policy_device = attention_width(model.config), torch.device(device)
    if device.startswith("cuda"):
        say(f"{MFU_FORMULA}; peak {args.peak_tflops:g} TFLOP/s (--peak-tflops)")
    if args.compile and not info.enabled:
        say(f"compile: {compile_decoder_layers(model)} decoder layers (torch.compile, first steps are slow)")
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, model, optimizer, info)["step"]
        say(f"resumed from {resume_from} at step {start_step}")
    config = dict(vars(args), run_dir=str(run_dir), resolved_model=str(model_path), device=device,
                  world_size=info.world_size, resolved_precision=precision, total_steps=steps, train_rows=len(train_ds),
                  test_rows=len(test_ds), resolved_save_dtype=save_dtype)
    logger = None
    if info.is_main:
        record_config(run_dir, config, resume=resume_from is not None, allowed_changes=args.allow_config_change)
        logger = MetricsLogger(run_dir, config, args.wandb_project, run_name, resume=resume_from is not None,
                               wandb_entity=args.wandb_entity, wandb_tags=wandb_tags(args.wandb_tags))
    if logger is not None and resume_from is not None:
        logger.truncate_after(start_step)

    def log(metrics, step):
        if logger is not None:
            logger.log(metrics, step)

    def test_batch(rows):
        return rows_to_batch(test_ds, rows, args.packing, args.attention)

    def run_eval(step):
        m = evaluate_loss(model, len(test_ds), test_batch, args.micro_batch_size, info, precision, args.chunk_size,
                          args.eval_max_rows)
        say(f"eval step {step:05d} | test loss {m['eval/test_loss']:.4f} | {int(m['eval/test_tokens'])} tokens",
            flush=True)
        log(m, step)
        return m

    def save(step):
        # Under FSDP: the served weights consolidated on rank 0; the resume state (fp32 model and AdamW moments) in
        # shards that every rank writes, never gathered (torch.distributed.checkpoint), moved into the checkpoint.
        sd = D.full_model_state_dict(model, info)
        staging = ckpt_dir / f".{checkpoint_name(step)}.dcp.tmp" if info.enabled else None
        if staging is not None:
            if info.is_main and staging.exists():
                shutil.rmtree(staging)
            D.barrier(info)
            D.save_sharded_state(model, optimizer, staging)
            D.barrier(info)
        path = None
        if info.is_main:
            path = save_checkpoint(ckpt_dir, step, model, tokenizer, optimizer, {"step": step}, args.keep_last,
                                   state_dict=sd, save_dtype=save_dtype, sharded_state=staging)
            if args.merge_on_save:
                from utils.lora import save_merged_model

                say(f"merged model: {save_merged_model(model, tokenizer, path / 'merged')}")
        D.barrier(info)
        return path

    history = []
    if start_step == 0 and args.eval_every > 0:
        history.append({"step": 0, **run_eval(0)})
    stream = ExampleStream(len(train_ds), args.seed)
    local_rows = args.micro_batch_size * args.gradient_accumulation_steps
    last_good = resume_from
    progress = TrainProgress(steps, start_step, rows_per_step * args.max_seq_len, enabled=info.is_main)
    try:
        for step in range(start_step + 1, steps + 1):
            step_rows = stream.indices((step - 1) * rows_per_step, rows_per_step)
            rows = step_rows[info.rank * local_rows : (info.rank + 1) * local_rows]
            micro = [rows_to_batch(train_ds, rows[i : i + args.micro_batch_size], args.packing, args.attention)
                     for i in range(0, local_rows, args.micro_batch_size)]
            lr = lr_at_step(step - 1, args.lr, args.lr_schedule, steps, int(args.warmup_ratio * steps), args.min_lr)
            try:
                stats = train_step(model, optimizer, micro, lr, "step_tokens", grad_clip=args.grad_clip,
                                   precision=precision, chunk_size=args.chunk_size, dist_info=info,
                                   fused_lm_head=args.fused_lm_head)
            except NonFiniteLossError as e:
                raise SystemExit(f"step {step}: {e}; stopping. Last good checkpoint: {last_good or 'none saved yet'}")
            metrics = {f"train/{k}": v for k, v in stats.items()}
            if device.startswith("cuda"):  # MFU of this rank's GPU: its own tokens over the step time
                tokens, pairs = step_flop_counts(micro)
                flops = training_flops(n_matmul, n_layers, attn_width, tokens, pairs, n_trainable_matmul)
                metrics.update(gpu_step_metrics(flops, stats["step_time_s"], args.peak_tflops, policy_device))
            if info.is_main:
                progress.write(format_step_line(step, metrics))
            progress.update(rows_per_step * args.max_seq_len)  # every row is exactly --max-seq-len tokens
            log(metrics, step)
            if args.eval_every > 0 and (step % args.eval_every == 0 or step == steps):
                history.append({"step": step, **run_eval(step)})
            if step == steps or (args.save_every > 0 and step % args.save_every == 0):
                last_good = save(step)
    finally:
        progress.close()
        if logger is not None:
            logger.close()
        D.cleanup(info)
    return {"run_dir": str(run_dir), "history": history, "final_step": steps}


if __name__ == "__main__":
    main(parse_args())
