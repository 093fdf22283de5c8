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

    def __init__(self, args, policy, tokenizer, val_records, template, run_dir: Path, device, precision):
        from utils.benchmarks.math import MathBenchmark
        from utils.inference import SamplingConfig

        self.args, self.policy, self.tokenizer = args, policy, tokenizer
        self.device, self.precision = device, precision
        self.samples_dir = Path(run_dir) / "samples"
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        order = list(range(len(val_records)))
        random.Random(args.val_seed).shuffle(order)
        if args.val_size >= 0:
            order = sorted(order[: args.val_size])
        self.records = [val_records[i] for i in order]
        self.sample_ids = list(range(min(args.num_samples_logged, len(self.records))))
        self.benchmark = MathBenchmark(prompt_template=template, grader_workers=args.grader_workers)
        self.prompts = [self.benchmark.build_prompt(r) for r in self.records]
        self.sampling = SamplingConfig(
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, stop=[args.stop],
            include_stop_str_in_output=True, n=1, seed=args.seed,
        )  # fmt: skip
        self.reference = [r for r in self.records if r.get("response")]
        if not self.reference:
            print("validation: the val records carry no reference responses; teacher-forced val loss is not logged")
        self.history: list[dict] = []
        self._engine = None

    def _get_engine(self):
        if self._engine is None:
            from utils.inference import make_engine

            # vLLM loads the policy's folder, then receives its current weights; HF generates with the live policy.
            self._engine = make_engine(
                self.policy,
                engine=self.args.engine,
                tokenizer=self.tokenizer,
                seed=self.args.seed,
                dtype="float32" if self.precision == "fp32" else "bfloat16",
                gpu_memory_utilization=self.args.gpu_memory_utilization,
                max_model_len=self.args.max_seq_len + self.args.max_tokens,
                device=self.args.vllm_device,
            )
        return self._engine

    def run(self, step: int, logger) -> dict:
        from utils.dataloader import make_micro_batches
        from utils.training import teacher_forced_eval

        engine = self._get_engine()
        engine.load_weights(self.policy)
        completions = [c[0] for c in engine.generate(self.prompts, self.sampling)]
        examples = [{"problem": r["problem"], "expected_answer": r["expected_answer"]} for r in self.records]
        scored = self.benchmark.score(examples, completions)
        summary = self.benchmark.summarize(scored)
        metrics = {f"eval/math/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        if self.reference:
            prompts = [p for p, r in zip(self.prompts, self.records) if r.get("response")]
            responses = [r["response"] for r in self.reference]
            batches = make_micro_batches(prompts, responses, list(range(len(prompts))), self.args.micro_batch_size,
                                         self.tokenizer)  # fmt: skip
            tf = teacher_forced_eval(self.policy, batches, self.precision, self.args.chunk_size)
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
            print(f"{h['step']:5d} | {h.get('accuracy', float('nan')):8.3f} | {h.get('format_accuracy', float('nan')):6.3f} | "
                  + (f"{tf:.4f}" if tf is not None else "-"))

    def close(self) -> None:
        if self._engine is not None and hasattr(self._engine, "close"):
            self._engine.close()
        self._engine = None
