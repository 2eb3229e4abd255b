"""Shared test helpers: a service config pointed at the simulated upstream, role-aware replies.

Each role calls its own model name (`sim-thinker`, `sim-voter`, ...) so a test can script one
role with `Rule(model=...)`.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from actors.config import ROLES, ServiceConfig

ROOT = Path(__file__).resolve().parent.parent

ROLE_REPLIES = {
    "sim-thinker": "We reason about the problem carefully. [CONTINUE]",
    "sim-counterexample": "Counterexample: none found, the step holds.",
    "sim-voter": "VOTE: STEP because it holds.",
    "sim-summarizer": "Summary of the middle steps.",
    "sim-fuser": "The fused final answer is 42.",
}


# Issue 9's fault mix, for the reliability tests and the benchmark: of all upstream calls, 10%
# answer 500, 5% 429, 2% reset the connection mid-body (plain and streamed calls alike), 1% hang.
FAULT_MIX = {"500": 0.10, "429": 0.05, "reset": 0.02, "hang": 0.01}


# Ports free_port() has handed out in this process. A caller often asks for several before it
# binds any (a Ray node takes nine on its command line), so a port still unbound must not be
# handed out twice.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on every interface right now and not handed out before by this process
    (for servers the tests or the benchmark start).

    Taken from 20000-29999: below the kernel's ephemeral range, which Ray's many outgoing
    connections draw from (a port picked there was once taken before HAProxy could bind it), and
    between Ray's worker ports (10002-19999) and its direct-ingress ports (30000-31000)."""
    for port in random.sample(range(20000, 30000), 200):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port in 20000-29999")


def role_aware_reply(request: dict[str, Any]) -> str:
    return ROLE_REPLIES.get(request.get("model", ""), "Simulated answer.")


def sim_config_dict(base_url: str, **sections: Any) -> dict[str, Any]:
    """A config as the YAML file would hold it; `sections` override top-level keys."""
    models = {role: {"base_url": base_url, "model": f"sim-{role}", "max_tokens": 64, "timeout_s": 2} for role in ROLES}
    config: dict[str, Any] = {
        "models": models,
        "thinking": {"num_threads": 3, "max_steps": 2},
        "validation": {"enabled": True, "num_counterexamples": 3, "num_voters": 3, "pass_threshold": 2},
        # The shipped profiles: economy on, the original's behaviour, and a deep one.
        "profiles": {
            "token-killer": {},
            "token-killer-classic": {"economy": False},
            "token-killer-deep": {"thinking": {"max_steps": 6}},
        },
        # Short backoff, but a `Retry-After` of up to 2 s is still waited out.
        "upstream": {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 2},
    }
    config.update(sections)
    return config


def sim_config(base_url: str, **sections: Any) -> ServiceConfig:
    return ServiceConfig.model_validate(sim_config_dict(base_url, **sections))


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def shipped_serve_config(
    port: int,
    *,
    app_config: Path | None = None,
    env: dict[str, str] | None = None,
    embedded: bool = False,
    min_replicas: int | None = None,
) -> dict[str, Any]:
    """The repo's serve_config.yaml with only what a test or benchmark run must change: the HTTP
    port, the app config file, environment variables for the app, the `local` application (kept
    only when `embedded`), and optionally at least `min_replicas` of each role deployment."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    if not embedded:
        config["applications"] = [a for a in config["applications"] if a["name"] != "local"]
    for app in config["applications"]:
        if app["name"] != "token-killer":
            continue
        if app_config is not None:
            app["args"]["config"] = str(app_config)
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env or {})
        for deployment in app["deployments"]:
            if min_replicas is None or deployment["name"] == "Ingress":
                continue
            if "autoscaling_config" in deployment:
                scaling = deployment["autoscaling_config"]
                scaling["min_replicas"] = max(scaling["min_replicas"], min_replicas)
                scaling["max_replicas"] = max(scaling["max_replicas"], min_replicas)
            else:
                deployment["num_replicas"] = max(deployment.get("num_replicas", 1), min_replicas)
    return config


def ray_env() -> tuple[dict[str, str], Path]:
    """ray.env (as `make run` starts Ray: HTTP through HAProxy) for one Serve instance here,
    with the ports Serve fixes by default moved to free ones: HAProxy's stats and metrics, and
    the fallback Python proxy behind it (it binds with SO_REUSEPORT, so it would silently share
    another instance's port and answer for it).

    Also returns a new directory for HAProxy's files (config, sockets, server state, logs), for
    the caller to remove when the instance stops, rather than one per instance that Ray leaves in
    /tmp/haproxy-serve/. It is short on purpose: Unix socket paths end at 108 bytes, and Ray adds
    the node id (56 characters)."""
    files = Path(tempfile.mkdtemp(prefix="tk-haproxy-"))
    env = {}
    for line in (ROOT / "ray.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().replace("$PWD", str(ROOT))
    env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
    env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = str(free_port())
    env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = str(files / "haproxy.cfg")
    env["RAY_SERVE_HAPROXY_SOCKET_PATH"] = str(files / "admin.sock")
    env["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"] = str(files / "metrics.sock")
    env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = str(files)
    env["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] = str(files / "server-state")
    return env, files


def error_shape_problem(status: int, body: bytes) -> str | None:
    """What is wrong with a non-2xx response body, if it is not OpenAI's error shape."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:120]!r}"
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if set(parsed) != {"error"} or not isinstance(error, dict):
        return f"{status} without an 'error' object: {body[:120]!r}"
    if set(error) != {"message", "type", "param", "code"} or not error["message"]:
        return f"{status} with error fields {sorted(error)}"
    return None


async def until(predicate, timeout: float = 2.0) -> None:
    """Wait until `predicate()` holds; fail the test if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def check_a_client_disconnect_stops_every_upstream_call(base_url: str, api_key: str, sim, stream: bool) -> None:
    """A client that leaves mid-request (a stream closed, a JSON call timed out at 1.2 s) stops
    every upstream call of its request at once: no call starts afterwards, fusion never runs."""
    import openai

    question = [{"role": "user", "content": "What is six times seven?"}]
    sim.latency = 0.5
    request_id = uuid.uuid4().hex
    impatient = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=1.2)

    sent = time.monotonic()
    if stream:
        response = impatient.chat.completions.create(
            model="token-killer", messages=question, stream=True, extra_headers={"x-request-id": request_id}
        )
        next(iter(response))  # the role chunk: the request is under way
        time.sleep(0.8)
        response.close()
    else:
        try:
            impatient.chat.completions.create(
                model="token-killer", messages=question, extra_headers={"x-request-id": request_id}
            )
            raise AssertionError("the request answered before the client's timeout")
        except openai.APITimeoutError:
            pass
    gone = time.monotonic()
    assert any(r.tag == request_id for r in sim.records), "the request reached the upstream"

    deadline = gone + 1.0
    while sim.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.in_flight == 0
    time.sleep(1.0)
    ours = [r for r in sim.records if r.tag == request_id]
    assert all(r.started < deadline for r in ours)
    timeline = [
        (r.model, round(r.started - sent, 3), r.finished and round(r.finished - sent, 3), r.cancelled) for r in ours
    ]
    assert not any(r.model == "sim-fuser" for r in ours), f"client left at {gone - sent:.3f} s: {timeline}"
    assert any(r.cancelled for r in ours)


def answers_ok(url: str) -> bool:
    """Whether a GET of `url` answers 200 right now (for services still starting)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
