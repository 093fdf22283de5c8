"""OpenAICompatClient against a scripted stdlib HTTP server on 127.0.0.1: order, concurrency, cache, retries, errors.

The server is exact and fast where a real one cannot be (it fails on cue); the client against vLLM's own server is
exercised by tests/test_data_scripts.py through generate_traces.py.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port

from utils.openai_client import EndpointError, OpenAICompatClient, request_key


class FakeServer:
    """An OpenAI-compatible server whose answer depends on the request text.

    Text containing `status=CODExK` answers HTTP CODE to the first K identical requests, then 200; `reject` always
    answers 400; `slow` waits 0.2 s; `hang` waits 2 s. A 200 answer echoes the text with the sample index and seed.
    """

    def __init__(self):
        self.calls: list[dict] = []
        self.failures_left: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls.append({"path": self.path, **body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, body: dict) -> None:
                chat = self.path.endswith("/chat/completions")
                text = body["messages"][-1]["content"] if chat else body["prompt"]
                if "slow" in text:
                    time.sleep(0.2)
                if "hang" in text:
                    time.sleep(2.0)
                if "reject" in text:
                    return self._send(400, {"error": {"message": "prompt is too long", "type": "invalid_request"}})
                if "status=" in text:
                    code, count = text.split("status=")[1].split()[0].split("x")
                    key = json.dumps(body, sort_keys=True)
                    with server.lock:
                        left = server.failures_left.setdefault(key, int(count))
                        server.failures_left[key] = left - 1
                    if left > 0:
                        return self._send(int(code), {"error": {"message": f"scripted {code}"}})
                choices = []
                for j in range(body.get("n", 1)):
                    out = f"echo[{j}] seed={body.get('seed')} {text}"
                    choice = {"index": j, "finish_reason": "stop" if "long" not in text else "length"}
                    if chat:
                        choice["message"] = {"role": "assistant", "content": out, "reasoning_content": "hidden"}
                    else:
                        choice["text"] = out
                    choices.append(choice)
                usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
                obj = "chat.completion" if chat else "text_completion"
                self._send(200, {"id": "x", "object": obj, "created": 0, "model": body["model"], "choices": choices,
                                 "usage": usage})

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # the client hung up on a `hang` request after its timeout: expected

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def make_client(url: str, cache_path=None, **kw) -> OpenAICompatClient:
    kw = {"max_concurrency": 4, "max_retries": 3, "timeout_s": 5.0, "backoff_s": 0.01, **kw}
    return OpenAICompatClient(url, "fake-model", cache_path=cache_path, **kw)


def chat(text: str, **params) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 8, **params}


def test_results_in_order_for_chat_and_completion(server):
    client = make_client(server.url)
    requests = [chat(f"q{i}", seed=i) for i in range(6)] + [{"prompt": "p0", "temperature": 0.0}]
    results = client.run(requests, progress=False)
    assert [r["outputs"][0]["text"] for r in results[:6]] == [f"echo[0] seed={i} q{i}" for i in range(6)]
    assert results[6]["outputs"] == [{"text": "echo[0] seed=None p0", "finish_reason": "stop"}]
    assert results[0]["outputs"][0]["reasoning"] == "hidden"  # a reasoning model's separate chain of thought is kept
    assert results[0]["usage"]["completion_tokens"] == 5
    paths = sorted(c["path"] for c in server.calls)
    assert paths == ["/v1/chat/completions"] * 6 + ["/v1/completions"]
    # Body parameters pass through untouched; the client adds the model.
    assert {(c.get("seed"), c["model"], c["max_tokens"]) for c in server.calls if "messages" in c} == {
        (i, "fake-model", 8) for i in range(6)
    }


def test_on_result_sees_every_answer_once(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    make_client(server.url, cache).run([chat("a")], progress=False)
    seen = []
    results = make_client(server.url, cache).run(
        [chat("b"), chat("a"), chat("b"), {"prompt": "reject"}], on_error="return",
        on_result=lambda i, r: seen.append((i, r["cached"], "error" in r)), progress=False,
    )  # fmt: skip
    assert seen[0] == (1, True, False)  # the cached answer is reported first
    assert sorted(seen) == [(0, False, False), (1, True, False), (2, False, False), (3, False, True)]
    assert results[0] == results[2]


def test_n_samples_and_finish_reason(server):
    [result] = make_client(server.url).run([chat("long answer", n=3)], progress=False)
    assert [o["text"] for o in result["outputs"]] == [f"echo[{j}] seed=None long answer" for j in range(3)]
    assert {o["finish_reason"] for o in result["outputs"]} == {"length"}


def test_concurrency_is_bounded_and_used(server):
    client = make_client(server.url, max_concurrency=3)
    t0 = time.perf_counter()
    client.run([chat(f"slow {i}") for i in range(9)], progress=False)
    elapsed = time.perf_counter() - t0
    assert server.max_in_flight == 3
    assert elapsed < 9 * 0.2  # sequential would take 1.8 s


def test_cache_resends_only_missing_requests(server, tmp_path):
    cache = tmp_path / "cache" / "teacher.jsonl"
    first = make_client(server.url, cache).run([chat("a"), chat("b"), chat("a")], progress=False)
    assert len(server.calls) == 2  # the duplicate is sent once
    assert [r["cached"] for r in first] == [False, False, False]
    assert len(cache.read_text().splitlines()) == 2

    client = make_client(server.url, cache)  # a new process would start like this
    second = client.run([chat("a"), chat("c"), chat("b")], progress=False)
    assert len(server.calls) == 3 and server.calls[-1]["messages"][0]["content"] == "c"
    assert [r["cached"] for r in second] == [True, False, True]
    assert second[0]["outputs"] == first[0]["outputs"]
    assert client.last_stats == {"requests": 3, "cached": 2, "sent": 1, "failed": 0}
    # A different seed or model is a different question.
    client.run([chat("a", seed=1)], progress=False)
    OpenAICompatClient(server.url, "other-model", cache_path=cache).run([chat("a")], progress=False)
    assert len(server.calls) == 5
    entries = {e["key"]: e for e in map(json.loads, cache.read_text().splitlines())}
    assert entries[request_key("fake-model", chat("a"))]["request"] == chat("a")
    assert entries[request_key("other-model", chat("a"))]["model"] == "other-model"


def test_cache_drops_torn_last_line_and_rejects_corrupt_lines(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    make_client(server.url, cache).run([chat("a"), chat("b")], progress=False)
    with open(cache, "a") as f:
        f.write('{"key": "abc", "res')  # killed mid-write
    client = make_client(server.url, cache)
    client.run([chat("a"), chat("c")], progress=False)
    assert len(server.calls) == 3
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["key"] for line in lines)

    cache.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"cache.jsonl:2: not a cache entry"):
        make_client(server.url, cache)


@pytest.mark.parametrize("code", [503, 429, 500])
def test_transient_errors_are_retried(server, code):
    client = make_client(server.url)
    [result] = client.run([chat(f"status={code}x2 hello")], progress=False)
    assert result["outputs"][0]["text"].endswith("hello")
    assert len(server.calls) == 3


def test_retries_give_up_with_url_and_status(server):
    client = make_client(server.url, max_retries=1)
    with pytest.raises(EndpointError, match=rf"{server.url}/chat/completions: HTTP 503.*gave up after 2 tries"):
        client.run([chat("status=503x5 x")], progress=False)
    assert len(server.calls) == 2


def test_rejected_request_raises_or_returns_error(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    client = make_client(server.url, cache)
    with pytest.raises(EndpointError, match=rf"{server.url}/completions: HTTP 400 .*prompt is too long") as info:
        client.run([{"prompt": "reject me"}], progress=False)
    assert info.value.status_code == 400 and info.value.rejected
    assert len(server.calls) == 1  # a 400 is not retried

    results = client.run([chat("fine"), {"prompt": "reject me"}], on_error="return", progress=False)
    assert results[0]["outputs"][0]["text"] == "echo[0] seed=None fine"
    assert "HTTP 400" in results[1]["error"] and results[1]["outputs"] == []
    assert client.last_stats["failed"] == 1
    client.run([{"prompt": "reject me"}], on_error="return", progress=False)
    assert len(server.calls) == 4  # the rejected request was not cached, so it is asked again


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    client = make_client(url, max_retries=2)
    t0 = time.perf_counter()
    with pytest.raises(EndpointError, match=rf"{url}/chat/completions: cannot connect .* after 3 tries") as info:
        client.run([chat("a"), chat("b")], progress=False)
    assert info.value.status_code is None and not info.value.rejected
    assert time.perf_counter() - t0 < 5
    with pytest.raises(EndpointError, match=rf"{url}/models: cannot connect"):
        client.check_server()
    # Even with on_error="return", a dead server stops the run instead of filling every slot with errors.
    with pytest.raises(EndpointError, match="cannot connect"):
        client.run([chat("a")], on_error="return", progress=False)


def test_timeout_is_retried_then_reported(server):
    client = make_client(server.url, max_retries=1, timeout_s=0.3)
    with pytest.raises(EndpointError, match=r"no answer within 0.3 s, 2 tries"):
        client.run([chat("hang")], progress=False)
    assert len(server.calls) == 2


def test_check_server_lists_models(server):
    assert make_client(server.url).check_server() == ["fake-model"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_tokens": 3}, "exactly one of 'messages'"),
        ({"prompt": "a", "messages": []}, "exactly one of 'messages'"),
        ({"prompt": "a", "model": "x"}, "'model' is set by the client"),
        ({"prompt": "a", "stream": True}, "'stream' is set by the client"),
    ],
)
def test_bad_requests_are_refused_before_sending(server, bad, message):
    with pytest.raises(ValueError, match=message):
        make_client(server.url).run([chat("ok"), bad], progress=False)
    assert server.calls == []


def test_missing_api_key_env_is_named(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_FOR_TEST", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_FOR_TEST"):
        OpenAICompatClient("http://127.0.0.1:1/v1", "m", api_key_env="NO_SUCH_KEY_FOR_TEST")
