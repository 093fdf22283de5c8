"""Sample teacher reasoning traces for MATH problems: k samples per problem, raw text and finish reason kept.

Real run, a teacher behind any OpenAI-compatible endpoint (here gpt-oss-120b served by `vllm serve` on one node):
    python play-scripts/data-scripts/generate_traces.py --backend openai --base-url http://127.0.0.1:8000/v1 \\
        --model openai/gpt-oss-120b --problems data/sft-reason/math_train_problems.jsonl \\
        --output data/sft-reason/traces_gpt-oss-120b.jsonl --max-concurrency 64
Real run, offline on the GPU of this machine (utils.inference: vLLM; `--engine hf` for HF generate):
    python play-scripts/data-scripts/generate_traces.py --backend vllm --model Qwen/Qwen2.5-Math-7B-Instruct \\
        --output data/sft-reason/traces_qwen-math-7b.jsonl --k 4
Smoke run (10 problems, 2 samples, short outputs):
    python play-scripts/data-scripts/generate_traces.py --backend openai --base-url http://127.0.0.1:8000/v1 \\
        --model MODEL --limit 10 --k 2 --max-tokens 256 --output /tmp/traces_smoke.jsonl

The teacher is asked for a short reasoning in `<think> </think>` and the final answer in `<answer> </answer>`
(TEACHER_PROMPT below; --prompt-file replaces it). A raw completion (`--api completions`, or an offline model without
a chat template) gets the r1_zero prompt instead, which ends in `Assistant: <think>`, so the text starts inside the
reasoning; build_sft_dataset.py accepts both shapes. With --prompt-file and --prompt-format auto, an offline checkpoint
whose chat template is that prompt itself (one this repo trained) gets the prompt raw, not framed twice. Nothing is
parsed or dropped here: every record keeps the raw text and finish reason, and build_sft_dataset.py filters.

Resume: records are appended as answers arrive, keyed by (problem_id, sample_index) with problem_id = sha1 of the
problem text. A re-run skips finished keys; with the openai backend every answer is also in the request cache
(--cache), so answers received before a crash are not asked again. Sample j of a problem is requested with seed
`--seed + j`, which makes the k requests distinct (and reproducible on vLLM). The settings that shape a sample are
saved to OUTPUT.config.json and a resume with different ones is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.dataloader import load_reason_records  # noqa: E402
from utils.helper_fns import DATA_DIR, append_jsonl, load_prompt, write_json  # noqa: E402

TEACHER_PROMPT = (
    "Solve the math problem below. Reason briefly, in a few sentences, then state the final answer.\n"
    "Put the reasoning inside <think> </think> and only the final answer, as a plain LaTeX expression without "
    "\\boxed, inside <answer> </answer>, in exactly this shape:\n"
    "<think> reasoning here </think> <answer> answer here </answer>\n\n"
    "Problem: {question}"
)
# Settings that change what a sample is; a resume must use the same ones.
SAMPLE_SETTINGS = ("backend", "model", "api", "prompt_format", "temperature", "top_p", "max_tokens", "stop", "seed",
                   "extra_body")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--problems", default=str(DATA_DIR / "sft-reason" / "math_train_problems.jsonl"),
                   help="{problem, expected_answer} JSON Lines or JSON array (make_math_splits.py)")
    g.add_argument("--output", required=True, help="JSON Lines of samples, appended to; resumed when it exists")
    g.add_argument("--limit", type=int, default=-1, help="first N problems only (-1 = all)")
    g.add_argument("--k", type=int, default=1, help="samples per problem")
    g.add_argument("--prompt-file", default="", help="prompt template with {question} (default: see the docstring)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--max-tokens", type=int, default=1024, help="generated tokens per sample")
    g.add_argument("--stop", nargs="*", default=[], help="stop strings (default: none, the teacher ends by itself)")
    g.add_argument("--seed", type=int, default=0, help="sample j uses seed + j (openai); engine seed (vllm)")
    g.add_argument("--backend", choices=["openai", "vllm"], default="openai",
                   help="openai = an OpenAI-compatible server; vllm = a local engine in this process")
    g.add_argument("--model", required=True, help="model name on the endpoint (openai) or a folder / hub id (vllm)")
    g = p.add_argument_group("openai backend")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="endpoint root including /v1")
    g.add_argument("--api", choices=["chat", "completions"], default="chat",
                   help="chat: TEACHER_PROMPT as a user message; completions: the r1_zero prompt as raw text")
    g.add_argument("--api-key-env", default="", help="env var holding the API key ('' = none, local vLLM)")
    g.add_argument("--max-concurrency", type=int, default=16, help="requests in flight")
    g.add_argument("--max-retries", type=int, default=5, help="retries of a failed request (with backoff)")
    g.add_argument("--timeout-s", type=float, default=600.0, help="seconds per request")
    g.add_argument("--cache", default="", help="request cache, JSON Lines (default: OUTPUT.cache.jsonl)")
    g.add_argument("--extra-body", default="{}",
                   help='JSON merged into every request, e.g. \'{"include_stop_str_in_output": true}\' for vLLM')
    g = p.add_argument_group("vllm backend")
    g.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto", help="utils.inference.make_engine")
    g.add_argument("--dtype", default="auto", help="auto = the checkpoint's dtype")
    g.add_argument("--max-model-len", type=int, default=0, help="0 = the model's own limit")
    g.add_argument("--prompt-format", choices=["auto", "chat", "raw"], default="auto",
                   help="auto = chat if the tokenizer has a chat template (not the --prompt-file prompt itself), "
                        "else raw")
    g.add_argument("--chunk-size", type=int, default=512, help="prompts per generate call (output written after each)")
    return p.parse_args(argv)


def problem_id(problem: str) -> str:
    return hashlib.sha1(problem.encode("utf-8")).hexdigest()[:16]


def load_problems(path: str, limit: int) -> list[dict]:
    """Problems with ids, repeated problems dropped (one line printed when any are)."""
    records = load_reason_records(path, require_response=False)
    if limit >= 0:
        records = records[:limit]
    out, seen = [], set()
    for rec in records:
        pid = problem_id(rec["problem"])
        if pid not in seen:
            seen.add(pid)
            out.append({"problem_id": pid, "problem": rec["problem"], "expected_answer": rec["expected_answer"]})
    if len(out) < len(records):
        print(f"{path}: {len(records) - len(out)} repeated problems skipped")
    return out


def load_done(path: Path) -> set[tuple[str, int]]:
    """(problem_id, sample_index) of the samples already in the output. A torn last line is cut off."""
    done: set[tuple[str, int]] = set()
    if not path.exists():
        return done
    with open(path, "rb") as f:
        lines = f.readlines()
    good_bytes = 0
    for line_no, raw in enumerate(lines, start=1):
        try:
            if raw.strip():
                rec = json.loads(raw)
                done.add((rec["problem_id"], int(rec["sample_index"])))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            if line_no == len(lines) and not raw.endswith(b"\n"):
                print(f"{path}:{line_no}: dropping a partial last line (interrupted write)")
                os.truncate(path, good_bytes)
                break
            raise ValueError(f"{path}:{line_no}: not a sample record (needs problem_id and sample_index)") from None
        good_bytes += len(raw)
    return done


def choose_template(args, chat: bool) -> str:
    if args.prompt_file:
        template = load_prompt(args.prompt_file)
    else:
        template = TEACHER_PROMPT if chat else load_prompt("r1_zero")
    if "{question}" not in template:
        raise SystemExit(f"--prompt-file {args.prompt_file}: the template has no {{question}} slot")
    return template


def chat_template_is_prompt(tokenizer, template: str) -> bool:
    """Whether the tokenizer's chat template, given the bare question, renders exactly `template` with it: a
    checkpoint trained by this repo carries its training prompt as its chat template (utils.serving)."""
    probe = "<<the question>>"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
    except Exception:  # a template that refuses the probe message cannot be the prompt itself
        return False
    return rendered == template.replace("{question}", probe)


def check_settings(args, out: Path, template: str | None = None, rendered_as: str | None = None) -> None:
    """Refuse to resume `out` with sampling settings other than those saved next to it; with a template (the
    prompt actually sent), compare it too and save the settings. `rendered_as` ("chat" or "raw", what
    --prompt-format auto chose) is compared when the saved settings have it (files from before it was saved do not)."""
    settings = {k: getattr(args, k) for k in SAMPLE_SETTINGS}
    if template is not None:
        settings["prompt_sha1"] = hashlib.sha1(template.encode()).hexdigest()
    if rendered_as is not None:
        settings["prompt_rendered_as"] = rendered_as
    path = out.with_name(out.name + ".config.json")
    if path.exists() and out.exists():
        saved = json.loads(path.read_text())
        changed = [k for k in settings if saved.get(k) != settings[k] and (k in saved or k != "prompt_rendered_as")]
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise SystemExit(f"{out} was made with other settings ({diff}); use another --output or the same flags")
    if template is not None:
        write_json(path, {**settings, "prompt": template})


def sample_record(problem: dict, j: int, model: str, text: str, finish_reason: str | None, reasoning=None) -> dict:
    rec = {"problem_id": problem["problem_id"], "sample_index": j, "problem": problem["problem"],
           "expected_answer": problem["expected_answer"], "teacher": model, "text": text,
           "finish_reason": finish_reason}  # fmt: skip
    if reasoning:
        rec["reasoning"] = reasoning  # a reasoning model's hidden chain of thought, kept for inspection
    return rec


def run_openai(args, problems: list[dict], todo: list[tuple[int, int]], out: Path) -> dict:
    """Ask the endpoint for each (problem, sample) in `todo`; append records as answers arrive."""
    from utils.openai_client import EndpointError, OpenAICompatClient

    template = choose_template(args, chat=args.api == "chat")
    check_settings(args, out, template)
    client = OpenAICompatClient(
        args.base_url, args.model, api_key_env=args.api_key_env, max_concurrency=args.max_concurrency,
        max_retries=args.max_retries, timeout_s=args.timeout_s,
        cache_path=args.cache or out.with_name(out.name + ".cache.jsonl"),
    )  # fmt: skip
    try:
        served = client.check_server()  # fail in seconds, naming the URL, rather than after a round of retries
    except EndpointError as e:
        raise SystemExit(str(e)) from None
    if served is not None and args.model not in served:
        raise SystemExit(f"{args.base_url} does not serve --model {args.model!r}; it serves {served}")
    base = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens, **args.extra_body}
    if args.stop:
        base["stop"] = args.stop
    requests = []
    for p_idx, j in todo:
        prompt = template.replace("{question}", problems[p_idx]["problem"])
        body = {"messages": [{"role": "user", "content": prompt}]} if args.api == "chat" else {"prompt": prompt}
        requests.append({**body, **base, "seed": args.seed + j})

    errors = []

    def write(i: int, result: dict) -> None:
        if "error" in result:
            errors.append(result["error"])
            return
        p_idx, j = todo[i]
        o = result["outputs"][0]
        record = sample_record(problems[p_idx], j, args.model, o["text"], o["finish_reason"], o.get("reasoning"))
        append_jsonl(out, record)

    try:
        client.run(requests, on_error="return", on_result=write, desc="teacher")
    except EndpointError as e:
        raise SystemExit(f"{e}\nanswers received so far are saved; re-run the same command to continue") from None
    if errors:
        print(f"{len(errors)} requests rejected, e.g. {errors[0]}")
    return client.last_stats


def run_vllm(args, problems: list[dict], todo: list[tuple[int, int]], out: Path) -> dict:
    """Generate offline with utils.inference; samples missing per problem are generated together (n = missing)."""
    from tqdm import tqdm

    from utils.inference import SamplingConfig, make_engine

    engine = make_engine(args.model, engine=args.engine, seed=args.seed, dtype=args.dtype,
                         max_model_len=args.max_model_len or None)  # fmt: skip
    has_template = bool(getattr(engine.tokenizer, "chat_template", None))
    chat = args.prompt_format == "chat" or (args.prompt_format == "auto" and has_template)
    if chat and not has_template:
        raise SystemExit(f"--prompt-format chat: the tokenizer of {args.model} has no chat template")
    template = choose_template(args, chat=chat)
    if args.prompt_format == "auto":
        why = "the tokenizer has a chat template" if has_template else "the tokenizer has no chat template"
        if chat and args.prompt_file and chat_template_is_prompt(engine.tokenizer, template):
            chat, why = False, "the chat template is the --prompt-file prompt itself: chat would frame it twice"
        print(f"prompt format: {'chat' if chat else 'raw'} ({why})")
    check_settings(args, out, template, rendered_as="chat" if chat else "raw")

    def prompt_text(problem: str) -> str:
        text = template.replace("{question}", problem)
        if chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                        add_generation_prompt=True)  # fmt: skip
        return text

    missing: dict[int, list[int]] = {}
    for p_idx, j in todo:
        missing.setdefault(p_idx, []).append(j)
    by_count: dict[int, list[int]] = {}  # one SamplingConfig (n) per group
    for p_idx, js in missing.items():
        by_count.setdefault(len(js), []).append(p_idx)
    bar = tqdm(total=len(todo), desc="teacher")
    for n, p_indices in sorted(by_count.items()):
        # The engine seeds itself once (make_engine(seed=...)): a per-request seed kills the vLLM 0.32 CPU engine.
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                  stop=list(args.stop), include_stop_str_in_output=True, n=n)  # fmt: skip
        for s in range(0, len(p_indices), args.chunk_size):
            chunk = p_indices[s : s + args.chunk_size]
            outs = engine.generate([prompt_text(problems[i]["problem"]) for i in chunk], sampling, use_tqdm=False)
            records = []
            for p_idx, completions in zip(chunk, outs):
                for j, c in zip(missing[p_idx], completions):
                    records.append(sample_record(problems[p_idx], j, args.model, c.text, c.finish_reason))
            append_jsonl(out, records)
            bar.update(len(records))
    bar.close()
    engine.close()
    return {"requests": len(todo), "cached": 0, "sent": len(todo), "failed": 0}


def summarize(out: Path, problems: list[dict], k: int) -> dict:
    """Counts over the whole output file (this run and earlier ones) for the selected problems."""
    wanted = {p["problem_id"] for p in problems}
    finish, with_answer, samples = Counter(), 0, set()
    with open(out, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["problem_id"] not in wanted or rec["sample_index"] >= k:
                continue
            samples.add((rec["problem_id"], rec["sample_index"]))
            finish[str(rec["finish_reason"])] += 1
            with_answer += "<answer>" in rec["text"] and "</answer>" in rec["text"]
    return {"samples": len(samples), "expected": len(problems) * k, "finish_reason": dict(finish),
            "with_answer_tags": with_answer}  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    """Generate the missing samples and return {"run": client/engine counts, "output": counts over the file}."""
    if args.k < 1:
        raise SystemExit(f"--k must be >= 1, got {args.k}")
    if args.backend == "vllm" and args.api != "chat":
        raise SystemExit("--api applies to --backend openai; use --prompt-format with --backend vllm")
    if args.backend == "openai" and args.prompt_format != "auto":
        raise SystemExit("--prompt-format applies to --backend vllm; use --api with --backend openai")
    try:
        args.extra_body = json.loads(args.extra_body) if isinstance(args.extra_body, str) else args.extra_body
    except json.JSONDecodeError as e:
        raise SystemExit(f"--extra-body: not JSON ({e})") from None
    problems = load_problems(args.problems, args.limit)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_settings(args, out)  # before anything is loaded; the prompt is compared once the backend has chosen it
    done = load_done(out)
    todo = [(i, j) for i, p in enumerate(problems) for j in range(args.k) if (p["problem_id"], j) not in done]
    print(f"{len(problems):,} problems x {args.k} samples = {len(problems) * args.k:,}; "
          f"{len(problems) * args.k - len(todo):,} already in {out}, {len(todo):,} to generate")  # fmt: skip
    run = {"requests": 0, "cached": 0, "sent": 0, "failed": 0}
    if todo:
        run = (run_openai if args.backend == "openai" else run_vllm)(args, problems, todo, out)
    stats = summarize(out, problems, args.k) if out.exists() else {"samples": 0}
    print(f"run: {run}")
    print(f"{out}: {stats}")
    if run["failed"]:
        print(f"{run['failed']} requests were rejected by the server and not written; re-run to retry them")
    return {"run": run, "output": stats}


if __name__ == "__main__":
    main(parse_args())
