"""AlpacaEval scored by the `alpaca_eval` package (PyPI `alpaca-eval`) as published: the reference protocol.

    folder = write_annotator_config(out / "alpaca_eval_annotator", "meta-llama/Llama-3.3-70B-Instruct", url)
    row, annotations = run_alpaca_eval_package(out / "model_outputs.json", out / "reference_outputs.json", folder,
                                               out / "alpaca_eval_package", api_key_env="")

The annotator is the standard AlpacaEval pairwise ranking prompt, the package's own file
(`evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt`: ChatML, rank two answers, reply with a Python list of
`{'model', 'rank'}`), sent through the package's `openai_completions` to any OpenAI-compatible endpoint (ChatML turned
into chat messages), greedy (temperature 0, top_p 1), max_tokens 100, one pair per request, read by `ranking_parser`.
The package then runs as its CLI does (`alpaca_eval --model_outputs ... --reference_outputs ... --annotators_config
... --seed 1337`) in a subprocess, and its leaderboard gives `win_rate` and `length_controlled_winrate` (percent).

The package's length-controlled fit downloads `df_gamed.csv` from the `tatsu-lab/alpaca_eval` dataset on the Hugging
Face Hub at run time (a machine with internet needs nothing; offline, point HF_HUB_CACHE at a cache holding it and
set HF_HUB_OFFLINE=1). Two arguments are added to the published command, neither changes a number:
`metric_kwargs={'save_weights_dir': None}` keeps the package from writing the fitted weights into its own install
folder, and `caching_path=None` turns off its annotation cache, whose reload fails under pandas 3.1 (an int64
`preference` column read back from JSON refuses the 1.5 of a tie). Instead, a finished run is not repeated: its inputs'
hashes are kept in `inputs.json`, and the same inputs reuse its leaderboard and annotations.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

PACKAGE_PROMPT = ("evaluators_configs", "alpaca_eval_gpt4", "alpaca_eval.txt")  # inside the installed package
PACKAGE_SEED = 1337
JUDGE_MAX_TOKENS = 100
# What the package reports as percent; the summary keeps the fractions (as every other rate in this repo).
PERCENT_COLUMNS = {"win_rate": "win_rate", "standard_error": "standard_error",
                   "length_controlled_winrate": "lc_win_rate", "lc_standard_error": "lc_standard_error",
                   "discrete_win_rate": "discrete_win_rate"}  # fmt: skip


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alpaca-eval")
    except PackageNotFoundError:
        return None


def package_prompt_path() -> Path:
    """The standard pairwise ranking prompt as the installed package ships it.

    Raises:
        RuntimeError: the package is not installed, or its prompt file is missing.
    """
    import importlib.util

    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or spec.origin is None:
        raise RuntimeError("the reference AlpacaEval protocol needs the alpaca_eval package: pip install alpaca-eval "
                           "(pinned in requirements.txt)")  # fmt: skip
    path = Path(spec.origin).parent.joinpath(*PACKAGE_PROMPT)
    if not path.is_file():
        raise RuntimeError(f"alpaca_eval {package_version()} has no {'/'.join(PACKAGE_PROMPT)}")
    return path


def annotator_name(judge_model: str) -> str:
    """The annotator's name in its config: it keys the package's annotation cache, so another judge model re-judges."""
    from utils.benchmarks.eval_config import model_slug

    return f"ranking_{model_slug(judge_model)}"


def write_annotator_config(folder: str | os.PathLike, judge_model: str, base_url: str) -> Path:
    """Write the annotator config folder the package reads (`configs.yaml`) and its OpenAI client config.

    The client config holds the endpoint only; the API key reaches the package through OPENAI_API_KEY in the
    subprocess's environment (`run_alpaca_eval_package`), so no key is ever written to disk.

    Returns:
        the folder (pass it as `annotators_config`).
    """
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    client_config = folder / "openai_client.yaml"
    client_config.write_text(yaml.safe_dump({"default": [{"base_url": base_url}]}), encoding="utf-8")
    config = {
        annotator_name(judge_model): {
            "prompt_template": str(package_prompt_path()),
            "fn_completions": "openai_completions",
            "completions_kwargs": {
                "model_name": judge_model,
                "max_tokens": JUDGE_MAX_TOKENS,
                "temperature": 0.0,
                "top_p": 1.0,
                "requires_chatml": True,  # the prompt is ChatML; sent as system + user chat messages
                "client_config_path": str(client_config.resolve()),
            },
            "fn_completion_parser": "ranking_parser",
            "batch_size": 1,
        }
    }
    (folder / "configs.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder


def read_leaderboard_row(path: str | os.PathLike, generator: str) -> dict:
    """The row of `generator` in the package's leaderboard.csv, numbers as floats (percent, as written)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = {row[""]: row for row in csv.DictReader(f)}
    if generator not in rows:
        raise RuntimeError(f"{path}: no row for generator {generator!r} (rows: {sorted(rows)})")
    out: dict = {}
    for key, value in rows[generator].items():
        if key == "":
            continue
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def run_alpaca_eval_package(model_outputs: str | os.PathLike, reference_outputs: str | os.PathLike,
                            annotator_dir: str | os.PathLike, output_path: str | os.PathLike, api_key_env: str = "",
                            max_concurrency: int = 5, seed: int = PACKAGE_SEED) -> tuple[dict, list[dict]]:  # fmt: skip
    """Run `alpaca_eval evaluate` on one model's outputs and read its results.

    Args:
        model_outputs, reference_outputs: JSON arrays of `{instruction, output, generator, dataset}` (the package
            reads `.json`, not JSON Lines).
        annotator_dir: from `write_annotator_config`.
        output_path: where the package writes leaderboard.csv and annotations.json; its log goes to
            alpaca_eval.log there.
        api_key_env: environment variable holding the judge's API key ("" = a local server, key "EMPTY").
        max_concurrency: judge requests in flight (the package's OPENAI_MAX_CONCURRENCY).
        seed: the annotator seed (`--seed`); it decides which answer each pair shows first.

    Returns:
        (the generator's leaderboard row, percent as the package writes it; the package's annotations: one dict per
        pair with `instruction`, `output_1` (reference), `output_2` (model), `preference` (1 = reference preferred,
        2 = model, 1.5 = tie, None = unparsed) and `preference_raw_completion`).

    Raises:
        RuntimeError: the package failed (the message ends with its log's tail).
    """
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"model_outputs": _sha256(model_outputs), "reference_outputs": _sha256(reference_outputs),
              "annotator_config": _sha256(Path(annotator_dir) / "configs.yaml"),
              "client_config": _sha256(Path(annotator_dir) / "openai_client.yaml"), "seed": seed,
              "package_version": package_version()}  # fmt: skip
    results = [out / "leaderboard.csv", out / "annotations.json"]
    done = out / "inputs.json"
    generators = {r.get("generator") for r in json.loads(Path(model_outputs).read_text(encoding="utf-8"))}
    if len(generators) != 1:
        raise ValueError(f"{model_outputs}: expected one generator name, found {sorted(map(str, generators))}")
    if done.exists() and json.loads(done.read_text()) == inputs and all(p.exists() for p in results):
        print(f"alpaca_eval: {out} holds the package's results for these exact inputs; not run again")
        return _read_results(out, generators.pop())
    for path in [done, *results]:
        path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(OPENAI_API_KEY=os.environ[api_key_env] if api_key_env else "EMPTY",
               OPENAI_MAX_CONCURRENCY=str(max_concurrency), IS_ALPACA_EVAL_2="True")  # fmt: skip
    cmd = [sys.executable, "-m", "alpaca_eval.main", "evaluate",
           "--model_outputs", str(Path(model_outputs).resolve()),
           "--reference_outputs", str(Path(reference_outputs).resolve()),
           "--annotators_config", str(Path(annotator_dir).resolve()), "--seed", str(seed),
           "--output_path", str(out.resolve()), "--metric_kwargs", "{'save_weights_dir': None}",
           "--caching_path", "None"]  # fmt: skip
    log = out / "alpaca_eval.log"
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"alpaca_eval exited with {rc}; its log is {log}. Tail:\n{tail}")
    (out / "inputs.json").write_text(json.dumps(inputs, indent=2) + "\n", encoding="utf-8")
    return _read_results(out, generators.pop())


def _read_results(out: Path, generator: str) -> tuple[dict, list[dict]]:
    row = read_leaderboard_row(out / "leaderboard.csv", generator)
    annotations = json.loads((out / "annotations.json").read_text(encoding="utf-8"))
    return row, annotations


def _sha256(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leaderboard_metrics(row: dict) -> dict:
    """Summary metrics from a leaderboard row: rates as fractions (win_rate 0.0523 for the package's 5.23)."""
    metrics = {ours: row[theirs] / 100 for theirs, ours in PERCENT_COLUMNS.items()
               if isinstance(row.get(theirs), float)}  # fmt: skip
    counts = {"n_wins": "n_wins", "n_wins_base": "n_losses", "n_draws": "n_draws", "n_total": "n_total"}
    metrics.update({ours: int(row[theirs]) for theirs, ours in counts.items() if isinstance(row.get(theirs), float)})
    return metrics

