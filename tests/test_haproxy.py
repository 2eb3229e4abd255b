"""The opt-in HAProxy ingress (haproxy.env): `serve run` of the shipped serve_config.yaml in a Ray
instance of its own, started with haproxy.env, answering JSON and SSE through HAProxy.

HAProxy takes the service's HTTP port; Serve's Python proxy moves to a fallback port behind it.
"""

import openai
import psutil
import pytest

from bench.service import WORK, session_pids, start_serve, write_yaml
from tests.support import (
    check_a_client_disconnect_stops_every_upstream_call,
    free_port,
    shipped_serve_config,
    sim_config_dict,
)

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


@pytest.fixture(scope="module")
def haproxy_service(upstream_server):
    port = free_port()
    app_yaml = write_yaml(WORK / f"haproxy-app-{port}.yaml", sim_config_dict(upstream_server.base_url))
    serve_yaml = write_yaml(WORK / f"haproxy-serve-{port}.yaml", shipped_serve_config(port))
    proc = start_serve(serve_yaml, app_yaml, port, haproxy=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_haproxy_takes_the_http_port_and_the_service_answers_json_and_sse(haproxy_service, sim):
    proc, base = haproxy_service
    port = int(base.rsplit(":", 1)[1])
    haproxies = [p for p in map(psutil.Process, session_pids(proc.pid)) if "bin/haproxy" in " ".join(p.cmdline())]
    assert haproxies, "no HAProxy process in the service's Ray instance"
    listening = {c.laddr.port for p in haproxies for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert port in listening

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="token-killer", messages=QUESTION)
    assert reply.choices[0].message.content == "The fused final answer is 42."

    chunks = list(
        client.chat.completions.create(
            model="token-killer", messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The fused final answer is 42."
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens > 0

    with pytest.raises(openai.BadRequestError):  # errors keep their status through HAProxy
        client.chat.completions.create(model="token-killer", messages=[])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_client_disconnect_stops_every_upstream_call(haproxy_service, sim, stream):
    # Through HAProxy as through Serve's proxy: deployments/haproxy.py runs HAProxy without
    # splice(), with which it missed hang-ups of clients that send the body apart from the headers.
    _, base = haproxy_service
    check_a_client_disconnect_stops_every_upstream_call(base, "unused", sim, stream)
