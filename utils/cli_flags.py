"""Command-line flags the scripts share, and nothing else: only scripts import this module.

Run and speed flags (both train scripts), engine flags (both evaluation scripts), `--preset` defaults, and deprecated
spellings of renamed flags kept working as hidden aliases.
"""

from __future__ import annotations

import argparse
import sys


def add_run_flags(group) -> None:
    """Flags both train scripts share: device, run folder, checkpoints, resume, wandb."""
    group.add_argument("--device", default="auto", help="auto = cuda if available else cpu")
    group.add_argument("--output-dir", default="results", help="runs go to <output-dir>/<run-name>")
    group.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    group.add_argument("--keep-last", type=int, default=2, help="newest checkpoints kept (0 = all)")
    group.add_argument("--resume", action="store_true",
                       help="continue <output-dir>/<run-name> from its latest checkpoint")
    group.add_argument("--overwrite", action="store_true",
                       help="the run folder holds another run: move it aside (renamed, never deleted)")
    group.add_argument("--allow-config-change", type=lambda s: [k.strip().replace("-", "_") for k in s.split(",")],
                       default=[], metavar="KEY[,KEY]",
                       help="--resume: settings allowed to differ from the run's config.json (recorded)")
    group.add_argument("--wandb-project", default="", help="mirror metrics to this wandb project (empty = local only)")
    group.add_argument("--peak-tflops", type=float, default=989.0,
                       help="accelerator bf16 dense peak for MFU on CUDA (H100/H200 SXM: 989)")


def add_speed_flags(group) -> None:
    """Flags both train scripts share that change speed and memory, not the objective.

    --attention: attention inside the documents of packed rows; varlen = a flash varlen kernel on CUDA (one SDPA call
    per document elsewhere), sdpa = a block-diagonal (T, T) mask, flex = FlexAttention (CUDA only).
    --fused-lm-head (with --chunk-size): the lm-head gradients are computed in the forward pass, 3 matmuls a chunk
    instead of 4, the same loss.
    """
    from utils.doc_attention import ATTENTION_BACKENDS

    group.add_argument("--attention", choices=ATTENTION_BACKENDS, default="varlen",
                       help="attention inside documents of packed rows (flex: CUDA only; see the trainer's --help)")
    group.add_argument("--chunk-size", type=int, default=0,
                       help="tokens per chunk for the lm-head log-softmax (0 = plain; >0 avoids B x T x V fp32 logits)")
    group.add_argument("--fused-lm-head", action="store_true",
                       help="with --chunk-size: lm-head gradients computed in the forward pass (same loss, less work)")
    group.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument("--liger", action="store_true",
                       help="Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA; pip install liger-kernel)")


def check_speed_flags(device: str, attention: str, chunk_size: int, fused_lm_head: bool, liger: bool) -> None:
    """Refuse --attention flex and --liger off CUDA (neither has a CPU training path) and --fused-lm-head without
    --chunk-size, before any model loads. The arguments are the resolved device and the flags' values."""
    if fused_lm_head and chunk_size <= 0:
        raise SystemExit("--fused-lm-head works chunk by chunk: set --chunk-size (e.g. 4096)")
    if not device.startswith("cuda"):
        if attention == "flex":
            raise SystemExit(f"--attention flex needs CUDA (PyTorch has no FlexAttention backward on CPU); device is "
                             f"{device}: use --attention varlen")
        if liger:
            raise SystemExit(f"--liger needs CUDA (Liger's kernels are Triton); device is {device}")


def add_engine_flags(group) -> None:
    """The engine flags both evaluation scripts take; their values go to `make_engine` unchanged."""
    group.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto",
                       help="auto = vLLM when importable, else HF transformers")
    group.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="auto = the checkpoint's dtype, but bfloat16 for a float32 checkpoint on CUDA")
    group.add_argument("--device", default=None, help="cuda:N to pick a GPU (default: cuda:0 if available, else cpu)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM's share of GPU memory (0-1)")
    group.add_argument("--max-model-len", type=int, default=-1,
                       help="prompt + generation tokens (-1 = the model's context length)")
    group.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded concurrently (HF: batch size)")
    group.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                       help="vLLM without CUDA graphs / compile warm-up (faster start, slower decode)")
    group.add_argument("--tensor-parallel-size", type=int, default=1,
                       help="vLLM: GPUs one model is split over (CUDA; e.g. 2 for a model one GPU cannot hold)")
    group.add_argument("--data-parallel-size", type=int, default=1,
                       help="vLLM data parallel: only 1 in one process (see the error for what to do instead)")


