"""Evaluate a base or fine-tuned model on GSM8K, MMLU, SimpleSafetyTests and AlpacaEval (greedy decoding).

The published table's protocol (the default), all four benchmarks, judged by a vLLM server:
    python evaluate_instruct.py --all --model meta-llama/Llama-3.1-8B --output-dir results/llama-sft/eval/base \\
        --judge-base-url http://127.0.0.1:8000/v1 --judge-model meta-llama/Llama-3.3-70B-Instruct
A fine-tuned checkpoint under the improved protocol, in the Alpaca template it was trained on:
    python evaluate_instruct.py --all --protocol improved --prompt-format alpaca \\
        --model results/llama-sft/checkpoints/step_006300 --output-dir results/llama-sft/eval-improved/step_006300
Smoke run on the bundled samples (any machine; SST and AlpacaEval need a judge endpoint):
    python evaluate_instruct.py --config data/eval_configs/gsm8k.yaml data/eval_configs/mmlu.yaml --sample-data \\
        --model results/demo/checkpoints/step_000400 --max-tokens 32 --output-dir results/eval_instruct_smoke

Protocols (`--protocol`, or `protocol:` in a config):
- reference reproduces the published table's evaluation (REFERENCE.md): every model in the zero-shot frame, greedy,
  stop at the frame's closing code fence (not kept), the GSM8K question without "Answer:", per-benchmark max_tokens,
  max_model_len and max_num_seqs, the published GSM8K and MMLU parsers and SST rule, and AlpacaEval scored by the
  `alpaca_eval` package against the GPT-4 Turbo outputs. These settings come from each benchmark class
  (`reference_settings`) and override the config; a flag given on the command line still wins, and every such
  deviation is printed and listed in summary.json (`protocol_deviations`): those numbers are not the published
  protocol's. It is the default because a number printed without further flags should be comparable to the table.
- improved is this repo's protocol: the config's settings, the frame the model knows (`--prompt-format alpaca` for a
  model fine-tuned on the Alpaca template), robust parsers (numbers with separators and signs; an explicit "answer
  is X" before stray letters), a strict judge-reply rule, and an offline AlpacaEval approximation.
GSM8K and MMLU responses are scored by both protocols' parsers and SST replies by both rules, whichever protocol
generated them, so one generation pass gives the side-by-side numbers (`metrics.scorers`; `metrics.accuracy` /
`safe_rate` are the run's protocol's).

Each benchmark has a YAML file in data/eval_configs/ (keys = this script's flags); flags given on the command line
override every selected config. Results go to <output-dir>/<benchmark>/: config.json (settings, written before
generating), records.jsonl (one record per example, appended as chunks finish), generation.json, summary.json
(`protocol`, `settings` that decide the scores, `metrics` with the numbers) and, for judged benchmarks,
judgments.jsonl, judge_cache.jsonl and for AlpacaEval model_outputs.json (plus the package's files under the
reference protocol). Without --output-dir the folder is <run>/eval/<checkpoint> for a checkpoint folder, else
results/eval_instruct_<model>. Rerunning the same command continues an interrupted run; judged benchmarks generate
first and are judged afterwards, so an unreachable judge fails (naming its URL) only once the outputs are saved, and
the rerun only judges. One output folder holds one protocol's run: use another --output-dir for the other protocol.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from utils.cli_flags import add_data_source_flags, add_engine_flags, check_engine_flags
from utils.data_sources import is_hub_id

ALL_CONFIGS = [f"data/eval_configs/{b}.yaml" for b in ("gsm8k", "mmlu", "sst", "alpaca_eval")]
JUDGED = ("sst", "alpaca_eval")
# The eval files are download_data.py's `eval` subset (its `sft-instruct` subset is the training data only).
DOWNLOAD_COMMAND = "python play-scripts/data-scripts/download_data.py --only eval"
EVAL_DATA_DIR = "data/sft-instruct/eval"
# Where a downloaded file of each benchmark may sit when the config's path does not match the published layout (not
# visible offline when this was written); only used to name candidates in the missing-file message, never silently.
DATA_GLOBS = {"gsm8k": "**/*gsm8k*test*.jsonl", "mmlu": "**/*_test.csv", "sst": "**/*safety*.csv",
              "alpaca_eval": "**/*alpaca_eval*.json*"}  # fmt: skip
# Prompt formats: the frame file and the stop strings used when the config leaves `stop` empty. The zero-shot frame
# is the reference evaluation's (the model answers under "# Answer:" and would go on with another "# Query:"); the
# Alpaca template is the SFT training format (the response follows "### Response:\n"; a model that was not trained to
# stop with EOS goes on with another "### Instruction:").
PROMPT_FORMATS = {
    "zero_shot": ("data/zero_shot_system_prompt.prompt", ["# Query:"]),
    "alpaca": ("data/alpaca_sft.prompt", ["### Instruction:"]),
}
# Settings recorded in summary.json because a score depends on them (with the protocol and its deviations).
SCORE_KEYS = ("prompt_format", "frame_prompt", "task_prompt", "judge_prompt", "stop", "include_stop_str", "temperature",
              "top_p", "max_tokens", "max_model_len", "max_num_seqs", "engine", "dtype", "seed")  # fmt: skip
JUDGE_SCORE_KEYS = ("judge_model", "judge_base_url", "judge_max_tokens", "judge_extra_body")
ENGINE_KEYS = ("engine", "dtype", "device", "gpu_memory_utilization", "max_model_len", "max_num_seqs", "enforce_eager",
               "seed", "tensor_parallel_size")  # fmt: skip
PER_BENCHMARK_KEYS = ("data", "task_prompt", "judge_prompt")  # meaningless across several configs


def _build_parser(suppress: bool) -> argparse.ArgumentParser:
    """The flags; with `suppress`, no defaults, so parsing returns only the flags actually given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", help="YAML file(s) in data/eval_configs/, one per benchmark")
    p.add_argument("--all", action="store_true",
                   help=f"run data/eval_configs/{{{','.join(Path(c).stem for c in ALL_CONFIGS)}}}.yaml")
    p.add_argument("--model", required=True, help="HF hub id or local model / checkpoint folder")
    p.add_argument("--protocol", choices=["reference", "improved"], default="reference",
                   help="reference = the published table's; improved = this repo's (both described above)")
    g = p.add_argument_group("data and prompts")
    g.add_argument("--data",
                   help="the benchmark's data file (MMLU: folder of <subject>_test.csv); default: the config's")
    g.add_argument("--sample-data", dest="use_sample_data", action="store_true",
                   help="use the config's bundled `sample_data` file instead of `data` (smoke runs)")
    add_data_source_flags(g, {"--data-split": ("test", "split of a hub dataset --data (gsm8k, alpaca_eval)")})
    g.add_argument("--max-examples", type=int, default=-1, help="first N examples (-1 = all)")
    g.add_argument("--prompt-format", choices=list(PROMPT_FORMATS), default="zero_shot",
                   help="zero_shot = the reference frame (base models); alpaca = the SFT training template")
    g.add_argument("--frame-prompt", default=None,
                   help="frame file with an {instruction} slot (None = the prompt format's)")
    g.add_argument("--task-prompt", default=None,
                   help="task text file (GSM8K {question}; MMLU {subject} {question} {options[i]}); "
                        "None = the benchmark's")
    g.add_argument("--judge-prompt", default=None,
                   help="SST judge system prompt file (None = data/sst_judge_system.prompt)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--max-tokens", type=int, default=512, help="max generated tokens per response")
    g.add_argument("--stop", nargs="+", default=None, help="stop strings (default: the prompt format's)")
    g.add_argument("--include-stop-str", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the matched stop string in the response")
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed, per example (matters only with --temperature > 0)")
    g = p.add_argument_group("engine")
    add_engine_flags(g)
    g = p.add_argument_group("judge (SST, AlpacaEval): any OpenAI-compatible chat endpoint")
    g.add_argument("--judge-base-url", default="http://127.0.0.1:8000/v1", help="endpoint root with /v1")
    g.add_argument("--judge-model", default="meta-llama/Llama-3.3-70B-Instruct", help="model name the endpoint serves")
    g.add_argument("--judge-api-key-env", default="",
                   help="environment variable holding the API key ('' = none, local vLLM)")
    g.add_argument("--judge-max-concurrency", type=int, default=16, help="judge requests in flight")
    g.add_argument("--judge-max-retries", type=int, default=5,
                   help="retries per request (connection errors, timeouts, 408/409/429/5xx)")
    g.add_argument("--judge-backoff-s", type=float, default=1.0,
                   help="first retry delay in seconds, doubling per retry")
    g.add_argument("--judge-max-backoff-s", type=float, default=60.0,
                   help="longest delay between two tries, in seconds")
    g.add_argument("--judge-timeout-s", type=float, default=120.0, help="seconds one judge request may take")
    g.add_argument("--judge-max-tokens", type=int, default=16,
                   help="judge reply length limit in tokens (a verdict is one word)")
    g.add_argument("--judge-extra-body", type=json.loads, default=None,
                   help="JSON of extra request parameters, "
                        'e.g. \'{"structured_outputs": {"choice": ["True", "False"]}}\'')
    g.add_argument("--judge-cache", default="",
                   help="judgment cache file ('' = <output-dir>/<benchmark>/judge_cache.jsonl)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="",
                   help="results go to <output-dir>/<benchmark>/ ('' = a folder named after --model, see above)")
    g.add_argument("--generator", default="",
                   help="AlpacaEval generator name in model_outputs.json ('' = the model folder's name)")
    g.add_argument("--chunk-size", type=int, default=512,
                   help="examples per generate call; records are appended after each (-1 = one call)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    if suppress:
        for action in p._actions:  # argparse has no public switch that drops every default, explicit ones included
            action.default = argparse.SUPPRESS
    return p


def _load_config(path: str, known: set[str]) -> dict:
    from utils.benchmarks.eval_config import load_eval_config

    try:
        values = load_eval_config(path, known, extra_keys=("benchmark", "sample_data"))
    except ValueError as e:
        raise SystemExit(f"--config {e}") from None
    if "benchmark" not in values:
        raise SystemExit(f"--config {path}: no `benchmark` key")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags and configs into one settings Namespace per benchmark: defaults <- YAML <- flags given.

    Returns:
        Namespace(model, configs, runs=[Namespace(benchmark, config, model, every setting...)]).
    """
    parser = _build_parser(suppress=False)
    args = parser.parse_args(argv)
    given = vars(_build_parser(suppress=True).parse_args(argv))
    if args.all and args.config:
        raise SystemExit("--all and --config: give one (--all runs every file in data/eval_configs/ but math.yaml)")
    if not args.all and not args.config:
        raise SystemExit("give --config FILE [FILE ...] or --all")
    configs = ALL_CONFIGS if args.all else args.config
    if len(configs) > 1:
        clash = [f"--{k.replace('_', '-')}" for k in PER_BENCHMARK_KEYS if k in given]
        if clash:
            raise SystemExit(f"{' '.join(clash)} with {len(configs)} configs (--all or several --config): each "
                             f"benchmark reads its own files; set them in its config or run it alone")  # fmt: skip
    defaults = {k: v for k, v in vars(args).items() if k not in ("config", "all")}
    known = set(defaults) - {"model"}
    runs = []
    for path in configs:
        values = _load_config(path, known)
        s = argparse.Namespace(**{**defaults, "sample_data": None, **values, **given, "config": path,
                                  "model": args.model})  # fmt: skip
        apply_protocol(s, given)
        runs.append(s)
    names = [r.benchmark for r in runs]
    if len(set(names)) < len(names):
        raise SystemExit(f"--config: benchmark given twice ({names})")
    return argparse.Namespace(model=args.model, configs=list(configs), runs=runs)


def apply_protocol(s: argparse.Namespace, given: dict) -> None:
    """Under the reference protocol, set the published settings of `s.benchmark` over the config's values; a flag in
    `given` (the command line) keeps its value and is recorded in `s.protocol_deviations` as {key: {published, used}}.
    """
    from utils.benchmarks import REGISTRY
    from utils.benchmarks.base import PROTOCOLS, REFERENCE_COMMON_SETTINGS

    s.protocol_deviations = {}
    if s.protocol not in PROTOCOLS:
        raise SystemExit(f"{s.config}: protocol {s.protocol!r} must be one of {list(PROTOCOLS)}")
    if s.protocol != "reference" or s.benchmark not in REGISTRY:
        return  # a bad benchmark name is reported by check_run
    for key, published in {**REFERENCE_COMMON_SETTINGS, **REGISTRY[s.benchmark].reference_settings}.items():
        if key in given and given[key] != published:
            s.protocol_deviations[key] = {"published": published, "used": given[key]}
        else:
            setattr(s, key, published)


def score_settings(s: argparse.Namespace, benchmark) -> dict:
    """What summary.json records besides the metrics: the protocol, every setting a score depends on, the scorers,
    and the flags that deviate from the published protocol."""
    settings = {k: getattr(s, k, None) for k in SCORE_KEYS}
    settings["frame_prompt"] = s.frame_prompt or PROMPT_FORMATS[s.prompt_format][0]
    if s.benchmark in JUDGED:
        settings.update({k: getattr(s, k) for k in JUDGE_SCORE_KEYS})
        settings["judge_top_p"] = judge_config(s).top_p
    if s.benchmark == "alpaca_eval" and s.protocol == "reference":  # the package's annotator sends the requests
        from utils.benchmarks.alpaca_eval_package import JUDGE_MAX_TOKENS, PACKAGE_SEED

        settings.update(judge_max_tokens=JUDGE_MAX_TOKENS, judge_prompt="alpaca_eval package: "
                        "evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt", package_seed=PACKAGE_SEED)  # fmt: skip
    return {"protocol": s.protocol, "settings": settings, "scorers": dict(benchmark.scorers),
            "protocol_deviations": s.protocol_deviations}


def frame_template(s: argparse.Namespace) -> str:
    """The text around each task with one {instruction} slot. For the Alpaca template, everything before
    `{response}`: the model continues right after "### Response:\\n", as in training."""
    from utils.helper_fns import load_prompt

    text = load_prompt(s.frame_prompt or PROMPT_FORMATS[s.prompt_format][0])
    if "{response}" in text:
        text = text.split("{response}")[0]
    return text


def check_run(s: argparse.Namespace) -> None:
    """Reject bad settings and missing files of one benchmark before any model loads."""
    from utils.benchmarks import REGISTRY

    where = f"{s.config} ({s.benchmark})"
    if s.benchmark not in REGISTRY or s.benchmark == "math":
        raise SystemExit(f"{where}: benchmark must be one of gsm8k, mmlu, sst, alpaca_eval (MATH: evaluate_reason.py)")
    if s.prompt_format not in PROMPT_FORMATS:
        raise SystemExit(f"{where}: prompt_format {s.prompt_format!r} must be one of {list(PROMPT_FORMATS)}")
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.max_tokens < 1:
        raise SystemExit(f"{where}: need --temperature >= 0, --top-p in (0, 1], --max-tokens >= 1")
    if s.chunk_size == 0 or s.chunk_size < -1:
        raise SystemExit(f"{where}: --chunk-size {s.chunk_size} must be >= 1, or -1 for one call")
    data = Path(s.data) if s.data else None
    if data is None:
        raise SystemExit(f"{where}: no data path (set `data` in the config or --data)")
    if is_hub_id(s.data) and s.benchmark in ("mmlu", "sst"):
        raise SystemExit(f"{where}: data {s.data} looks like a hub dataset id; {s.benchmark} reads CSV files "
                         f"(hub datasets: gsm8k and alpaca_eval, JSON records)")  # fmt: skip
    if not is_hub_id(s.data) and not data.exists():
        found = sorted({str(p.parent if s.benchmark == "mmlu" else p) for p in Path(EVAL_DATA_DIR).glob(
            DATA_GLOBS[s.benchmark]) if not p.name.startswith("sample_") and "sample_" not in p.parent.name})
        hint = f"\n{EVAL_DATA_DIR} holds {found}: pass one with --data." if found else ""
        raise SystemExit(f"{where}: data {data} not found. Download the evaluation data with\n    {DOWNLOAD_COMMAND}\n"
                         f"or run on the bundled sample with --sample-data ({s.sample_data}).{hint}")  # fmt: skip
    for flag, path in (("--frame-prompt", s.frame_prompt), ("--task-prompt", s.task_prompt),
                       ("--judge-prompt", s.judge_prompt)):  # fmt: skip
        if path and not Path(path).exists():
            raise SystemExit(f"{where}: {flag} {path}: file not found")
    if s.benchmark in JUDGED:
        try:
            judge_config(s).check()
        except ValueError as e:
            raise SystemExit(f"{where}: {e}") from None
    if s.benchmark == "alpaca_eval" and s.protocol == "reference":
        from utils.benchmarks.alpaca_eval_package import package_prompt_path

        if s.judge_extra_body:
            raise SystemExit(f"{where}: --judge-extra-body with --protocol reference: the alpaca_eval package sends "
                             f"its own judge requests; use --protocol improved for our judge")  # fmt: skip
        try:
            package_prompt_path()
        except RuntimeError as e:
            raise SystemExit(f"{where}: {e}") from None


def judge_config(s: argparse.Namespace):
    """The judge endpoint and request settings; under the reference protocol greedy with top_p 1.0, and for AlpacaEval
    the package annotator's max_tokens (it sends the requests; the config then describes them in summary.json)."""
    from utils.benchmarks.alpaca_eval_package import JUDGE_MAX_TOKENS
    from utils.benchmarks.judges import JudgeConfig

    package = s.benchmark == "alpaca_eval" and s.protocol == "reference"
    return JudgeConfig(base_url=s.judge_base_url, model=s.judge_model, api_key_env=s.judge_api_key_env,
                       max_concurrency=s.judge_max_concurrency, max_retries=s.judge_max_retries,
                       backoff_s=s.judge_backoff_s, max_backoff_s=s.judge_max_backoff_s, timeout_s=s.judge_timeout_s,
                       max_tokens=JUDGE_MAX_TOKENS if package else s.judge_max_tokens,
                       extra_body=dict(s.judge_extra_body or {}),
                       top_p=1.0 if s.protocol == "reference" else None)  # fmt: skip


def build_benchmark(s: argparse.Namespace):
    """The registry's benchmark object for one settings Namespace."""
    from utils.benchmarks import REGISTRY
    from utils.benchmarks.eval_config import model_slug
    from utils.helper_fns import load_prompt

    frame = frame_template(s)
    cls = REGISTRY[s.benchmark]
    if s.benchmark in ("gsm8k", "mmlu"):
        return cls(frame_template=frame, task_template=load_prompt(s.task_prompt) if s.task_prompt else None,
                   protocol=s.protocol)  # fmt: skip
    if s.benchmark == "sst":
        return cls(frame_template=frame, judge_system_prompt=load_prompt(s.judge_prompt) if s.judge_prompt else None,
                   protocol=s.protocol)  # fmt: skip
    return cls(frame_template=frame, generator=s.generator or model_slug(s.model), protocol=s.protocol,
               max_concurrency=s.judge_max_concurrency)  # fmt: skip


def default_output_dir(model: str) -> tuple[str, str]:
    """(folder, why): `<run>/eval/<checkpoint>` for a `<run>/checkpoints/<checkpoint>` folder (the layout the plot
    scripts read), else `results/eval_instruct_<model>`."""
    from utils.benchmarks.eval_config import model_slug

    path = Path(model)
    if path.exists() and path.resolve().parent.name == "checkpoints":
        resolved = path.resolve()  # `latest` is a link to the newest step_XXXXXX
        return str(resolved.parent.parent / "eval" / resolved.name), "a checkpoint of a training run"
    return f"results/eval_instruct_{model_slug(model)}", "not a <run>/checkpoints/ folder"


def main(args: argparse.Namespace, engine=None) -> dict[str, dict]:
    """Run every selected benchmark with one engine; returns {benchmark: summary}.

    Args:
        args: from `parse_args`.
        engine: an `InferenceEngine` to use instead of loading `--model` (in-loop evaluation, tests); not closed here.
    """
    from utils.benchmarks import run_benchmark
    from utils.benchmarks.report import summary_lines
    from utils.helper_fns import check_writable_dir, seed_everything, write_json
    from utils.inference import SamplingConfig, make_engine
    from utils.benchmarks.judges import JudgeUnavailable, run_judging
    from utils.model_setup import check_model_flag
    from utils.serving import choose_eval_dtype

    model = args.model
    if Path(model).is_symlink():  # e.g. checkpoints/latest: records must name the step they came from
        model = str(Path(model).resolve())
        print(f"model: {args.model} -> {model}")
    prepared, default_printed = [], False
    for s in args.runs:  # every check and every data file before the model loads
        s.model = model
        if s.use_sample_data:
            if not s.sample_data:
                raise SystemExit(f"--sample-data: {s.config} has no `sample_data` key")
            s.data = s.sample_data
        if not s.output_dir:
            s.output_dir, why = default_output_dir(model)
            if not default_printed:
                print(f"output: {s.output_dir}/<benchmark> ({why}; --output-dir sets it)")
                default_printed = True
        if s.stop is None:
            s.stop = list(PROMPT_FORMATS[s.prompt_format][1])
            stop_why = f"the {s.prompt_format} format's default"
        elif s.protocol == "reference" and "stop" not in s.protocol_deviations:
            stop_why = "the reference protocol's"
        else:
            stop_why = "given"
        check_run(s)
        check_engine_flags(s.device, s.tensor_parallel_size, s.data_parallel_size)
        try:
            benchmark = build_benchmark(s)
            benchmark.data_split, benchmark.data_config = s.data_split, s.data_config  # where a hub --data is read
            examples = benchmark.load_examples(s.data, s.max_examples)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"{s.config}: {e}") from None
        out = check_writable_dir(Path(s.output_dir) / s.benchmark, "--output-dir")
        print(f"{s.benchmark}: {len(examples)} examples from {s.data} | prompt {s.prompt_format} "
              f"({s.frame_prompt or PROMPT_FORMATS[s.prompt_format][0]}) | stop {s.stop} ({stop_why}) | "
              f"max_tokens {s.max_tokens} | T {s.temperature:g} -> {out}")  # fmt: skip
        deviations = ", ".join(f"{k} {v['used']!r} (published {v['published']!r})"
                               for k, v in s.protocol_deviations.items())  # fmt: skip
        print(f"{s.benchmark}: protocol {s.protocol}" + (f" WITH DEVIATIONS (these numbers are not the published "
                                                         f"protocol's): {deviations}" if deviations else ""))
        if s.benchmark in JUDGED:
            package = s.benchmark == "alpaca_eval" and s.protocol == "reference"
            how = "the alpaca_eval package, judge " if package else ""
            print(f"{s.benchmark}: judged after generation by {how}{s.judge_model!r} at {s.judge_base_url}")
        prepared.append((s, benchmark, examples, out))

    if engine is None:  # after every benchmark's checks, before anything loads
        check_model_flag(args.model)
    seed_everything(args.runs[0].seed)
    summaries: dict[str, dict] = {}
    judge_failures: list[str] = []
    own_engine, engine_key = None, None
    try:
        for s, benchmark, examples, out in prepared:
            write_json(out / "config.json", vars(s))
            if engine is None:
                key = tuple(getattr(s, k) for k in ENGINE_KEYS)
                if own_engine is None or key != engine_key:
                    if own_engine is not None:
                        own_engine.close()
                    own_engine = make_engine(model, engine=s.engine, seed=s.seed,
                                             dtype=choose_eval_dtype(s.dtype, model, s.device),
                                             tensor_parallel_size=s.tensor_parallel_size,
                                             gpu_memory_utilization=s.gpu_memory_utilization,
                                             max_model_len=None if s.max_model_len < 0 else s.max_model_len,
                                             max_num_seqs=s.max_num_seqs, device=s.device,
                                             enforce_eager=s.enforce_eager)  # fmt: skip
                    engine_key = key
            sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                                      stop=list(s.stop), include_stop_str_in_output=s.include_stop_str,
                                      seed=s.seed)  # fmt: skip
            summary = run_benchmark(benchmark, engine or own_engine, s.data, sampling, out,
                                    max_examples=s.max_examples, chunk_size=s.chunk_size,
                                    use_tqdm=not s.no_progress, extra=score_settings(s, benchmark))  # fmt: skip
            if s.benchmark in JUDGED:
                judge = judge_config(s).build(s.judge_cache or out / "judge_cache.jsonl")
                try:
                    summary = run_judging(benchmark, judge, out, [ex["index"] for ex in examples])
                except JudgeUnavailable as e:
                    print(f"\n{e}\n")
                    judge_failures.append(str(e))
            summaries[s.benchmark] = summary
            print("\n".join(summary_lines(s.benchmark, summary)))
    finally:
        if own_engine is not None:
            own_engine.close()
    if judge_failures:
        raise SystemExit("\n".join(judge_failures))
    return summaries


if __name__ == "__main__":  # vLLM's workers re-import this module; the guard keeps them from re-running main
    main(parse_args())
