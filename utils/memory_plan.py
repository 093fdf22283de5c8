"""Per-GPU memory plan of a training run, from the model's config.json alone (no weights, no tokenizer).

Printed before anything loads so that a run that cannot fit stops in a second with the numbers and the options that
would fit, instead of minutes later with a CUDA out-of-memory error. An estimate, not a measurement: static terms
(weights, gradients, optimizer state) are exact byte counts of the parameter tensors; activations follow a per-layer
count of the tensors a decoder layer saves for backward, which real kernels beat or miss by some tens of percent.

Terms, per GPU (FSDP shards the static ones over the ranks):
- weights: parameters in the training dtype (fp32 master weights for `mixed` and `fp32`, bf16 for `bf16`);
- bf16 weight copies: `mixed` only, the copies autocast makes of each weight, alive until backward has used them;
- gradients: same dtype and size as the weights;
- optimizer: AdamW's two moments in the weights' dtype;
- activations: saved for backward, per token per layer ~(10 x hidden + 4 x intermediate) values in bf16 (fp32 when
  `precision` is fp32); with gradient checkpointing one hidden-size input per layer plus one layer recomputed;
- loss head: the logits and their log-softmax, (tokens or --chunk-size) x vocab in fp32 plus the bf16 logits;
- vLLM: the colocated engine's share, `gpu_memory_utilization` x device memory, while it is awake;
- CUDA context and allocator slack: a fixed 1.5 GiB.

With LoRA (`lora_r` > 0, adapters on all seven projections of every layer, `utils.lora`) the base is frozen: its
weights stay (and autocast's bf16 copies of them), but it has no gradients and no optimizer state; the adapters,
r x (in + out) parameters per adapted matrix, are kept in fp32 (PEFT upcasts them even over a bf16 base) with fp32
gradients and AdamW moments. Activations are unchanged: backward still runs through every frozen layer to reach the
adapters below it. LoRA runs on one process (the trainers refuse it under torchrun).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

GIB = 2**30
CONTEXT_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS workspaces, allocator fragmentation (typical on H100)


def _get(config: dict, *names, default=None):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its memory, read from an HF config.json."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    name: str = ""

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> "ModelShape":
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            shape = cls(
                vocab=int(config["vocab_size"]), hidden=hidden, intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(_get(config, "num_key_value_heads", default=heads)),
                head_dim=int(_get(config, "head_dim", default=hidden // heads)),
                tied=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=bool(_get(config, "attention_bias", default=config.get("model_type") == "qwen2")),
                name=name or str(config.get("_name_or_path") or config.get("model_type") or "model"),
            )  # fmt: skip
        except KeyError as e:
            raise ValueError(f"model config lacks {e.args[0]!r}: not a decoder-only transformer config") from None
        return shape

    def layer_matrices(self) -> list[tuple[int, int]]:
        """(in, out) of every linear map in one decoder layer: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def lora_parameters(self, r: int) -> int:
        """Adapter parameters of rank `r` on every linear map of every layer: r x (in + out) each (A and B)."""
        return self.layers * sum(r * (a + b) for a, b in self.layer_matrices())

    def parameters(self) -> int:
        """All parameters, a tied lm head counted once (as `sum(p.numel() for p in model.parameters())`)."""
        per_layer = sum(a * b for a, b in self.layer_matrices()) + 2 * self.hidden  # + two RMSNorm weights
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        embed = self.vocab * self.hidden
        return self.layers * per_layer + embed + (0 if self.tied else embed) + self.hidden  # + final norm


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What decides the bytes besides the model: precision, parallelism, batch and the colocated vLLM engine."""

    precision: str = "mixed"  # "mixed" (fp32 master + bf16 autocast), "bf16", "fp32"
    world_size: int = 1  # FSDP2 shards weights, gradients and optimizer state over this many GPUs
    micro_batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    chunk_size: int = 0  # lm-head chunk (0 = the whole micro-batch's logits at once)
    vllm_share: float = 0.0  # fraction of device memory a colocated vLLM engine takes while awake
    vllm_sleeps: bool = False  # the engine sleeps (frees its memory) during training steps
    lora_r: int = 0  # LoRA rank (0 = full fine-tuning): frozen base, fp32 adapters on every projection


@dataclasses.dataclass
class MemoryPlan:
    shape: ModelShape
    setup: TrainSetup
    device_bytes: int
    terms: dict[str, int]  # name -> bytes per GPU during a training step
    eval_bytes: int  # during an in-loop evaluation: static terms + the awake vLLM engine

    @property
    def train_bytes(self) -> int:
        return sum(self.terms.values())

    @property
    def peak_bytes(self) -> int:
        return max(self.train_bytes, self.eval_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device_bytes


def plan_memory(shape: ModelShape, setup: TrainSetup, device_bytes: int) -> MemoryPlan:
    """Estimate per-GPU bytes of one training step and of an in-loop evaluation (see the module docstring)."""
    if setup.precision not in ("mixed", "bf16", "fp32"):
        raise ValueError(f"precision {setup.precision!r}: expected mixed, bf16 or fp32")
    if setup.lora_r > 0 and setup.world_size > 1:
        raise ValueError("LoRA runs on one process (the trainers refuse --lora-r under torchrun)")
    weight_bytes = 2 if setup.precision == "bf16" else 4
    act_bytes = 4 if setup.precision == "fp32" else 2
    shard = max(1, setup.world_size)
    params = shape.parameters()
    if setup.lora_r > 0:
        adapters = shape.lora_parameters(setup.lora_r)
        terms = {
            "weights": params * weight_bytes + adapters * 4,  # frozen base + fp32 adapters
            "gradients": adapters * 4,
            "optimizer (AdamW moments)": 2 * adapters * 4,
        }
    else:
        terms = {
            "weights": params * weight_bytes // shard,
            "gradients": params * weight_bytes // shard,
            "optimizer (AdamW moments)": 2 * params * weight_bytes // shard,
        }
    if setup.precision == "mixed":  # autocast keeps a bf16 copy of each weight from its first use until backward
        terms["bf16 weight copies (autocast)"] = params * 2 // shard
    tokens = setup.micro_batch_size * setup.seq_len
    per_layer_token = (10 * shape.hidden + 4 * shape.intermediate) * act_bytes
    if setup.gradient_checkpointing:
        activations = tokens * (shape.layers * shape.hidden * act_bytes + per_layer_token)
    else:
        activations = tokens * shape.layers * per_layer_token
    terms["activations"] = activations
    head_tokens = min(tokens, setup.chunk_size) if setup.chunk_size > 0 else tokens
    terms["loss head (logits)"] = head_tokens * shape.vocab * (4 + 4 + act_bytes)  # logits, log-softmax, grad
    if setup.world_size > 1:  # FSDP gathers one layer's full weights (and its gradients in backward) at a time
        layer_params = params // max(1, shape.layers)
        terms["FSDP gathered layer"] = 2 * layer_params * weight_bytes
    vllm = int(setup.vllm_share * device_bytes)
    if vllm and not setup.vllm_sleeps:
        terms["vLLM engine (awake)"] = vllm
    terms["CUDA context + allocator"] = CONTEXT_BYTES
    static = terms["weights"] + terms["optimizer (AdamW moments)"] + CONTEXT_BYTES
    return MemoryPlan(shape, setup, device_bytes, terms, eval_bytes=static + vllm)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as one printable block, ending in a verdict line."""
    s, setup = plan.shape, plan.setup
    lines = [
        f"memory plan per GPU (estimate): {s.name}, {s.parameters() / 1e9:.2f}B parameters, precision "
        f"{setup.precision}, {setup.world_size} GPU(s){' with FSDP' if setup.world_size > 1 else ''}, micro-batch "
        f"{setup.micro_batch_size} x {setup.seq_len} tokens"
        + (", gradient checkpointing" if setup.gradient_checkpointing else "")
        + (f", LoRA r {setup.lora_r} ({s.lora_parameters(setup.lora_r) / 1e6:.1f}M trainable)" if setup.lora_r else "")
    ]
    width = max(len(k) for k in plan.terms)
    for name, b in plan.terms.items():
        lines.append(f"  {name:<{width}}  {b / GIB:8.1f} GiB")
    lines.append(f"  {'training step':<{width}}  {plan.train_bytes / GIB:8.1f} GiB")
    if setup.vllm_share:
        lines.append(f"  {'in-loop evaluation':<{width}}  {plan.eval_bytes / GIB:8.1f} GiB "
                     f"(weights, optimizer, vLLM at {setup.vllm_share:g} of the device)")  # fmt: skip
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  peak {plan.peak_bytes / GIB:.1f} GiB of {plan.device_bytes / GIB:.1f} GiB per GPU: {verdict}")
    return "\n".join(lines)


