"""The benchmark interface and the one runner every evaluation goes through.

A benchmark turns data-file records into prompts and scores completions; `run_benchmark` does everything else:
prompts, resume, batched generation in chunks, incremental per-example records and the summary.

    results/<eval>/records.jsonl      one JSON object per example, appended after each chunk (resumable)
    results/<eval>/generation.json    benchmark, model, data file and sampling of the records (checked on resume)
    results/<eval>/summary.json       metrics over all records + throughput of this run, rewritten after each chunk
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from utils.helper_fns import append_jsonl, write_json
from utils.inference import Completion, InferenceEngine, SamplingConfig


# Evaluation protocols of the instruction benchmarks (evaluate_instruct.py --protocol):
# - "reference": the published table's protocol, every setting as REFERENCE.md gives it, the published parsers/rules;
# - "improved": this repo's protocol: robust parsers, the frame a model was trained on, a strict judge-reply rule.
PROTOCOLS = ("reference", "improved")
# Settings the published protocol uses for every benchmark, keyed like evaluate_instruct.py's flags; each benchmark
# class adds its own in `reference_settings`. Frame: the zero-shot frame for every model, greedy, stop at the frame's
# closing code fence, stop string not kept.
REFERENCE_COMMON_SETTINGS = {"prompt_format": "zero_shot", "frame_prompt": None, "stop": ["```"],
                             "include_stop_str": False, "temperature": 0.0, "top_p": 1.0}  # fmt: skip


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")


class Benchmark:
    """One evaluation task. Subclasses set `name` and implement the four methods.

    Examples are dicts with at least an int "index" (the record's position in the data file, stable across runs:
    resume matches on it). `score` returns one JSON-serializable dict per example; the runner adds "index" and "prompt".
    """

    name: str = ""
    protocol: str | None = None  # "reference" | "improved" for the instruction benchmarks; None = only one way to score
    reference_settings: dict = {}  # the published protocol's own settings (added to REFERENCE_COMMON_SETTINGS)
    scorers: dict = {}  # protocol -> one line saying how that protocol scores a response (recorded in summaries)
    # where JSON-record benchmarks read a hub dataset id from (`read_records`; the scripts' --data-split/--data-config)
    data_split: str = "test"
    data_config: str | None = None

    def read_records(self, source: str | os.PathLike) -> list[tuple[str, dict]]:
        """`(location, record)` pairs of a local JSON / JSONL / Parquet file, or of this benchmark's `data_split`
        (and `data_config`) of a hub dataset (`utils.data_sources.load_records`)."""
        from utils.data_sources import load_records

        return load_records(source, self.data_split, self.data_config)

    def load_examples(self, path: str | os.PathLike, max_examples: int = -1) -> list[dict]:
        """Read and validate the data file; the first `max_examples` examples (-1 = all), each with "index"."""
        raise NotImplementedError

    def build_prompt(self, example: dict) -> str:
        """The exact text the model continues."""
        raise NotImplementedError

    def score(self, examples: list[dict], completions: list[list[Completion]]) -> list[dict]:
        """One record per example from its completions (n per example); batched so a benchmark can grade in a pool."""
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> dict:
        """Flat dict of metrics (numbers, or None when undefined) over scored records; the runner adds the response
        statistics every benchmark shares (`response_stats`)."""
        raise NotImplementedError


def mean(xs: list[float]) -> float | None:
    """The arithmetic mean, None for no values (a metric over zero examples is undefined, not 0)."""
    return sum(xs) / len(xs) if xs else None


def response_stats(records: list[dict]) -> dict:
    """`mean_response_tokens` and `truncated_frac` (share that stopped at max_tokens) over every generated sample.

    A record is one sample, or holds its n samples under `samples` (each with `response_tokens`, `finish_reason`).
    """
    samples = [s for rec in records for s in rec.get("samples", [rec])]
    return {
        "mean_response_tokens": mean([s["response_tokens"] for s in samples]),
        "truncated_frac": mean([float(s["finish_reason"] == "length") for s in samples]),
    }


def scorer_metrics(records: list[dict], key: str = "correct") -> dict:
    """Each protocol's parser on the same responses: `scorers` = {protocol: {accuracy, parsed_rate,
    parsed_accuracy (correct among parsed responses, as the published MMLU numbers also report), n_correct}} from the
    records' `<key>_<protocol>` and `prediction_<protocol>` fields, and `n_scorers_disagree` = records the two parsers
    score differently (one right, one wrong)."""
    scorers = {}
    for p in PROTOCOLS:
        parsed = [r for r in records if r[f"prediction_{p}"] is not None]
        scorers[p] = {
            "accuracy": mean([float(r[f"{key}_{p}"]) for r in records]),
            "parsed_rate": mean([float(r[f"prediction_{p}"] is not None) for r in records]),
            "parsed_accuracy": mean([float(r[f"{key}_{p}"]) for r in parsed]),
            "n_correct": sum(1 for r in records if r[f"{key}_{p}"]),
        }
    disagree = sum(1 for r in records if r[f"{key}_reference"] != r[f"{key}_improved"])
    return {"scorers": scorers, "n_scorers_disagree": disagree}


def summarize_records(benchmark: Benchmark, records: list[dict]) -> dict:
    """The metrics a summary holds: the benchmark's own, then the shared response statistics."""
    return {**benchmark.summarize(records), **response_stats(records)}


