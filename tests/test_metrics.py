"""The service's metrics reach Ray's Prometheus endpoint after a request."""

import time
import urllib.request

import pytest

from tests.conftest import METRICS_PORT

pytestmark = pytest.mark.serve

EXPECTED = [
    "ray_tk_upstream_calls_total{",
    'role="thinker"',
    'outcome="ok"',
    "ray_tk_upstream_latency_s_bucket{",
    "ray_tk_tokens_total{",
    'kind="completion"',
    "ray_tk_validation_verdicts_total{",
    'verdict="passed"',
    "ray_tk_threads_total{",
    'outcome="kept"',
    "ray_tk_phase_duration_s_bucket{",
    'phase="fusion"',
    "ray_tk_requests_in_flight{",
]


def scrape() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as response:
        return response.read().decode()


def test_metrics_are_scraped_after_a_request(client, sim):
    client.chat.completions.create(model="token-killer", messages=[{"role": "user", "content": "Hi"}])

    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    text = ""
    while time.monotonic() < deadline:
        text = scrape()
        if all(marker in text for marker in EXPECTED):
            break
        time.sleep(2)
    missing = [marker for marker in EXPECTED if marker not in text]
    assert not missing, missing
