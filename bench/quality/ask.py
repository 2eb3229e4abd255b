"""Ask every problem of one arm with the official openai client, `concurrency` at a time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai

from bench.quality.arms import DIRECT, Arm
from bench.quality.cost import direct_cost_usd, service_cost_usd
from bench.quality.extract import extract_answer
from bench.quality.grade import is_correct
from bench.quality.problems import Problem
from bench.quality.progress import Progress

# One deep-thinking request may take minutes on a slow upstream (serve_config allows 900 s).
REQUEST_TIMEOUT_S = 900.0
REPLY_CHARS_KEPT = 4000  # of each reply, in the results file


async def ask_arm(arm: Arm, problems: list[Problem], concurrency: int, progress: Progress) -> list[dict[str, Any]]:
    client = openai.AsyncOpenAI(base_url=arm.base_url, api_key=arm.api_key, max_retries=0, timeout=REQUEST_TIMEOUT_S)
    gate = asyncio.Semaphore(concurrency)

    async def one(problem: Problem) -> dict[str, Any]:
        async with gate:
            record = await ask_one(client, arm, problem)
        progress.advance(f"{arm.name}: {'error' if record['error'] else 'ok'}")
        return record

    try:
        return await asyncio.gather(*(one(p) for p in problems))
    finally:
        await client.close()


async def ask_one(client: openai.AsyncOpenAI, arm: Arm, problem: Problem) -> dict[str, Any]:
    record: dict[str, Any] = {
        "arm": arm.name,
        "problem_id": problem.id,
        "kind": problem.kind,
        "level": problem.level,
        "expected": problem.answer,
        "extracted": None,
        "correct": False,
        "reply": None,
        "error": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "total_tokens": None,
        "cost_usd": None,
    }
    started = time.monotonic()
    try:
        response = await client.chat.completions.create(**_request(arm, problem))
    except openai.APIStatusError as error:
        record["error"] = f"HTTP {error.status_code}: {type(error).__name__}"
    except Exception as error:  # timeouts, dropped connections, bodies the client cannot read
        record["error"] = type(error).__name__
    record["latency_s"] = round(time.monotonic() - started, 3)
    if record["error"]:
        return record

    reply = response.choices[0].message.content if response.choices else None
    record["reply"] = (reply or "")[:REPLY_CHARS_KEPT]
    record["extracted"] = extract_answer(reply, problem.compare, problem.candidates)
    record["correct"] = is_correct(problem, record["extracted"])
    usage = response.usage
    if usage is not None:
        record.update(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )
    if arm.kind == DIRECT:
        record["cost_usd"] = direct_cost_usd(usage, arm.price)
    else:
        extension = (response.model_extra or {}).get("token_killer")
        record["cost_usd"] = service_cost_usd(extension)
        record["service"] = _service_facts(extension)
    return record


def _request(arm: Arm, problem: Problem) -> dict[str, Any]:
    request: dict[str, Any] = {"model": arm.model, "messages": [{"role": "user", "content": problem.question}]}
    if arm.kind == DIRECT:
        request.update(max_tokens=arm.max_tokens, temperature=arm.temperature)
    else:
        # The steps are not graded; leaving them out keeps replies (and the results file) small.
        request["extra_body"] = {"include_reasoning": False}
    return request


def _service_facts(extension: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the service says it did for this answer (calls by role, threads, steps)."""
    if not extension:
        return None
    by_role = extension.get("usage_by_role") or {}
    return {
        "calls": sum(r.get("calls", 0) for r in by_role.values()),
        "calls_by_role": {role: r.get("calls", 0) for role, r in by_role.items()},
        **{
            k: extension.get(k)
            for k in ("threads_kept", "steps_validated", "steps_failed", "steps_revised", "fusion_fallback_thread")
        },
        "cost": extension.get("cost"),
    }
