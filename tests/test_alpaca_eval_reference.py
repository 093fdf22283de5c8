"""AlpacaEval under the reference protocol, end to end: the tiny model generates, the `alpaca_eval` package judges
through a local fake OpenAI-compatible server (127.0.0.1) that answers in the ranking format, and the summary holds the
package's leaderboard numbers.

The fake judge prefers, of the two answers it is shown, the one whose sha256 is smaller: a rule that does not depend on
which answer the package puts first, so the expected win rate is known without the package. The package's
length-controlled fit reads `df_gamed.csv` from the Hugging Face Hub at run time; here a local stand-in sits in a
hub cache folder the package's subprocess is pointed at (HF_HUB_CACHE, HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evaluate_instruct import main, parse_args
from utils.helper_fns import REPO_ROOT, read_jsonl

pytest.importorskip("alpaca_eval", reason="the reference AlpacaEval protocol needs the alpaca_eval package")

ALPACA = str(REPO_ROOT / "data" / "eval_configs" / "alpaca_eval.yaml")
SAMPLE = REPO_ROOT / "data" / "sft-instruct" / "eval" / "sample_alpaca_eval.json"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _answers(user_message: str) -> tuple[str, str]:
    """The two answers of the package's ranking prompt: `"answer": \"\"\"...\"\"\"` for model_1, then model_2."""
    parts = user_message.split('"answer": """')
    return parts[1].split('"""')[0], parts[2].split('"""')[0]


