"""Data through `datasets` (utils/data_sources.py): Parquet trains exactly as JSONL, hub ids are named by split and
row in errors, and hub access fails fast and clearly offline."""

import json
from pathlib import Path

import pytest

from utils.data_sources import is_hub_id, load_records
from utils.helper_fns import load_records as load_json_records

REPO = Path(__file__).resolve().parent.parent


def _to_parquet(jsonl: Path, out: Path) -> Path:
    import datasets

    datasets.Dataset.from_list([json.loads(line) for line in jsonl.read_text().splitlines()]).to_parquet(str(out))
    return out


def _rows(run_dir: Path, prefix: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if any(k.startswith(prefix) for k in r)}


@pytest.mark.parametrize("source, hub", [
    ("openai/gsm8k", True), ("tatsu-lab/alpaca", True), ("squad", True),
    ("data/demo/train.jsonl", False), ("missing/train.jsonl", False), ("x/y.parquet", False),
    ("data/sft-reason/val.jsonl", False), ("data", False), ("./rel/path", False), ("a/b/c", False),
])  # fmt: skip
def test_hub_ids_are_told_from_paths(source, hub):
    assert is_hub_id(source) == hub


def test_local_json_keeps_its_reader_and_parquet_gives_the_same_records(tmp_path):
    src = REPO / "data" / "sft-instruct" / "sample_train.jsonl"
    assert load_records(src) == load_json_records(src)  # file:line locations and all
    parquet = load_records(_to_parquet(src, tmp_path / "train.parquet"))
    assert [r for _, r in parquet] == [r for _, r in load_json_records(src)]
    assert parquet[1][0] == f"{tmp_path / 'train.parquet'}[row 1]"


def test_instruct_parquet_trains_identically_to_jsonl(tmp_path):
    import train_sft_instruct as T

    src = REPO / "data" / "sft-instruct" / "sample_train.jsonl"
    parquet = _to_parquet(src, tmp_path / "sample_train.parquet")
    runs = {}
    for name, train in (("jsonl", src), ("parquet", parquet)):
        args = T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / name),
                             "--run-name", name, "--train-file", str(train), "--max-steps", "3", "--eval-every", "3"])
        runs[name] = Path(T.main(args)["run_dir"])
    a, b = _rows(runs["jsonl"], "train/"), _rows(runs["parquet"], "train/")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step]["train/loss"] == b[step]["train/loss"]
        assert a[step]["train/grad_norm"] == b[step]["train/grad_norm"]
    assert _rows(runs["jsonl"], "eval/")[3]["eval/test_loss"] == _rows(runs["parquet"], "eval/")[3]["eval/test_loss"]


def test_reason_parquet_trains_identically_to_jsonl(tmp_path):
    import train_sft_reason as T

    src = REPO / "data" / "demo" / "train.jsonl"
    parquet = _to_parquet(src, tmp_path / "train.parquet")
    runs = {}
    for name, train in (("jsonl", src), ("parquet", parquet)):
        args = T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--eval-every", "-1",
                             "--run-name", name, "--train-file", str(train), "--max-steps", "3"])
        runs[name] = Path(T.main(args)["run_dir"])
    a, b = _rows(runs["jsonl"], "train/"), _rows(runs["parquet"], "train/")
    assert sorted(a) == [1, 2, 3]
    assert [a[s]["train/loss"] for s in a] == [b[s]["train/loss"] for s in a]


def test_hub_records_are_located_by_split_and_row(monkeypatch, tiny_llama_tokenizer):
    """A hub dataset (here `datasets.load_dataset` answering from memory: nothing is downloaded in tests) gets the
    same validation as a file, its errors naming the id, config, split and row."""
    import datasets

    from utils.dataloader import load_reason_records
    from utils.instruct_dataset import PackedSFTDataset

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        rows = [{"prompt": "Say hi.", "response": "Hi.", "problem": "1+1?", "answer": "2"},
                {"prompt": "Say bye.", "response": None, "problem": "2+2?", "answer": None}]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(ValueError, match=r"^someorg/sft-data\[main/train\]\[row 1\]: record has no 'response' field"):
        PackedSFTDataset(tiny_llama_tokenizer, "someorg/sft-data", seq_length=8, shuffle=False, use_cache=False,
                         split="train", config="main")
    with pytest.raises(ValueError, match=r"^someorg/math\[test\]\[row 1\]: record has no 'expected_answer'"):
        load_reason_records("someorg/math", require_response=False, split="test")
    assert calls == [("someorg/sft-data", "main", "train"), ("someorg/math", None, "test")]


def test_hub_id_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    import train_sft_instruct as T

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"someorg/sft-data\[validation\]: cannot load this hub dataset .*OFFLINE"):
        load_records("someorg/sft-data", split="validation")
    args = T.parse_args(["--preset", "demo", "--output-dir", str(tmp_path), "--train-file", "someorg/sft-data"])
    T.check_args(args)  # a hub id is not a missing file
    with pytest.raises(SystemExit, match=r"data error: someorg/sft-data\[train\]: cannot load"):
        T.main(args)
    assert not (tmp_path / "instruct_demo" / "base_model").exists()  # refused before a model was built


def test_evaluation_scripts_read_parquet_and_hub_splits(tmp_path, monkeypatch):
    import datasets

    import evaluate_instruct as EI
    import evaluate_reason as ER
    from utils.benchmarks import REGISTRY

    src = REPO / "data" / "sft-reason" / "sample_val.jsonl"
    math = REGISTRY["math"](prompt_template="{question}")
    from_parquet = math.load_examples(_to_parquet(src, tmp_path / "val.parquet"))
    assert from_parquet == math.load_examples(src) and len(from_parquet) == 20

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
                                           {"question": "", "answer": "#### 1"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    gsm8k = EI.build_benchmark(EI.parse_args(["--config", "data/eval_configs/gsm8k.yaml", "--model", "m"]).runs[0])
    gsm8k.data_split, gsm8k.data_config = "test", "main"
    with pytest.raises(ValueError, match=r"^openai/gsm8k\[main/test\]\[row 1\]: 'question' must be a non-empty"):
        gsm8k.load_examples("openai/gsm8k")
    assert calls == [("openai/gsm8k", "main", "test")]
    from utils.benchmarks.base import generation_settings
    from utils.inference import SamplingConfig

    settings = generation_settings(gsm8k, "m", "openai/gsm8k", SamplingConfig())
    assert settings["data_split"] == "test" and settings["data_config"] == "main"  # a resume on another split refuses
    assert "data_split" not in generation_settings(gsm8k, "m", src, SamplingConfig())  # local files: as before

    mmlu = EI.parse_args(["--config", "data/eval_configs/mmlu.yaml", "--model", "m", "--data", "cais/mmlu"]).runs[0]
    with pytest.raises(SystemExit, match="mmlu reads CSV files"):
        EI.check_run(mmlu)
    monkeypatch.undo()  # the real loader again, offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ER.parse_args(["--model", "someorg/model", "--data", "someorg/math", "--data-split", "validation",
                          "--output-dir", str(tmp_path / "eval")])
    with pytest.raises(SystemExit, match=r"--data: someorg/math\[validation\]: cannot load .*HF_HUB_OFFLINE"):
        ER.main(args)
