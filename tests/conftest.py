"""Fixtures: the simulated upstream, and one real Ray Serve instance per test session.

Ray starts only when a test asks for `service` (unit tests never do), once per session, on a
free port; everything started here is shut down at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.simulated_upstream import SimulatedUpstream
from tests.support import (
    ROOT,
    error_shape_problem,
    free_port,
    ray_env,
    role_aware_reply,
    shipped_serve_config,
    sim_config_dict,
    write_config,
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SIM_LATENCY_S = 0.02
SERVICE_KEY = "tk-test-client-key"  # what clients of the test service send
UPSTREAM_KEY = "sk-fake-upstream-KEY-8c1f0e"  # what the service sends upstream; must never leak
SECRETS = {"TK_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "TOKEN_KILLER_API_KEYS": f"{SERVICE_KEY}, other-client-key"}


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
    server.supports_n = True
    server.prefix_cache = False
    server.retry_after_s = 1.0


@pytest.fixture
def sim(upstream_server: SimulatedUpstream) -> Iterator[SimulatedUpstream]:
    """The shared simulated upstream, clean for this test and restored after it."""
    _restore(upstream_server)
    yield upstream_server
    _restore(upstream_server)


METRICS_PORT = free_port()
# Every non-2xx response a test provokes through the `client` fixture is checked for the OpenAI
# error shape; a test that saw a bare one fails at teardown.
SHAPE_VIOLATIONS: list[str] = []


@pytest.fixture(autouse=True)
def _every_error_has_the_openai_shape():
    SHAPE_VIOLATIONS.clear()
    yield
    assert not SHAPE_VIOLATIONS, SHAPE_VIOLATIONS


@pytest.fixture(scope="session")
def serve_http() -> Iterator[str]:
    """A Ray cluster and Serve's HTTP entry for the whole session, as `make run` starts it (with
    ray.env: HAProxy on the port); returns the base URL."""
    import ray
    from ray import serve

    port = free_port()
    # Secrets reach the replicas as a user's would: from the environment `serve run` starts in
    # (never through runtime_env, which Ray writes to its logs); ray.env's settings the same way.
    # Ray's raylet keeps the environment it started with and every replica inherits it; the
    # test process gets its own back, so services other tests start (embedded, cluster) do not.
    ray_settings, haproxy_files = ray_env()
    settings = {**SECRETS, **ray_settings}
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        # Replica logs go to the session's files (where tests read them), not to pytest's output.
        ray.init(
            address="local",  # always a cluster of our own, never one already running here
            num_cpus=2,
            include_dashboard=False,
            namespace="token-killer-tests",
            log_to_driver=False,
            _metrics_export_port=METRICS_PORT,
        )
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    serve.start(http_options=shipped_serve_config(port)["http_options"])
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(haproxy_files, ignore_errors=True)


def deploy(applications: list[dict]) -> None:
    """Apply a Serve config as `serve run serve_config.yaml` does (apps not named are removed)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": applications}), _blocking=True)


# Room for a Codex request (about 40 KB, 20,000 characters of instructions), still small
# enough for the bad-input tests to go over at little cost.
LIMITS = {
    "max_body_bytes": 200_000,
    "max_messages": 50,
    "max_total_chars": 50_000,
    "max_in_flight": 24,
    "retry_after_s": 2,
    "fusion_reserve_s": 0.5,
}


def service_config(base_url: str) -> dict:
    config = sim_config_dict(base_url, stream_keepalive_s=0.2, limits=LIMITS)
    for model in config["models"].values():  # every upstream call carries a (fake) key, and costs
        model["api_key_env"] = "TK_TEST_UPSTREAM_KEY"
        model["price"] = {"input": 1.0, "cached_input": 0.5, "output": 2.0}
    return config


@pytest.fixture(scope="session")
def service_apps(serve_http: str, upstream_server: SimulatedUpstream, tmp_path_factory) -> list[dict]:
    """The shipped serve_config.yaml's token-killer application, as deployed for the session."""
    directory = tmp_path_factory.mktemp("config")
    config = service_config(upstream_server.base_url)
    config["keys"] = {"store": {"kind": "sqlite", "path": str(directory / "spend.sqlite3")}}  # not the repo's
    path = write_config(directory / "service.yaml", config)
    port = int(serve_http.rsplit(":", 1)[1])
    env = {"PYTHONPATH": str(ROOT)}  # test-only deployment variants live in tests/
    # Two replicas of each role deployment (the shipped autoscaling starts at one), so that the
    # replica-kill tests have a survivor to retry on.
    apps = shipped_serve_config(port, app_config=path, env=env, min_replicas=2)["applications"]
    deploy(apps)
    return apps


@pytest.fixture(scope="session")
def service(service_apps: list[dict], serve_http: str) -> str:
    """The real Token Killer app, deployed from serve_config.yaml, on the simulated upstream."""
    return serve_http


@pytest.fixture
def client(service: str):
    import httpx2 as httpx
    import openai

    def check(response: httpx.Response) -> None:
        if response.status_code >= 400:
            response.read()
            problem = error_shape_problem(response.status_code, response.content)
            if problem:
                SHAPE_VIOLATIONS.append(f"{response.request.method} {response.request.url}: {problem}")

    http = httpx.Client(event_hooks={"response": [check]}, timeout=60)
    yield openai.OpenAI(base_url=f"{service}/v1", api_key=SERVICE_KEY, max_retries=0, timeout=60, http_client=http)
    http.close()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A real PostgreSQL server of the test session's own, on a free port, in a temporary
    directory (the server store of spend per key)."""
    from actors.local_postgres import LocalPostgres, PostgresUnavailable

    directory = Path(tempfile.mkdtemp(prefix="tk-postgres-"))  # the server's user must reach it
    try:
        server = LocalPostgres(directory, free_port())
        dsn = server.start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):  # CI installs it (.ci/run): missing there is a failure
            raise
        pytest.skip(f"PostgreSQL's server programs are not installed here: {exc}")
    yield dsn
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


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