class RankingServer:
    """OpenAI-compatible chat endpoint answering the ranking prompt in its format (smaller sha256 ranks first)."""

    def __init__(self):
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                first, second = _answers(body["messages"][-1]["content"])
                rank_1 = 1 if _sha(first) < _sha(second) else 2
                text = f"[{{'model': 'model_1', 'rank': {rank_1}}}, {{'model': 'model_2', 'rank': {3 - rank_1}}}]"
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})  # fmt: skip

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def ranking_server():
    s = RankingServer()
    yield s
    s.close()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """A Hugging Face hub cache holding a stand-in `tatsu-lab/alpaca_eval` `df_gamed.csv` (two "gamed" baselines over
    instructions 0..9 with the columns the package's length-controlled fit reads), for the package's subprocess."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    rng = random.Random(0)
    with open(repo / "snapshots" / commit / "df_gamed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "index", "instruction_difficulty", "preference", "std_delta_len", "not_gamed_baseline"])
        for model in ("gamed_verbose", "gamed_concise"):
            for i in range(10):
                z = rng.uniform(-2, 2)
                w.writerow([model, i, round(0.1 * i - 0.4, 3), round(rng.uniform(0.05, 0.95), 3), round(z, 3), False])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_reference_alpaca_eval_runs_the_package_against_a_local_judge(tiny_qwen_dir, ranking_server, offline_hub,
                                                                      tmp_path):  # fmt: skip
    out = tmp_path / "eval"
    argv = ["--config", ALPACA, "--sample-data", "--model", str(tiny_qwen_dir), "--engine", "hf", "--max-tokens", "16",
            "--output-dir", str(out), "--no-progress", "--judge-base-url", ranking_server.url,
            "--judge-model", "fake-judge"]  # fmt: skip
    summary = main(parse_args(argv))["alpaca_eval"]
    m = summary["metrics"]
    folder = out / "alpaca_eval"

    # What the package was given: our outputs, and the GPT-4 Turbo reference outputs of the same instructions.
    outputs = json.loads((folder / "model_outputs.json").read_text())
    references = json.loads((folder / "reference_outputs.json").read_text())
    assert references == json.loads(SAMPLE.read_text())
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in references]

    # Win rate known from the judge's rule alone: the model wins where its answer's sha256 is the smaller.
    wins = [_sha(o["output"]) < _sha(r["output"]) for o, r in zip(outputs, references)]
    assert 0 < sum(wins) < 5  # both outcomes occur, so the mapping of positions back to models is exercised
    assert m["method"] == "alpaca_eval_package" and m["approximation"] is False
    assert m["win_rate"] == pytest.approx(sum(wins) / 5) and (m["n_wins"], m["n_losses"], m["n_total"]) == (
        sum(wins), 5 - sum(wins), 5)  # fmt: skip
    judgments = read_jsonl(folder / "judgments.jsonl")
    assert [j["model_wins"] for j in judgments] == wins
    assert [j["preference"] for j in judgments] == [2.0 if w else 1.0 for w in wins]

    # The headline numbers are the package's leaderboard row (percent there, fractions here).
    with open(folder / "alpaca_eval_package" / "leaderboard.csv", newline="") as f:
        [row] = list(csv.DictReader(f))
    assert row[""] == tiny_qwen_dir.name
    assert m["lc_win_rate"] == pytest.approx(float(row["length_controlled_winrate"]) / 100)
    assert m["win_rate"] == pytest.approx(float(row["win_rate"]) / 100) and 0.0 <= m["lc_win_rate"] <= 1.0
    assert m["package_seed"] == 1337 and m["package_version"] and m["annotator"] == "ranking_fake-judge"

    # The requests: the package's standard ranking prompt as chat messages, greedy, 100 tokens, one pair each.
    import alpaca_eval

    prompt = (Path(alpaca_eval.__file__).parent / "evaluators_configs/alpaca_eval_gpt4/alpaca_eval.txt").read_text()
    system = prompt.split("<|im_start|>system\n")[1].split("\n<|im_end|>")[0]
    assert len(ranking_server.requests) == 5
    for req in ranking_server.requests:
        assert req["path"] == "/v1/chat/completions" and req["model"] == "fake-judge"
        assert (req["temperature"], req["top_p"], req["max_tokens"]) == (0.0, 1.0, 100)
        assert [msg["role"] for msg in req["messages"]] == ["system", "user"]
        assert req["messages"][0]["content"] == system
        assert "Please rank the models based on which responses would be preferred by humans" in (
            req["messages"][1]["content"])  # fmt: skip
    shown = [_answers(req["messages"][1]["content"]) for req in ranking_server.requests]
    model_first = sum(pair[0] in {o["output"] for o in outputs} for pair in shown)
    assert model_first + sum(pair[1] in {o["output"] for o in outputs} for pair in shown) == 5

    # The summary says how the numbers were made; max_tokens 16 is a recorded deviation from the published 1024.
    assert summary["protocol"] == "reference"
    assert summary["protocol_deviations"] == {"max_tokens": {"published": 1024, "used": 16}}
    assert summary["settings"]["max_model_len"] == 2048 and summary["settings"]["stop"] == ["```"]
    assert (summary["settings"]["judge_max_tokens"], summary["settings"]["package_seed"]) == (100, 1337)
    judge = summary["judge"]
    assert (judge["model"], judge["max_tokens"], judge["top_p"]) == ("fake-judge", 100, 1.0)

    # Rerun: nothing generated, nothing sent (the package's annotation cache), the same numbers.
    again = main(parse_args(argv))["alpaca_eval"]
    assert len(ranking_server.requests) == 5 and again["throughput"]["examples_generated"] == 0
    assert again["metrics"]["win_rate"] == m["win_rate"] and again["metrics"]["lc_win_rate"] == m["lc_win_rate"]


def test_reference_alpaca_eval_refuses_other_reference_outputs(tmp_path):
    davinci = [{**r, "generator": "text_davinci_003"} for r in json.loads(SAMPLE.read_text())]
    data = tmp_path / "alpaca_eval.json"
    data.write_text(json.dumps(davinci))
    argv = ["--config", ALPACA, "--data", str(data), "--model", str(tmp_path / "no-model"), "--output-dir",
            str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit, match=r"reference outputs by \['text_davinci_003'\].*'gpt4_1106_preview'"):
        main(parse_args(argv))  # before any model loads: the model folder does not exist
    sample = argv[:2] + ["--sample-data"] + argv[4:]
    with pytest.raises(SystemExit, match="generator name 'gpt4_1106_preview' is the reference outputs' own"):
        main(parse_args(sample + ["--generator", "gpt4_1106_preview"]))
    with pytest.raises(SystemExit, match="--judge-extra-body with --protocol reference"):
        main(parse_args(sample + ["--judge-extra-body", '{"structured_outputs": {"choice": ["1", "2"]}}']))
