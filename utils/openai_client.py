"""A client for OpenAI-compatible endpoints (vLLM's server, hosted APIs): concurrent requests, retries, on-disk cache.

    client = OpenAICompatClient("http://127.0.0.1:8000/v1", "openai/gpt-oss-120b", cache_path="data/cache/t.jsonl")
    results = client.run([{"messages": [{"role": "user", "content": "2+2?"}], "temperature": 0.6, "max_tokens": 64}])
    results[0]["outputs"][0]["text"], results[0]["outputs"][0]["finish_reason"]

A request is a dict with exactly one of `messages` (sent to `/chat/completions`) or `prompt` (sent to `/completions`);
every other key is a body parameter sent as is (`temperature`, `top_p`, `max_tokens`, `n`, `stop`, `seed`, or a
server-specific one such as vLLM's `include_stop_str_in_output`). The client adds `model`.

Every successful response is appended to a JSON Lines cache keyed by (model, request), so a re-run, or a second
script asking the same question (a judge re-scoring the same response), sends only what is missing. The endpoint URL
is not part of the key: the same model behind another URL answers the same question. A request that samples
(temperature > 0) gets a fresh sample only when something in the request differs, e.g. its `seed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from utils.helper_fns import append_jsonl

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}  # transient per the OpenAI API docs; other 4xx will fail again


class EndpointError(RuntimeError):
    """The endpoint could not be reached, kept failing, or rejected a request; the message names the URL.

    `status_code` is the HTTP status of the last answer, None when none came (connection error, timeout).
    """

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code

    @property
    def rejected(self) -> bool:
        """The server answered and refused this request (a 4xx that retrying will not change)."""
        return self.status_code is not None and self.status_code not in RETRY_STATUS


def request_key(model: str, request: dict) -> str:
    """Cache key of one request: sha256 of the canonical JSON of (model, request)."""
    blob = json.dumps({"model": model, "request": request}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _check_request(i: int, request: dict) -> None:
    if not isinstance(request, dict):
        raise ValueError(f"request #{i}: expected a dict, got {type(request).__name__}")
    if ("messages" in request) == ("prompt" in request):
        raise ValueError(f"request #{i}: give exactly one of 'messages' (chat) or 'prompt' (completion)")
    for bad in ("model", "stream"):
        if bad in request:
            raise ValueError(f"request #{i}: {bad!r} is set by the client, remove it from the request")


def _parse_response(body: dict) -> dict:
    """`{"outputs": [{"text", "finish_reason"[, "reasoning"]}], "usage"}` from a chat or completion response body."""
    outputs = []
    for choice in sorted(body.get("choices") or [], key=lambda c: c.get("index", 0)):
        message = choice.get("message")
        if message is not None:  # chat
            out = {"text": message.get("content") or "", "finish_reason": choice.get("finish_reason")}
            # Reasoning models served by vLLM (gpt-oss, DeepSeek-R1) return their hidden chain of thought separately:
            # `reasoning_content` before vLLM 0.10, `reasoning` after.
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if reasoning:
                out["reasoning"] = reasoning
        else:  # completion
            out = {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason")}
        outputs.append(out)
    return {"outputs": outputs, "usage": body.get("usage")}


class OpenAICompatClient:
    """Send many chat/completion requests to one model on an OpenAI-compatible endpoint, with a cache.

    Args:
        base_url: endpoint root including the API version, e.g. `http://127.0.0.1:8000/v1`.
        model: model name as the endpoint knows it (`served-model-name` for vLLM).
        api_key_env: name of the environment variable holding the API key; None or "" = no key (local vLLM).
        max_concurrency: requests in flight at once (threads).
        max_retries: retries after the first try for connection errors, timeouts, 408/409/429/5xx.
        timeout_s: seconds one HTTP request may take.
        cache_path: JSON Lines cache file (created with its folder); None = no cache.
        backoff_s: first retry delay; doubles per retry up to `max_backoff_s`, with jitter in [0.5, 1] of it.
        max_backoff_s: longest delay between two tries.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 600.0,
        cache_path: str | os.PathLike | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        api_key = "EMPTY"  # vLLM's server accepts any key unless started with --api-key
        if api_key_env:
            api_key = os.environ.get(api_key_env, "")
            if not api_key:
                raise ValueError(f"environment variable {api_key_env} (the API key for {base_url}) is not set")
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # The SDK's own retries are off: ours also cover connection errors and name the URL when they give up.
        self._client = OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.cache_path = Path(cache_path) if cache_path else None
        self._cache: dict[str, dict] = self._load_cache() if self.cache_path else {}
        self._lock = threading.Lock()
        self.last_stats: dict[str, int] = {}

    # -- cache ---------------------------------------------------------------------------------------------------

    def _load_cache(self) -> dict[str, dict]:
        """Read the cache file; a torn last line (a run killed mid-write) is ignored, any other bad line is an error."""
        cache: dict[str, dict] = {}
        if not self.cache_path.exists():
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            return cache
        with open(self.cache_path, "rb") as f:
            lines = f.readlines()
        good_bytes = 0
        for line_no, raw in enumerate(lines, start=1):
            try:
                if raw.strip():
                    entry = json.loads(raw)
                    cache[entry["key"]] = entry["result"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                if line_no == len(lines) and not raw.endswith(b"\n"):
                    # A run killed mid-write; cut the fragment so the next append starts on a fresh line.
                    print(f"{self.cache_path}:{line_no}: dropping a partial last line (interrupted write)")
                    os.truncate(self.cache_path, good_bytes)
                    break
                raise ValueError(f"{self.cache_path}:{line_no}: not a cache entry (expected JSON with key and result)")
            good_bytes += len(raw)
        return cache

    def _store(self, key: str, request: dict, result: dict) -> None:
        with self._lock:
            self._cache[key] = result
            if self.cache_path:
                append_jsonl(self.cache_path, {"key": key, "model": self.model, "request": request, "result": result})

    def cached(self, request: dict) -> dict | None:
        """The cached result of one request, or None."""
        return self._cache.get(request_key(self.model, request))

    # -- sending -------------------------------------------------------------------------------------------------

    def _endpoint(self, request: dict) -> str:
        return f"{self.base_url}/{'chat/completions' if 'messages' in request else 'completions'}"

    def _send_once(self, request: dict) -> dict:
        body = {k: v for k, v in request.items() if k not in ("messages", "prompt")}
        if "messages" in request:
            response = self._client.chat.completions.create(
                model=self.model, messages=request["messages"], extra_body=body
            )
        else:
            response = self._client.completions.create(model=self.model, prompt=request["prompt"], extra_body=body)
        return _parse_response(response.model_dump())

    def _sleep_before_retry(self, attempt: int) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        time.sleep(delay * random.uniform(0.5, 1.0))

    def _send(self, request: dict) -> dict:
        """One request with retries. Raises EndpointError naming the URL when it gives up."""
        import openai

        url = self._endpoint(request)
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                return self._send_once(request)
            except openai.APITimeoutError:
                if last:
                    raise EndpointError(
                        f"{url}: no answer within {self.timeout_s:g} s, {attempt + 1} tries (raise timeout_s?)"
                    ) from None
            except openai.APIConnectionError as e:
                if last:
                    raise EndpointError(
                        f"{url}: cannot connect ({e.__cause__ or e}) after {attempt + 1} tries; is the server up?"
                    ) from None
            except openai.APIStatusError as e:
                message = f"{url}: HTTP {e.status_code} for model {self.model!r}: {str(e.message)[:500]}"
                if e.status_code not in RETRY_STATUS:
                    raise EndpointError(message, e.status_code) from None
                if last:
                    raise EndpointError(f"{message} (gave up after {attempt + 1} tries)", e.status_code) from None
            self._sleep_before_retry(attempt)
        raise AssertionError("unreachable")

    def check_server(self) -> list[str] | None:
        """Ask `GET /models` once (with retries) so a long run fails at once when the server is down.

        Returns:
            The model ids the endpoint serves, or None when it has no `/models` route (some hosted APIs).
        Raises:
            EndpointError naming the URL when the server cannot be reached.
        """
        import openai

        url = f"{self.base_url}/models"
        for attempt in range(self.max_retries + 1):
            try:
                return [m.id for m in self._client.models.list()]
            except openai.APIStatusError as e:
                if e.status_code in (404, 405):
                    return None
                if e.status_code not in RETRY_STATUS or attempt == self.max_retries:
                    raise EndpointError(f"{url}: HTTP {e.status_code}: {str(e.message)[:500]}", e.status_code) from None
            except openai.APIConnectionError as e:
                if attempt == self.max_retries:
                    raise EndpointError(
                        f"{url}: cannot connect ({e.__cause__ or e}) after {attempt + 1} tries; is the server up?"
                    ) from None
            self._sleep_before_retry(attempt)
        raise AssertionError("unreachable")

    def run(
        self,
        requests: list[dict],
        on_error: str = "raise",
        on_result: Callable[[int, dict], None] | None = None,
        desc: str = "requests",
        progress: bool = True,
    ) -> list[dict]:
        """Answer a list of requests, from the cache where possible, the rest concurrently; results in input order.

        Args:
            requests: chat (`messages`) or completion (`prompt`) requests with their sampling parameters.
            on_error: "raise" = the first failure stops the batch (answers received so far stay cached) and raises
                EndpointError; "return" = a request the server rejects (HTTP 4xx other than 408/409/429) gets
                `{"error": message, "outputs": []}` in its slot and is not cached, so a re-run asks again.
                An unreachable server or exhausted retries raise in both modes.
            on_result: called as `on_result(index, result)` in the calling thread for each request as its answer
                is known (cached ones first), so a caller can write output incrementally.
            desc: tqdm label.
            progress: show a tqdm bar over the requests that are sent.

        Returns:
            One dict per request: `{"outputs": [{"text", "finish_reason"[, "reasoning"]}, ...], "usage", "cached"}`,
            one output per sample (`n`). Identical requests in one batch are sent once.
        Side effects:
            `self.last_stats` = {"requests", "cached", "sent", "failed"} for this call.
        """
        if on_error not in ("raise", "return"):
            raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
        for i, request in enumerate(requests):
            _check_request(i, request)
        keys = [request_key(self.model, r) for r in requests]
        results: list[dict | None] = [None] * len(requests)
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key in self._cache:
                results[i] = {**self._cache[key], "cached": True}
            else:
                todo.setdefault(key, []).append(i)
        n_cached = sum(r is not None for r in results)
        if on_result is not None:
            for i, result in enumerate(results):
                if result is not None:
                    on_result(i, result)
        failed = 0
        if todo:
            failed = self._send_all(requests, todo, results, on_error, on_result, desc, progress)
        self.last_stats = {"requests": len(requests), "cached": n_cached, "sent": len(todo), "failed": failed}
        return results

    def _send_all(self, requests, todo, results, on_error, on_result, desc, progress) -> int:
        from tqdm import tqdm

        failed = 0
        bar = tqdm(total=len(todo), desc=desc, disable=not progress)
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        pending = {pool.submit(self._send, requests[idx[0]]): key for key, idx in todo.items()}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    key = pending.pop(future)
                    first = todo[key][0]
                    try:
                        result = future.result()
                    except EndpointError as e:
                        if on_error == "raise" or not e.rejected:
                            raise
                        failed += 1
                        result = {"error": str(e), "outputs": [], "usage": None}
                    else:
                        self._store(key, requests[first], result)
                    for i in todo[key]:
                        results[i] = {**result, "cached": False}
                        if on_result is not None:
                            on_result(i, results[i])
                    bar.update(1)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return failed
