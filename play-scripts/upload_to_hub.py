"""Publish a checkpoint (or a dataset folder) to the Hugging Face hub, with a model card generated from its run.

    # see exactly what would go up, and the card, without a token or a network
    python play-scripts/upload_to_hub.py results/demo/checkpoints/latest --repo-id me/qwen-math-sft --dry-run
    # upload (private unless --public); the token comes from the environment only
    HF_TOKEN=... python play-scripts/upload_to_hub.py results/demo/checkpoints/latest --repo-id me/qwen-math-sft

What goes up: the model and tokenizer files of the checkpoint folder (config, weights, tokenizer, chat template,
generation config) and a generated README.md model card. What never goes up: resume state (`trainer_state.pt`, a
`trainer_state/` folder: optimizer moments and RNG states), lock and temp files. The card names the base model, the
run's settings (`<run>/config.json`), the data files with their sizes and SHA-256, and the metrics logged up to the
checkpoint's step (`<run>/metrics.jsonl`). A dataset folder (`--repo-type dataset`) uploads its data files and a card.
A README.md in the folder is replaced by the generated card. The local folder is only read, never changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.helper_fns import file_sha256  # noqa: E402

# never uploaded: resume state, locks, temp and probe files, caches
EXCLUDED = re.compile(r"(^|/)(trainer_state(\.pt|/.*)|optimizer.*\.pt|rng.*\.pt|\.lock|\.write_probe|.*\.tmp(/.*)?|"
                      r"__pycache__/.*|\.cache/.*|README\.md)$")  # fmt: skip
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".txt", ".md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="checkpoint folder (e.g. <run>/checkpoints/latest) or dataset folder")
    p.add_argument("--repo-id", required=True, help="hub repository, e.g. user/name")
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model", help="what the folder holds")
    p.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    p.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    p.add_argument("--commit-message", default="", help="hub commit message (default: names the run and step)")
    p.add_argument("--token-env", default="HF_TOKEN", help="environment variable that holds the hub token")
    return p.parse_args(argv)


def files_to_upload(folder: Path) -> list[Path]:
    """Files under `folder` (links followed), relative paths sorted, without the EXCLUDED ones."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not EXCLUDED.search(rel):
            out.append(Path(rel))
    return out




def run_context(folder: Path) -> dict:
    """What the card says about the run: its config and the metrics up to this checkpoint's step, when the folder
    sits in a run (`<run>/checkpoints/step_XXXXXX`); empty otherwise."""
    folder = folder.resolve()
    match = re.fullmatch(r"step_(\d+)", folder.name)
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else None
    if run_dir is None or not (run_dir / "config.json").exists():
        return {}
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    step = int(match.group(1)) if match else None
    last: dict[str, tuple[int, float]] = {}
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a run still writing
            if step is not None and row.get("step", 0) > step:
                continue
            for k, v in row.items():
                if "/" in k and isinstance(v, (int, float)):
                    last[k] = (row["step"], v)
    data = {}
    for key in ("train_file", "val_file", "test_file"):
        if config.get(key):
            path = Path(config[key])
            data[key] = {"path": config[key], **({"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                                                 if path.is_file() else {"note": "not on this machine"})}  # fmt: skip
    return {"run_dir": run_dir.name, "step": step, "config": config, "metrics": last, "data": data}


def model_card(folder: Path, repo_id: str, repo_type: str, context: dict) -> str:
    """The README.md text: front matter, what the model is, the run's data, metrics and full settings."""
    config = context.get("config", {})
    base = config.get("model", "")
    lines = ["---"]
    if repo_type == "model":
        lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "- sft"]
        if base and base != "tiny" and not Path(base).exists():
            lines += [f"base_model: {base}"]
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", ""]
    if repo_type == "dataset":
        lines += [f"Data files from `{folder.name}`: see the file list of this repository.", ""]
        return "\n".join(lines)
    kind = "reasoning SFT (r1_zero format)" if "prompt_template" in config else "instruction SFT"
    if context:
        lines += [f"Supervised fine-tuning ({kind}) of `{base}`, run `{context['run_dir']}`, checkpoint at step "
                  f"{context['step']}.", ""]  # fmt: skip
    else:
        lines += ["A model folder uploaded without its run folder: no training settings or metrics are known.", ""]
    if ((folder / "tokenizer_config.json").exists()
            and "chat_template" in (folder / "tokenizer_config.json").read_text()):
        lines += ["The prompt format the model was trained on is its tokenizer's `chat_template`.", ""]
    if context.get("data"):
        lines += ["## Data", "", "| role | file | bytes | sha256 |", "|---|---|---|---|"]
        for key, d in context["data"].items():
            lines.append(f"| {key} | `{d['path']}` | {d.get('bytes', '-')} | {d.get('sha256', d.get('note', '-'))} |")
        lines.append("")
    if context.get("metrics"):
        lines += ["## Metrics (last value logged at or before this step)", "", "| metric | step | value |",
                  "|---|---|---|"]  # fmt: skip
        for k, (s, v) in sorted(context["metrics"].items()):
            lines.append(f"| {k} | {s} | {v:.6g} |")
        lines.append("")
    if config:
        lines += ["## Training settings (the run's config.json)", "", "```json",
                  json.dumps(config, indent=2, sort_keys=True), "```", ""]  # fmt: skip
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise SystemExit(f"{folder}: not a folder")
    if args.repo_type == "model" and not (folder / "config.json").exists():
        raise SystemExit(f"{folder}: no config.json, not a model folder (use --repo-type dataset for data)")
    files = files_to_upload(folder)
    if args.repo_type == "dataset":
        files = [f for f in files if f.suffix in DATA_SUFFIXES]
    if not files:
        raise SystemExit(f"{folder}: nothing to upload")
    context = run_context(folder) if args.repo_type == "model" else {}
    card = model_card(folder, args.repo_id, args.repo_type, context)
    message = args.commit_message or (f"Upload {context['run_dir']} step {context['step']}" if context
                                      else f"Upload {folder.name}")  # fmt: skip
    visibility = "public" if args.public else "private"
    total = sum((folder / f).stat().st_size for f in files)
    print(f"{'would upload' if args.dry_run else 'uploading'} to {args.repo_type} {args.repo_id} ({visibility}): "
          f"{len(files) + 1} files, {total / 2**20:.1f} MiB")  # fmt: skip
    for f in files:
        print(f"  {f.as_posix()}  ({(folder / f).stat().st_size:,} bytes)")
    print("  README.md  (generated model card)")
    result = {"files": [f.as_posix() for f in files] + ["README.md"], "card": card, "private": not args.public}
    if args.dry_run:
        print("\n" + card)
        return result
    token = os.environ.get(args.token_env, "")
    if not token:
        raise SystemExit(f"no hub token: set {args.token_env} in the environment (the token is read from there only)")
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(args.repo_id, repo_type=args.repo_type, private=not args.public, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(folder / f)) for f in files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        commit = api.create_commit(args.repo_id, operations=operations, commit_message=message,
                                   repo_type=args.repo_type)  # fmt: skip
    except OSError as e:  # requests' connection errors are OSErrors: no network, DNS, offline mode
        raise SystemExit(f"hub upload to {args.repo_id} failed: {type(e).__name__}: {e}") from None
    print(f"uploaded: {getattr(commit, 'commit_url', commit)}")
    result["commit"] = str(getattr(commit, "commit_url", commit))
    return result


if __name__ == "__main__":
    main(parse_args())