def check_engine_flags(device: str | None, tensor_parallel_size: int, data_parallel_size: int) -> None:
    """Refuse parallel settings the in-process engine cannot run, before any model loads.

    `vllm.LLM` raises for data_parallel_size > 1 outside TPU / external launchers ("not supported for single-process
    usage and may hang", vllm/entrypoints/llm.py), so it is refused here with the alternative. Tensor parallel needs
    CUDA and spans GPUs 0..N-1 of the visible ones, which a single `--device cuda:N` cannot express.
    """
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise SystemExit("--tensor-parallel-size and --data-parallel-size must be >= 1")
    if data_parallel_size > 1:
        raise SystemExit(f"--data-parallel-size {data_parallel_size}: vllm.LLM cannot run data parallel inside one "
                         "process. Run one evaluation per GPU instead, each in its own process, e.g. "
                         "CUDA_VISIBLE_DEVICES=0 python <script> ... & CUDA_VISIBLE_DEVICES=1 python <script> ... "
                         "(different checkpoints, benchmarks or --data files), or split one model over GPUs with "
                         "--tensor-parallel-size")  # fmt: skip
    if tensor_parallel_size > 1:
        import torch

        if not torch.cuda.is_available() or (device is not None and not str(device).startswith("cuda")):
            raise SystemExit(f"--tensor-parallel-size {tensor_parallel_size} needs CUDA GPUs")
        if device is not None and str(device).startswith("cuda:"):
            raise SystemExit(f"--tensor-parallel-size {tensor_parallel_size} with --device {device}: tensor parallel "
                             "uses the first N visible GPUs; choose them with CUDA_VISIBLE_DEVICES instead of --device")
        if tensor_parallel_size > torch.cuda.device_count():
            raise SystemExit(f"--tensor-parallel-size {tensor_parallel_size}: only {torch.cuda.device_count()} GPUs "
                             "are visible")


def parse_with_presets(parser, presets: dict[str, dict], argv: list[str] | None):
    """Parse `argv`; a `--preset NAME` first replaces the defaults with the preset's, so explicit flags still win."""
    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "preset", None):
        parser.set_defaults(**presets[pre.preset])
    return parser.parse_args(argv)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a renamed flag: hidden from --help, stores into `dest`, says the new name once per parser."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.new_flag, self.warned = new_flag, False

    def __call__(self, parser, namespace, values, option_string=None):
        if not self.warned:  # parse_with_presets parses twice; one line is enough
            print(f"{option_string} is deprecated: use {self.new_flag}", file=sys.stderr)
            self.warned = True
        setattr(namespace, self.dest, values)


def add_deprecated_alias(group, old: str, new: str, dest: str | None = None, **kwargs) -> None:
    """Keep `old` working as a hidden spelling of `new`: it parses like `new` (pass the same `type`/`nargs`) into the
    same `dest` (default: `new`'s), and using it prints `<old> is deprecated: use <new>` on stderr."""
    dest = dest or new.lstrip("-").replace("-", "_")
    group.add_argument(old, dest=dest, action=_DeprecatedAlias, new_flag=new, **kwargs)


