"""End to end on the embedded default: the README's `serve run serve_config.yaml`, a real model.

Runs the shipped serve_config.yaml and configs/default.yaml unchanged except for the HTTP port
(a free one, so a service already on 8000 cannot interfere), in a Ray instance of its own.
"""

from pathlib import Path

import openai
import pytest

from bench.service import start_service

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def embedded_service():
    """The README's `serve run serve_config.yaml` with the shipped configs, on a free port (a Ray
    instance of its own, never the test session's), stopped at the end."""
    proc, base, _ = start_service(ROOT / "configs" / "default.yaml", timeout=READY_TIMEOUT_S)
    try:
        yield base
    finally:
        proc.stop()


def test_the_embedded_default_answers_non_stream_and_stream(embedded_service):
    client = openai.OpenAI(base_url=f"{embedded_service}/v1", api_key="unused", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What is the capital of France?"}]

    reply = client.chat.completions.create(model="token-killer", messages=question)
    assert reply.choices[0].message.content.strip()
    by_role = reply.model_extra["token_killer"]["usage_by_role"]
    assert reply.usage.prompt_tokens == sum(r["prompt_tokens"] for r in by_role.values()) > 0
    assert reply.usage.completion_tokens == sum(r["completion_tokens"] for r in by_role.values()) > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="token-killer", messages=question, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_the_quality_harness_runs_end_to_end_on_the_embedded_model(embedded_service, tmp_path):
    """`bench.quality` against this service: a record per problem for every arm, the outputs
    written. A 135M model scores near zero, so accuracy is not asserted. One profile only
    (`--model token-killer`) keeps the run under two minutes on 2 cores."""
    import importlib.util

    from bench.quality import run as quality

    results = quality.main(
        [
            "--base-url",
            embedded_service,
            "--config",
            "configs/default.yaml",
            "--model",
            "token-killer",
            "--n",
            "3",
            "--levels",
            "1",
            "--concurrency",
            "3",
            "--no-append",
            "--out",
            str(tmp_path),
        ]
    )

    problem_ids = sorted(p["id"] for p in results["problems"])
    assert len(problem_ids) == 3 and [a["kind"] for a in results["arms"]] == ["direct", "service"]
    for arm in results["arms"]:
        assert sorted(r["problem_id"] for r in results["records"] if r["arm"] == arm["name"]) == problem_ids
    assert Path(results["json_path"]).is_file()
    if importlib.util.find_spec("matplotlib"):  # the `bench` extra; `make test` installs only `test`
        assert Path(results["plot_path"]).is_file()
    assert "| `token-killer` |" in results["markdown"] and "| `direct: smollm2-135m-instruct` |" in results["markdown"]
