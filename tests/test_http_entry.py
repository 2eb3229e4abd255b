"""Both ways HTTP enters the service. `make run` (and this suite's shared cluster) starts Ray with
ray.env: HAProxy holds the HTTP port and sends requests straight to the Ingress replica. Plain
`serve run serve_config.yaml` (no ray.env) goes through Serve's Python proxy instead; that
path is run here in a Ray instance of its own."""

import openai
import psutil
import pytest

from bench.service import WORK, session_pids, start_serve, write_yaml
from tests.conftest import SERVICE_KEY
from tests.support import (
    check_a_client_disconnect_stops_every_upstream_call,
    free_port,
    shipped_serve_config,
    sim_config_dict,
)

pytestmark = pytest.mark.serve

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def test_haproxy_without_splice_holds_the_service_port(service, client):
    client.chat.completions.create(model="token-killer", messages=QUESTION)
    port = int(service.rsplit(":", 1)[1])
    listeners = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        try:
            ports = {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
        if port in ports:
            listeners[process.pid] = cmdline
    assert listeners, f"nothing listens on {port}"
    for cmdline in listeners.values():
        assert cmdline[0].endswith("/haproxy"), cmdline
        assert "-dS" in cmdline, f"HAProxy started with splice() on (not through deployments/haproxy.py): {cmdline}"


@pytest.fixture(scope="module")
def python_proxy_service(upstream_server):
    port = free_port()
    app_yaml = write_yaml(WORK / f"proxy-app-{port}.yaml", sim_config_dict(upstream_server.base_url))
    serve_yaml = write_yaml(WORK / f"proxy-serve-{port}.yaml", shipped_serve_config(port))
    proc = start_serve(serve_yaml, app_yaml, port, haproxy=False)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_plain_serve_run_answers_json_and_sse_through_serves_proxy(python_proxy_service, sim):
    proc, base = python_proxy_service
    port = int(base.rsplit(":", 1)[1])
    session = [psutil.Process(pid) for pid in session_pids(proc.pid)]
    assert not any("haproxy" in " ".join(p.cmdline()) for p in session), "HAProxy started without ray.env"
    proxies = [p for p in session if "ray::ProxyActor" in " ".join(p.cmdline())]
    assert any(port in {c.laddr.port for c in p.net_connections("tcp")} for p in proxies)

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

    with pytest.raises(openai.BadRequestError):  # errors keep their status through the proxy
        client.chat.completions.create(model="token-killer", messages=[])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_through_serves_proxy_a_client_disconnect_stops_every_upstream_call(python_proxy_service, sim, stream):
    _, base = python_proxy_service
    check_a_client_disconnect_stops_every_upstream_call(base, SERVICE_KEY, sim, stream)