def add_gpu_node_flags(group, colocated_vllm: bool) -> None:
    """Flags both train scripts share for runs on a real GPU node: the served checkpoint's dtype, the memory plan,
    wandb placement and (`colocated_vllm`: the reasoning trainer) vLLM sleep between in-loop evaluations."""
    group.add_argument("--save-dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                       help="dtype of the served weights (auto = the base model's; resume state stays full precision)")
    group.add_argument("--plan-only", action="store_true",
                       help="print the per-GPU memory plan and exit: 0 = fits, 3 = does not (reads config.json only)")
    group.add_argument("--gpu-memory-gib", type=float, default=0,
                       help="plan for a GPU of N GiB (0 = the visible GPU's memory; H100 80, H200 141)")
    group.add_argument("--wandb-entity", default="", help="wandb team or user of the mirrored run (empty = default)")
    group.add_argument("--wandb-tags", default="", help="comma-separated wandb tags, e.g. 'sft,qwen1.5b'")
    if colocated_vllm:
        group.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction, default=None,
                           help="sleep vLLM between evals, freeing its memory (default: on when it shares the GPU)")


def wandb_tags(text: str) -> list[str]:
    """`--wandb-tags "a, b"` -> ["a", "b"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def add_data_source_flags(group, splits: dict[str, tuple[str, str]]) -> None:
    """Split flags (`{"--train-split": ("train", "help")}`) and `--data-config` for data flags that take a hub
    dataset id as well as a local file (`utils.data_sources`)."""
    for flag, (default, help_text) in splits.items():
        group.add_argument(flag, default=default, help=help_text)
    group.add_argument("--data-config", default=None,
                       help="configuration name of hub datasets (default: the dataset's default; local files: unused)")


def add_lora_flags(parser) -> None:
    """The `lora` argument group both train scripts take (`utils.lora`): rank 0 = full fine-tuning."""
    from utils.lora import DEFAULT_TARGET_MODULES

    g = parser.add_argument_group("lora")
    g.add_argument("--lora-r", type=int, default=0,
                   help="LoRA rank: train adapters of this rank on a frozen base (0 = full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale numerator: updates scaled by alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input (0-1)")
    g.add_argument("--lora-target-modules", nargs="+", default=list(DEFAULT_TARGET_MODULES), metavar="NAME",
                   help="linear layers that get adapters (default: the attention and MLP projections)")
    g.add_argument("--merge-on-save", action="store_true",
                   help="with --lora-r: each checkpoint also gets merged/, the full merged model vLLM and HF load")


def check_lora_flags(lora_r: int, lora_alpha: float, lora_dropout: float, merge_on_save: bool,
                     world_size: int = 1) -> None:
    """Refuse bad LoRA flag values and combinations before any model loads (`world_size` > 1: torchrun's FSDP)."""
    if lora_r < 0:
        raise SystemExit(f"--lora-r {lora_r}: must be >= 0 (0 = full fine-tuning)")
    if merge_on_save and lora_r == 0:
        raise SystemExit("--merge-on-save needs --lora-r > 0 (a full fine-tune's checkpoints are already full models)")
    if lora_r == 0:
        return
    if lora_alpha <= 0 or not 0 <= lora_dropout < 1:
        raise SystemExit(f"--lora-alpha {lora_alpha} must be > 0 and --lora-dropout {lora_dropout} in [0, 1)")
    if world_size > 1:
        # FSDP2 would shard the frozen base and the adapters alike, and the checkpoint code consolidates full model
        # state dicts: neither is wired for PEFT here, so refuse rather than save a wrong checkpoint.
        raise SystemExit(f"--lora-r {lora_r} with {world_size} ranks (torchrun): LoRA runs on one process only; "
                         "run without torchrun (the frozen base needs no optimizer state, so one GPU often fits)")


# ------------------------------------------------------------------------------------------------ numeric flag ranges
def _at_least(low):
    return (lambda v: v >= low), f"must be >= {low}"


def _at_least_or_minus_one(low, meaning):
    return (lambda v: v >= low or v == -1), f"must be >= {low}, or -1 ({meaning})"


# dest -> (valid?, what a valid value is). Each script checks the flags it has, before any model loads: a value out of
# range fails at once with the flag's name instead of silently doing nothing (an eval every 0 steps) or crashing later.
FLAG_RANGES = {
    "micro_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1),
    "max_seq_len": _at_least(2),
    "pack_tokens": _at_least(2),
    "lr": ((lambda v: v > 0), "must be > 0"),
    "min_lr": _at_least(0),
    "warmup_ratio": ((lambda v: 0 <= v < 1), "must be in [0, 1) (a fraction of the steps)"),
    "weight_decay": _at_least(0),
    "grad_clip": ((lambda v: v >= 0), "must be >= 0 (0 = no clipping)"),
    "epochs": ((lambda v: v > 0 or v == -1), "must be > 0, or -1 (train --max-steps steps)"),
    "max_steps": _at_least_or_minus_one(1, "use --epochs"),
    "normalize_constant": ((lambda v: v > 0), "must be > 0"),
    "num_examples": _at_least_or_minus_one(1, "all"),
    "eval_every": _at_least_or_minus_one(1, "never"),
    "save_every": _at_least_or_minus_one(1, "only at the end"),
    "keep_last": ((lambda v: v >= 0), "must be >= 0 (0 = keep all)"),
    "val_size": _at_least_or_minus_one(1, "all"),
    "eval_max_rows": _at_least_or_minus_one(1, "all"),
    "num_samples_logged": _at_least(0),
    "max_examples": _at_least_or_minus_one(1, "all"),
    "temperature": ((lambda v: v >= 0), "must be >= 0 (0 = greedy)"),
    "top_p": ((lambda v: 0 < v <= 1), "must be in (0, 1]"),
    "max_tokens": _at_least(1),
    "n_samples": _at_least(1),
    "gpu_memory_utilization": ((lambda v: 0 < v <= 1), "must be in (0, 1] (a share of the GPU's memory)"),
    "max_model_len": _at_least_or_minus_one(1, "the model's context length"),
    "max_num_seqs": _at_least(1),
    "grader_workers": _at_least(1),
    "grader_timeout_s": ((lambda v: v > 0), "must be > 0"),
    "chunk_size": _at_least(0),
    "peak_tflops": ((lambda v: v > 0), "must be > 0"),
}


def check_flag_ranges(args, ranges: dict = FLAG_RANGES) -> None:
    """SystemExit naming the first flag of `args` whose value is outside its range in `ranges` (None = unset)."""
    for dest, (valid, what) in ranges.items():
        value = getattr(args, dest, None)
        if value is not None and not valid(value):
            raise SystemExit(f"--{dest.replace('_', '-')} {value}: {what}")