def select_examples(examples: list[dict], max_examples: int) -> list[dict]:
    """The first `max_examples` examples (-1 = all), so a smoke run and a full run share their prefix."""
    if max_examples is None or max_examples < 0:
        return examples
    return examples[:max_examples]


def one_sample_each(name: str, examples: list[dict], completions: list[list[Completion]]) -> list[Completion]:
    """The single completion of each example, for benchmarks scored on one greedy answer.

    Raises:
        ValueError: the counts differ, or an example has other than one completion.
    """
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} completion lists")
    for cs in completions:
        if len(cs) != 1:
            raise ValueError(f"{name} scores one greedy sample per example, got {len(cs)}")
    return [cs[0] for cs in completions]


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a possibly interrupted `records.jsonl`.

    Every line is written whole and fsynced (`append_jsonl`), but a process killed mid-write can leave a partial last
    line: it is dropped from the file with a printed note (its example is generated again). A malformed line anywhere
    else means the file was edited or corrupted, and raises.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if any(rest.strip() for rest in lines[line_no:]):
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg}); not a partial last line") from None
            print(f"{path}:{line_no}: dropping a partial last line (interrupted write); its example runs again")
            with open(path, "r+", encoding="utf-8") as f:
                f.truncate(len("\n".join(lines[: line_no - 1]).encode("utf-8")) + (1 if line_no > 1 else 0))
            break
    return records


def _same(key: str, a, b) -> bool:
    if key in ("model", "data_path") and isinstance(a, str) and isinstance(b, str) and Path(a).exists():
        return Path(b).exists() and Path(a).resolve() == Path(b).resolve()  # one file named from two working dirs
    return a == b


def _check_resume(records: list[dict], prompts: dict[int, str], generation: dict, generation_path: Path) -> None:
    """Refuse to mix records made under other settings (or from other prompts) into this run's output folder."""
    if records and generation_path.exists():
        previous = json.loads(generation_path.read_text())
        changed = sorted(k for k in set(previous) | set(generation) if not _same(k, previous.get(k), generation.get(k)))
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {generation.get(k)!r}" for k in changed)
            raise ValueError(f"{generation_path.parent} holds records made with other settings ({details}); "
                             f"use another output folder or delete it")  # fmt: skip
    for rec in records:
        i = rec.get("index")
        if i in prompts and rec.get("prompt") != prompts[i]:
            raise ValueError(f"{generation_path.parent}/records.jsonl: example {i} was generated from another prompt "
                             f"(data file or prompt template changed); use another output folder")  # fmt: skip


def model_identity(model_name: str) -> dict:
    """Which weights a local model folder holds, beyond its name: the resolved folder (a `latest` link re-pointed
    between runs resolves elsewhere) and a fingerprint of its weight and config files (names, sizes, and the first and
    last MiB of each, so a retrained checkpoint in the same folder differs). Empty for a hub id or a live policy."""
    import hashlib

    folder = Path(model_name)
    if not folder.is_dir():
        return {}
    digest = hashlib.sha256()
    weights = (".safetensors", ".bin")
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in weights or p.name == "config.json"))
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read(1 << 20))
    return {"model_resolved": str(folder.resolve()), "model_fingerprint": digest.hexdigest()[:16]}


def generation_settings(benchmark: Benchmark, model_name: str, data_path: str | os.PathLike,
                        sampling: SamplingConfig) -> dict:  # fmt: skip
    """What the records of an output folder depend on; stored as generation.json and compared on resume. A benchmark
    with a `protocol` adds it: a record's headline fields are scored under one protocol. A local model adds its
    identity (`model_identity`), so records of two checkpoints behind one path never mix; a hub dataset adds its
    split and config."""
    settings = {"benchmark": benchmark.name, "model": model_name, "data_path": str(data_path),
                "sampling": asdict(sampling), **model_identity(model_name)}  # fmt: skip
    if benchmark.protocol is not None:
        settings["protocol"] = benchmark.protocol
    from utils.data_sources import is_hub_id

    if is_hub_id(data_path):  # one id, several splits: the split and config are part of what was evaluated
        settings.update(data_split=benchmark.data_split, data_config=benchmark.data_config)
    return settings