def options_that_fit(shape: ModelShape, setup: TrainSetup, device_bytes: int) -> list[str]:
    """Single changes of the setup (flags a user can pass) under which the plan fits, cheapest first."""
    candidates: list[tuple[str, TrainSetup]] = []
    for world in (2, 4, 8):
        if world > setup.world_size and setup.lora_r == 0:
            candidates.append((f"torchrun with {world} GPUs (FSDP)", dataclasses.replace(setup, world_size=world)))
    if setup.precision != "bf16":
        candidates.append(("--precision bf16 (the published runs' pure bf16)",
                           dataclasses.replace(setup, precision="bf16")))  # fmt: skip
    if not setup.gradient_checkpointing:
        candidates.append(("--gradient-checkpointing", dataclasses.replace(setup, gradient_checkpointing=True)))
    if setup.chunk_size == 0:
        candidates.append(("--chunk-size 4096", dataclasses.replace(setup, chunk_size=4096)))
    if setup.micro_batch_size > 1:
        candidates.append(("--micro-batch-size 1 (more accumulation steps)",
                           dataclasses.replace(setup, micro_batch_size=1)))  # fmt: skip
    if setup.vllm_share and not setup.vllm_sleeps:
        candidates.append(("--vllm-sleep", dataclasses.replace(setup, vllm_sleeps=True)))
    if setup.lora_r == 0 and setup.world_size == 1:
        candidates.append(("--lora-r 16 (frozen base, adapters only)", dataclasses.replace(setup, lora_r=16)))
    fitting = [(plan_memory(shape, s, device_bytes).peak_bytes, label) for label, s in candidates
               if plan_memory(shape, s, device_bytes).fits]  # fmt: skip
    return [label for _, label in sorted(fitting, key=lambda x: x[0], reverse=True)]


