"""Load generator (run as its own process): closed-loop clients against /v1/chat/completions.

    python -m bench.load --url http://127.0.0.1:PORT --concurrency 16 --duration 20 [--stream]
    python -m bench.load --url ... --concurrency 1000 --requests 1000   # all at once
    python -m bench.load --url ... --api-key KEY --pause-after-refusal 0.1 --duration 30

`--concurrency` clients each send requests back to back until `--duration` seconds have passed
(a request started in time is completed), or until `--requests` requests have been started in
total; a client whose request was refused (429, 503) waits `--pause-after-refusal` seconds first.
Prints one JSON document: per-request records and the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _extension_stats(record: dict, ext: dict | None) -> None:
    """Upstream calls and step counts from the service's `token_killer` extension field."""
    if not ext:
        return
    record["calls"] = sum(r.get("calls", 0) for r in ext.get("usage_by_role", {}).values())
    record["steps_validated"] = ext.get("steps_validated")
    record["threads_kept"] = ext.get("threads_kept")


async def one_request(session: aiohttp.ClientSession, url: str, stream: bool, t0: float, model: str) -> dict:
    body = {"model": model, "messages": QUESTION}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    record: dict = {"start": round(start - t0, 4), "status": None, "error": None}
    try:
        async with session.post(url, json=body) as resp:
            record["status"] = resp.status
            if not stream or resp.status != 200:
                data = await resp.read()
                if resp.status == 200:
                    _extension_stats(record, json.loads(data).get("token_killer"))
                else:
                    record["error"] = _error_code(data)
            else:
                await _read_stream(resp, record, start)
    except Exception as exc:  # noqa: BLE001 - every failure is a measured outcome
        record["error"] = type(exc).__name__
    record["latency"] = round(time.perf_counter() - start, 4)
    return record


async def _read_stream(resp: aiohttp.ClientResponse, record: dict, start: float) -> None:
    """SSE: time to first byte, to first reasoning, to first answer token; usage at the end."""
    async for raw in resp.content:
        now = time.perf_counter() - start
        record.setdefault("ttfb", round(now, 4))
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            record["done"] = True
            break
        event = json.loads(data)
        if "error" in event:  # in-band failure after the 200 status
            record["error"] = "sse:" + str((event["error"] or {}).get("code"))
            continue
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                record.setdefault("t_reasoning", round(now, 4))
            if delta.get("content"):
                record.setdefault("ttfc", round(now, 4))
        if event.get("usage"):
            _extension_stats(record, event.get("token_killer"))
    if not record.get("done") and not record["error"]:
        record["error"] = "stream_truncated"


def _error_code(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"].get("code"))
    except Exception:  # noqa: BLE001
        return data[:80].decode("utf-8", "replace")


async def run(
    url: str,
    concurrency: int,
    duration: float | None,
    requests: int | None,
    stream: bool,
    timeout: float,
    model: str,
    api_key: str | None = None,
    pause_after_refusal: float = 0.0,
) -> dict:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), headers=headers)
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    records: list[dict] = []
    started = 0
    t0 = time.perf_counter()
    deadline = t0 + duration if duration else None

    async def client() -> None:
        nonlocal started
        while (deadline is None or time.perf_counter() < deadline) and (requests is None or started < requests):
            started += 1
            records.append(await one_request(session, endpoint, stream, t0, model))
            if records[-1]["status"] in (429, 503) and pause_after_refusal:
                await asyncio.sleep(pause_after_refusal)

    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        await session.close()
    return {
        "concurrency": concurrency,
        "stream": stream,
        "wall_s": round(time.perf_counter() - t0, 4),
        "client_cpu_s": round(time.process_time(), 3),  # this load generator's own CPU
        "records": sorted(records, key=lambda r: r["start"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--model", default="token-killer-classic", help="the profile to ask for")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--pause-after-refusal", type=float, default=0.0, help="seconds a client waits after a 429/503")
    args = parser.parse_args()
    if args.duration is None and args.requests is None:
        parser.error("give --duration or --requests")
    result = asyncio.run(
        run(
            args.url,
            args.concurrency,
            args.duration,
            args.requests,
            args.stream,
            args.timeout,
            args.model,
            args.api_key,
            args.pause_after_refusal,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