def load_resumable(output_dir: str | os.PathLike, benchmark: Benchmark, examples: list[dict],
                   generation: dict) -> dict[int, dict]:  # fmt: skip
    """Records already in `output_dir` that this run can keep, by example index.

    Scripts call it before loading a model, so a folder holding other settings' records fails in seconds.

    Raises:
        ValueError: when the folder's records were made with other generation settings or other prompts.
    """
    out = Path(output_dir)
    old = read_records(out / "records.jsonl")
    prompts = {ex["index"]: benchmark.build_prompt(ex) for ex in examples}
    _check_resume(old, prompts, generation, out / "generation.json")
    return {rec["index"]: rec for rec in old}


def run_benchmark(benchmark: Benchmark, engine: InferenceEngine, data_path: str | os.PathLike,
                  sampling: SamplingConfig, output_dir: str | os.PathLike | None, max_examples: int = -1,
                  chunk_size: int = 512, use_tqdm: bool = True, extra: dict | None = None) -> dict:  # fmt: skip
    """Evaluate `engine` on a benchmark's data file, resumably.

    Builds every prompt, skips examples whose record is already in `output_dir/records.jsonl`, generates the rest in
    chunks of `chunk_size` examples (one batched `engine.generate` call each), scores each chunk, appends its records
    and rewrites `summary.json`. An interrupted run loses at most the chunk in flight; rerunning the same command
    continues. The summary covers all selected examples, old and new; throughput covers this run's generation only.

    Args:
        benchmark: the task.
        engine: any `InferenceEngine`.
        data_path: the benchmark's data file.
        sampling: sampling parameters (n samples per example). Leave `sampling.seed` None and seed the engine
            instead: a per-call seed would restart the same random stream in every chunk.
        output_dir: folder for records.jsonl / generation.json / summary.json; None = keep nothing, no resume
            (in-loop eval).
        max_examples: first N examples of the file (-1 = all).
        chunk_size: examples per generate call (-1 = all in one call). Larger keeps vLLM's batch full longer;
            smaller loses less to an interruption.
        use_tqdm: progress bars.
        extra: more top-level summary entries (the evaluate script's protocol and scoring settings).

    Returns:
        the summary dict written to summary.json: {"benchmark", "model", "engine", "data_path", "sampling",
        [protocol], **extra, "metrics": summarize_records(...), "throughput": {...}}.
    """
    from tqdm.auto import tqdm

    examples = select_examples(benchmark.load_examples(data_path, max_examples), max_examples)
    prompts = {ex["index"]: benchmark.build_prompt(ex) for ex in examples}
    generation = generation_settings(benchmark, engine.model_name, data_path, sampling)
    records: dict[int, dict] = {}
    out = None
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        records = load_resumable(out, benchmark, examples, generation)
        write_json(out / "generation.json", generation)
    todo = [ex for ex in examples if ex["index"] not in records]
    if records:
        print(f"{benchmark.name}: resuming, {len(examples) - len(todo)} of {len(examples)} examples already in "
              f"{out / 'records.jsonl'}; generating {len(todo)}")  # fmt: skip
    step = len(todo) if chunk_size is None or chunk_size < 1 else chunk_size
    gen_s = score_s = 0.0
    n_generated = n_tokens = 0
    t_start = time.perf_counter()
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=benchmark.name, unit="ex",
               disable=not use_tqdm)  # fmt: skip
    summary: dict = {}
    for start in range(0, max(len(todo), 1), max(step, 1)):
        chunk = todo[start : start + step]
        if chunk:
            t0 = time.perf_counter()
            # keyed by example index: a resumed run samples what the uninterrupted run did (utils.engine_base)
            completions = engine.generate([prompts[ex["index"]] for ex in chunk], sampling, use_tqdm=use_tqdm,
                                          request_keys=[ex["index"] for ex in chunk])
            t1 = time.perf_counter()
            scored = benchmark.score(chunk, completions)
            score_s += time.perf_counter() - t1
            gen_s += t1 - t0
            n_generated += len(chunk)
            n_tokens += sum(len(c.token_ids) for cs in completions for c in cs)
            new = [{"index": ex["index"], "prompt": prompts[ex["index"]], **rec} for ex, rec in zip(chunk, scored)]
            if out is not None:
                append_jsonl(out / "records.jsonl", new)
            records.update({rec["index"]: rec for rec in new})
            bar.update(len(chunk))
        wall_s = time.perf_counter() - t_start
        selected = [records[ex["index"]] for ex in examples if ex["index"] in records]
        summary = {
            **generation,
            "engine": engine.backend,
            **(extra or {}),
            "metrics": summarize_records(benchmark, selected),
            "throughput": {
                "examples_generated": n_generated,
                "generated_tokens": n_tokens,
                "generation_s": round(gen_s, 3),
                "scoring_s": round(score_s, 3),
                "wall_s": round(wall_s, 3),
                "examples_per_s": n_generated / wall_s if n_generated else None,  # generation + scoring + writing
                "generated_tokens_per_s": n_tokens / gen_s if n_generated else None,  # generation time only
            },
        }
        if out is not None:
            write_json(out / "summary.json", summary)
    bar.close()
    return summary