def read_model_config(model: str | Path) -> dict:
    """config.json of a local model folder (the only file a plan needs); a clear error otherwise."""
    path = Path(model) / "config.json"
    if not path.is_file():
        raise SystemExit(f"--model {model}: no config.json there (a memory plan needs the model's config.json; "
                         f"download it, or point --model at a local model folder)")  # fmt: skip
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"{path}: not readable as JSON ({e})") from None


def find_model_config(model: str) -> dict:
    """config.json of `model`: a local folder's, else a hub id's from the local HF cache or downloaded alone (one
    small file: a plan never fetches weights or a tokenizer)."""
    if Path(model).is_dir():
        return read_model_config(model)
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json")).read_text(encoding="utf-8"))
    except Exception as e:  # offline, unknown id, gated repo: all the same to the user
        raise SystemExit(f"--model {model}: cannot read its config.json ({type(e).__name__}: {e}); the memory plan "
                         f"needs it: point --model at a local folder holding config.json") from None


def device_memory_bytes(gpu_memory_gib: float, device: str) -> int | None:
    """Bytes of the GPU to plan for: `--gpu-memory-gib` when > 0, else the CUDA device's total; None on CPU."""
    if gpu_memory_gib > 0:
        return int(gpu_memory_gib * GIB)
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return None


def check_memory_plan(model: str, setup: TrainSetup, device_bytes: int | None, plan_only: bool,
                      verbose: bool = True) -> MemoryPlan | None:
    """Print the plan (see `format_plan`) before the model loads and stop a run that cannot fit.

    Args:
        model: the `--model` folder or hub id (only its config.json is read).
        setup: the run's precision, parallelism, batch and colocated vLLM share.
        device_bytes: memory of the GPU planned for (`device_memory_bytes`); None = no GPU and none named, so no plan
            (a CPU run) unless `plan_only`, which then asks for --gpu-memory-gib.
        plan_only: print and exit, status 0 when it fits and 3 when it does not.
        verbose: print the plan (False on FSDP ranks other than 0: every rank decides, one prints).

    Raises:
        SystemExit: with `plan_only` always; otherwise when the plan does not fit, naming the options that do.
    """
    if device_bytes is None:
        if plan_only:
            raise SystemExit("--plan-only on a machine without CUDA: give --gpu-memory-gib (e.g. 80 for an H100)")
        return None
    if model == "tiny":
        if plan_only:
            raise SystemExit("--plan-only --model tiny: the tiny model is built at run time (a few MB); "
                             "nothing to plan")
        return None
    shape = ModelShape.from_config(find_model_config(model), name=str(model))
    plan = plan_memory(shape, setup, device_bytes)
    options = [] if plan.fits else options_that_fit(shape, setup, device_bytes)
    if verbose:
        print(format_plan(plan), flush=True)
    if verbose and not plan.fits:
        print("  options that fit (one change each): " + ("; ".join(options) if options else
                                                          "none of the single changes; combine them"), flush=True)
    if plan_only:
        raise SystemExit(0 if plan.fits else 3)
    if not plan.fits:
        raise SystemExit(f"memory plan: the run needs ~{plan.peak_bytes / GIB:.1f} GiB per GPU and the GPU has "
                         f"{device_bytes / GIB:.1f} GiB; stopped before loading the model. Options above; "
                         f"--gpu-memory-gib overrides the device size if the estimate is wrong for your GPU")
    return plan
