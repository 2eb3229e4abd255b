"""bench/quality: the harness's plumbing without Ray — arms, cost, statistics, progress, and one
whole run against the simulated upstream (standing in for both the service and the thinker)."""

from __future__ import annotations

import io
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml

from bench.quality import report, run
from bench.quality.arms import api_root, direct_arm, requested_models, with_service_port
from bench.quality.cost import direct_cost_usd, service_cost_usd
from bench.quality.problems import generate
from bench.quality.progress import Progress
from bench.quality.stats import summarize_arm, wilson


def test_wilson_interval_known_values():
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10)[0] == 0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1) and wilson(0, 0) == (0.0, 1.0)


def test_local_urls_follow_the_service_port():
    assert with_service_port("http://127.0.0.1:8000/local/v1", 41234) == "http://127.0.0.1:41234/local/v1"
    assert with_service_port("http://localhost:8000/v1", 9) == "http://localhost:9/v1"
    assert with_service_port("https://api.example.com/v1", 41234) == "https://api.example.com/v1"
    assert with_service_port("http://127.0.0.1:11434/v1", 41234) == "http://127.0.0.1:11434/v1"
    assert api_root("http://127.0.0.1:8000/v1/") == api_root("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert requested_models(["a", "b,c", " a , d"]) == ["a", "b", "c", "d"]


def test_direct_arm_reads_the_thinker_and_gives_it_one_thread_budget():
    config = yaml.safe_load((run.ROOT / "configs" / "default.yaml").read_text())
    arm = direct_arm(config, 41234)
    thinker = config["models"]["thinker"]
    assert arm.model == thinker["model"] and arm.base_url == "http://127.0.0.1:41234/local/v1"
    assert arm.max_tokens == thinker["max_tokens"] * config["thinking"]["max_steps"]
    assert arm.price is None and arm.api_key == "unused"
    other = direct_arm(config, None, base_url="http://127.0.0.1:9/v1", model="m", max_tokens=7)
    assert (other.base_url, other.model, other.max_tokens) == ("http://127.0.0.1:9/v1", "m", 7)
    with pytest.raises(ValueError, match="api_key_env"):
        direct_arm(
            {"models": {"thinker": {"base_url": "u", "model": "m", "api_key_env": "TK_QUALITY_UNSET_KEY"}}}, None
        )
    with pytest.raises(ValueError, match="thinker"):
        direct_arm({"models": {}}, None)


def test_costs():
    usage = SimpleNamespace(
        prompt_tokens=1000, completion_tokens=500, prompt_tokens_details=SimpleNamespace(cached_tokens=400)
    )
    price = {"input": 1.0, "cached_input": 0.5, "output": 4.0}
    assert direct_cost_usd(usage, price) == pytest.approx((600 * 1.0 + 400 * 0.5 + 500 * 4.0) / 1e6)
    assert direct_cost_usd(usage, None) is None
    assert service_cost_usd({"cost": {"total_usd": 0.25, "by_role": {}}}) == 0.25
    assert service_cost_usd({"cost": None}) is None and service_cost_usd({}) is None and service_cost_usd(None) is None


def test_summary_counts_errors_as_wrong_and_averages_answered_problems():
    def record(correct, tokens, error=None, level=1):
        return {
            "correct": correct,
            "error": error,
            "level": level,
            "kind": "units",
            "extracted": "1" if tokens else None,
            "prompt_tokens": tokens,
            "completion_tokens": tokens,
            "total_tokens": tokens and 2 * tokens,
            "cost_usd": None,
            "latency_s": 1.0,
        }

    s = summarize_arm([record(True, 100), record(False, 300, level=2), record(False, None, "HTTP 502")])
    assert (s["n"], s["correct"], s["errors"]) == (3, 1, 1)
    assert s["mean_total_tokens"] == 400 and s["accuracy_per_1k_tokens"] == pytest.approx((1 / 3) / 0.4)
    assert set(s["by_level"]) == {"1", "2"}
    assert s["by_level"]["1"]["correct"] == 1 and s["mean_cost_usd"] is None


def test_progress_in_a_log_writes_a_few_lines_not_one_per_request():
    stream = io.StringIO()
    progress = Progress(1000, "quality", stream=stream)
    for _ in range(1000):
        progress.advance()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("quality: 1000/1000")


def test_a_whole_run_against_the_simulated_upstream(sim, tmp_path):
    """Both arms ask every problem; replies that state the expected answer are graded correct,
    the direct arm is priced from the config, and the outputs are written."""
    n, seed = 10, 3
    answers = {p.question: p.answer for p in generate(n, seed, (1, 2, 3))}
    sim.default_reply = lambda request: (
        f"Working through 7 and 3 first.\n\nANSWER: {answers[request['messages'][-1]['content']]}"
    )
    config = {
        "models": {
            "thinker": {
                "base_url": sim.base_url,
                "model": "simulated",
                "max_tokens": 50,
                "price": {"input": 1.0, "output": 2.0},
            }
        },
        "thinking": {"max_steps": 2},
    }
    config_path = tmp_path / "app.yaml"
    config_path.write_text(yaml.safe_dump(config))

    results = run.main(
        [
            "--base-url",
            sim.base_url,
            "--config",
            str(config_path),
            "--n",
            str(n),
            "--seed",
            str(seed),
            "--concurrency",
            "3",
            "--no-append",
            "--out",
            str(tmp_path / "out"),
        ]
    )

    assert [a["name"] for a in results["arms"]] == ["direct: simulated", "simulated"]
    assert results["service"]["listed_models"] == ["simulated"]
    for arm in results["arms"]:
        summary = results["summaries"][arm["name"]]
        assert (summary["n"], summary["correct"], summary["errors"]) == (n, n, 0)
        assert summary["mean_total_tokens"] > 0
    direct = results["summaries"]["direct: simulated"]
    assert direct["mean_cost_usd"] == pytest.approx(
        (direct["mean_prompt_tokens"] * 1.0 + direct["mean_completion_tokens"] * 2.0) / 1e6
    )
    assert results["summaries"]["simulated"]["mean_cost_usd"] is None  # no token_killer.cost
    # The direct arm asks with one thread's budget (50 per step × 2 steps); the service arm sets none.
    assert Counter(r.request.get("max_tokens") for r in sim.records) == {100: n, None: n}
    saved = json.loads((tmp_path / "out").joinpath(results["json_path"].rsplit("/", 1)[1]).read_text())
    assert len(saved["records"]) == 2 * n
    assert results["markdown"].startswith("## Quality: accuracy against spend (")
    assert "| `direct: simulated` | 100% (10/10) |" in results["markdown"]


def test_sections_are_appended_after_what_is_there(tmp_path):
    benchmarks = tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nearlier results")
    report.append_section("## Quality: first\n", benchmarks)
    report.append_section("## Quality: second\n", benchmarks)
    assert benchmarks.read_text() == "# Benchmarks\n\nearlier results\n\n## Quality: first\n\n## Quality: second\n"
