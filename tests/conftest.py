"""Fixtures: the simulated upstream, and one real Ray Serve instance per test session.

Ray starts only when a test asks for `service` (unit tests never do), once per session, on a
free port; everything started here is shut down at the end.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tests.simulated_upstream import SimulatedUpstream
from tests.support import role_aware_reply, sim_config_dict, write_config

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SIM_LATENCY_S = 0.02
SERVICE_KEY = "tk-test-client-key"  # what clients of the test service send
UPSTREAM_KEY = "sk-fake-upstream-KEY-8c1f0e"  # what the service sends upstream; must never leak


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[SimulatedUpstream]:
    server = SimulatedUpstream.start_in_thread(default_reply=role_aware_reply, latency=SIM_LATENCY_S)
    yield server
    server.stop_in_thread()


def _restore(server: SimulatedUpstream) -> None:
    """No rules, records or faults; the session's latency and role-aware replies."""
    server.reset()
    server.latency = SIM_LATENCY_S
    server.token_interval = 0.0
    server.fault_rates = {}
    server.default_reply = role_aware_reply


@pytest.fixture
def sim(upstream_server: SimulatedUpstream) -> Iterator[SimulatedUpstream]:
    """The shared simulated upstream, clean for this test and restored after it."""
    _restore(upstream_server)
    yield upstream_server
    _restore(upstream_server)


METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def serve_http() -> Iterator[str]:
    """A Ray cluster and Serve HTTP proxy for the whole session; returns the base URL."""
    import ray
    from ray import serve

    port = free_port()
    # Replica logs go to the session's files (where tests read them), not to pytest's output.
    ray.init(
        address="local",  # always a cluster of our own, never one already running here
        num_cpus=2,
        include_dashboard=False,
        namespace="token-killer-tests",
        log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
        # The same Serve switches serve_config.yaml sets for the app's replicas.
        runtime_env={
            "env_vars": {
                "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
            }
        },
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def service(serve_http: str, upstream_server: SimulatedUpstream, tmp_path_factory) -> str:
    """The real Token Killer app, built from a config file pointed at the simulated upstream."""
    from ray import serve

    from deployments.app import build_app

    config = sim_config_dict(
        upstream_server.base_url,
        stream_keepalive_s=0.2,
        limits={
            "max_body_bytes": 20_000,
            "max_messages": 50,
            "max_total_chars": 10_000,
            "max_in_flight": 24,
            "retry_after_s": 2,
            "fusion_reserve_s": 0.5,
        },
    )
    for model in config["models"].values():  # every upstream call carries a (fake) key
        model["api_key_env"] = "TK_TEST_UPSTREAM_KEY"
    path = write_config(tmp_path_factory.mktemp("config") / "service.yaml", config)
    env = {"TK_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "TOKEN_KILLER_API_KEYS": f"{SERVICE_KEY}, other-client-key"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:  # the builder resolves keys from the environment once, here, at start-up
        serve.run(build_app({"config": str(path)}), name="token-killer", route_prefix="/")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return serve_http


@pytest.fixture
def client(service: str):
    import openai

    return openai.OpenAI(base_url=f"{service}/v1", api_key=SERVICE_KEY, max_retries=0, timeout=60)


@pytest.fixture
async def upstream() -> SimulatedUpstream:
    """A fresh simulated upstream on this test's event loop (for role tests without Ray)."""
    server = await SimulatedUpstream(default_reply=role_aware_reply).start()
    yield server
    await server.stop()


@pytest.fixture
async def http_session():
    from actors.config import UpstreamConfig
    from actors.model_client import open_session

    session = open_session(UpstreamConfig())
    yield session
    await session.close()
