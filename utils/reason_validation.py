"""In-loop validation for reasoning SFT: sample the current policy on a fixed val subset, grade, log, save samples."""

from __future__ import annotations

import random
from pathlib import Path

from utils.helper_fns import append_jsonl


class ReasonValidator:
    """Owns the generation engine and the fixed val subset for one training run.

    Each `run(step)` pushes the policy's current weights into the engine (vLLM) or uses the live policy (HF),
    samples one answer per val problem, grades with the r1_zero reward, computes teacher-forced loss and entropy on
    the val records that carry reference responses (never on the model's own samples), logs `eval/*` metrics and
    writes `samples/step_XXXXX.jsonl` for a fixed set of examples.
    """

    def __init__(self, policy, tokenizer, val_records: list[dict], template: str, run_dir: Path, device: str,
                 precision: str, sampling, *, val_size: int = -1, val_seed: int = 0, num_samples_logged: int = 20,
                 grader_workers: int = 2, micro_batch_size: int = 2, chunk_size: int = 0, engine: str = "auto",
                 engine_seed: int = 0, gpu_memory_utilization: float = 0.3, max_model_len: int | None = None,
                 vllm_device: str | None = None, vllm_sleep: bool = False):
        """Fix the val subset, its prompts and the grader; the engine starts at the first `run`.

        Args:
            policy, tokenizer: the model being trained (validated in place, never copied) and its tokenizer.
            val_records: `{problem, expected_answer}` dicts, `response` optional (teacher-forced loss on those).
            template: the prompt with a `{question}` slot; run_dir: samples go to `<run_dir>/samples/`.
            device, precision: the policy's device and resolved precision (`utils.training.resolve_precision`).
            sampling: `utils.inference.SamplingConfig` of every eval (one sample per problem).
            val_size, val_seed: a fixed random subset of `val_records` (-1 = all), drawn once with this seed.
            num_samples_logged: the first N problems of the subset whose generations are saved at each eval.
            grader_workers: processes of the math grader.
            micro_batch_size, chunk_size: batching and lm-head chunking of the teacher-forced loss.
            engine, engine_seed, gpu_memory_utilization, max_model_len, vllm_device: `utils.inference.make_engine`'s
                `engine`, `seed`, `gpu_memory_utilization`, `max_model_len` (None = the model's) and `device`.
            vllm_sleep: build vLLM with sleep mode and put it to sleep (level 1) after each evaluation, so training
                steps get its memory back (`resolve_vllm_sleep`; CUDA only).
        """
        from utils.benchmarks.math import MathBenchmark

        self.policy, self.tokenizer = policy, tokenizer
        self.device, self.precision = device, precision
        self.micro_batch_size, self.chunk_size = micro_batch_size, chunk_size
        self.engine_settings = dict(engine=engine, seed=engine_seed, gpu_memory_utilization=gpu_memory_utilization,
                                    max_model_len=max_model_len, device=vllm_device,
                                    enable_sleep_mode=vllm_sleep)  # fmt: skip
        self.samples_dir = Path(run_dir) / "samples"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        order = list(range(len(val_records)))
        random.Random(val_seed).shuffle(order)
        if val_size >= 0:
            order = sorted(order[:val_size])
        self.records = [val_records[i] for i in order]
        self.keys = order  # val-file positions: each problem's samples are seeded by it (same across resumes)
        self.sample_ids = list(range(min(num_samples_logged, len(self.records))))
        self.benchmark = MathBenchmark(prompt_template=template, grader_workers=grader_workers)
        self.prompts = [self.benchmark.build_prompt(r) for r in self.records]
        self.sampling = sampling
        self.reference = [r for r in self.records if r.get("response")]
        if not self.reference:
            print("validation: the val records carry no reference responses; teacher-forced val loss is not logged")
        self.history: list[dict] = []
        self._engine = None

    def _get_engine(self):
        if self._engine is None:
            from utils.inference import make_engine

            # vLLM loads the policy's folder, then receives its current weights; HF generates with the live policy.
            self._engine = make_engine(self.policy, tokenizer=self.tokenizer,
                                       dtype="float32" if self.precision == "fp32" else "bfloat16",
                                       **self.engine_settings)  # fmt: skip
        return self._engine

    def run(self, step: int, logger) -> dict:
        from utils.dataloader import make_micro_batches
        from utils.training import teacher_forced_eval

        engine = self._get_engine()
        if self.engine_settings["enable_sleep_mode"]:
            import torch

            # the training steps' cached blocks go back to the driver first, or waking vLLM finds its share taken
            torch.cuda.empty_cache()
        engine.load_weights(self.policy)  # wakes a sleeping engine, then syncs the current weights
        completions = [c[0] for c in engine.generate(self.prompts, self.sampling, request_keys=self.keys)]
        engine.sleep()  # a no-op unless the engine was built with sleep mode
        examples = [{"problem": r["problem"], "expected_answer": r["expected_answer"]} for r in self.records]
        scored = self.benchmark.score(examples, completions)
        summary = self.benchmark.summarize(scored)
        metrics = {f"eval/math/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        if self.reference:
            prompts = [p for p, r in zip(self.prompts, self.records) if r.get("response")]
            responses = [r["response"] for r in self.reference]
            batches = make_micro_batches(prompts, responses, list(range(len(prompts))), self.micro_batch_size,
                                         self.tokenizer)  # fmt: skip
            tf = teacher_forced_eval(self.policy, batches, self.precision, self.chunk_size)
            metrics["eval/teacher_forced_loss"] = tf["loss"]
            metrics["eval/teacher_forced_token_entropy"] = tf["token_entropy"]
        logger.log(metrics, step)
        rows = [dict(step=step, index=i, prompt=self.prompts[i], response=completions[i].text,
                     expected_answer=self.records[i]["expected_answer"], reward=scored[i].get("reward"))
                for i in self.sample_ids]  # fmt: skip
        path = self.samples_dir / f"step_{step:05d}.jsonl"
        path.unlink(missing_ok=True)
        append_jsonl(path, rows)
        logger.log_table("eval/samples", list(rows[0]) if rows else [], [list(r.values()) for r in rows], step)
        row = {"step": step, **{k.split("/")[-1]: v for k, v in metrics.items()}}
        self.history.append(row)
        acc, fmt = summary.get("accuracy", float("nan")), summary.get("format_accuracy", float("nan"))
        print(f"eval step {step:05d} | accuracy {acc:.3f} | format {fmt:.3f} | n {len(self.records)}", flush=True)
        return row

    def print_table(self) -> None:
        if not self.history:
            return
        print("\nstep  | accuracy | format | teacher-forced loss")
        for h in self.history:
            tf = h.get("teacher_forced_loss")
            acc, fmt = h.get("accuracy", float("nan")), h.get("format_accuracy", float("nan"))
            print(f"{h['step']:5d} | {acc:8.3f} | {fmt:6.3f} | " + (f"{tf:.4f}" if tf is not None else "-"))

    def close(self) -> None:
        if self._engine is not None and hasattr(self._engine, "close"):
            self._engine.close()
        self._engine = None


def resolve_vllm_sleep(requested: bool | None, engine: str, policy_device: str,
                       vllm_device: str | None) -> tuple[bool, str]:  # fmt: skip
    """Whether the in-loop vLLM engine sleeps between evaluations, and why (one printable clause).

    Default (`requested` None): on when vLLM shares the policy's GPU, where its weights and KV cache would otherwise
    sit beside the optimizer state through every training step. Never off CUDA or with the HF engine: vLLM's sleep
    mode is CUDA only (`init_vllm` refuses it), and the HF engine is the live policy, with nothing to free.
    """
    if not policy_device.startswith("cuda"):
        return False, f"not applicable on {policy_device} (vLLM sleep mode needs CUDA)"
    if engine == "hf":
        return False, "not applicable with --engine hf (it generates with the live policy)"

    colocated = gpu_index(vllm_device) == gpu_index(policy_device)
    if requested is None:
        return colocated, ("on: vLLM shares the policy's GPU" if colocated else
                           f"off: vLLM has its own GPU ({vllm_device})")  # fmt: skip
    return requested, "--vllm-sleep" if requested else "--no-vllm-sleep"


def gpu_index(device: str | None) -> int:
    """"cuda:N" -> N; "cuda" and None (vLLM's default) -> 0, the current device of a process that set none."""
    import torch

    return 0 if device is None else (torch.device(device).index or 0)
