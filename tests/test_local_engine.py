"""The embedded llama.cpp engine, without Ray: one chat completion and one
stream with usage, against the real SmolLM2 model (a few seconds on 2 cores)."""

import json

import aiohttp
import pytest

from actors.local_engine import LOCAL_MODEL_NAME, LocalEngine, find_smollm2_model

pytestmark = [pytest.mark.embedded, pytest.mark.timeout(60)]

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]


@pytest.fixture(scope="module")
def engine():
    try:
        find_smollm2_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    # 2 slots x 2048 tokens is enough here and loads faster than the default.
    eng = LocalEngine(n_parallel=2)
    eng.start()
    assert eng.base_url.startswith("http://127.0.0.1:") and eng.base_url.endswith("/v1")
    yield eng
    eng.stop()
    assert not eng.running


def _assert_usage(usage: dict) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert isinstance(usage[key], int) and usage[key] > 0, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_completion(engine):
    body = {"model": LOCAL_MODEL_NAME, "messages": MESSAGES, "max_tokens": 32, "temperature": 0}
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine.base_url + "/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    assert data["model"] == LOCAL_MODEL_NAME
    assert data["choices"][0]["message"]["content"].strip()
    _assert_usage(data["usage"])
    assert data["usage"]["completion_tokens"] <= 32


async def test_stream_with_usage(engine):
    body = {
        "model": LOCAL_MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 32,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks, done = [], False
    async with (
        aiohttp.ClientSession() as session,
        session.post(engine.base_url + "/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        async for raw in resp.content:  # one SSE line at a time
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                done = True
                break
            chunks.append(json.loads(payload))
    assert done, "stream did not end with [DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    # include_usage: the last chunk has no choices, only usage.
    assert chunks[-1]["choices"] == []
    _assert_usage(chunks[-1]["usage"])
