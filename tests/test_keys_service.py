"""Keys with identities and limits in the real app: a keys file, its limits, fair slots, and spend
that survives a restart, in the embedded store (SQLite) and a real PostgreSQL server.

A second application, `keyed`, runs beside the session's app at /keyed with its own config (a
keys file, a spend store, 6 slots); a restart deletes it and deploys it again (new replicas, the
spend only in the store)."""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import yaml

from actors.keys import hash_key
from tests.conftest import deploy, service_config
from tests.support import ROOT, shipped_serve_config, write_config
from tests.test_reliability import _logged

pytestmark = pytest.mark.serve

MODEL = "token-killer"
QUESTION = [{"role": "user", "content": "What is six times seven?"}]
SLOTS = 6
# id -> (key, limits, profiles)
KEYS = {
    "flood": ("tk-flood-key", {}, None),
    "alice": ("tk-alice-key", {}, None),
    "bob": ("tk-bob-key", {}, None),
    "budget": ("tk-budget-key", {"tokens_per_day": 2500}, None),
    "rpm": ("tk-rpm-key", {"requests_per_minute": 2}, None),
    "narrow": ("tk-narrow-key", {}, ["token-killer"]),
}


def keys_file(path):
    entries = []
    for key_id, (plain, limits, profiles) in KEYS.items():
        entry = {"id": key_id, "hash": hash_key(plain), "limits": limits}
        if profiles:
            entry["profiles"] = profiles
        entries.append(entry)
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.fixture(scope="module")
def keyed(service_apps, serve_http, upstream_server, tmp_path_factory):
    """deploy(store) puts the keyed app up with that store (again: a restart); returns a client
    factory by key id, and the app's config path."""
    port = int(serve_http.rsplit(":", 1)[1])
    real = service_apps[0]
    directory = tmp_path_factory.mktemp("keyed")
    keys = keys_file(directory / "keys.yaml")

    def up(store: dict, env: dict[str, str] | None = None):
        config = service_config(upstream_server.base_url)
        config["limits"] |= {"max_in_flight": SLOTS, "budget_tokens": None}
        config["keys"] = {"file": str(keys), "store": store, "sync_interval_s": 0.2, "admission_wait_s": 20}
        path = write_config(directory / f"keyed-{store['kind']}.yaml", config)
        app = shipped_serve_config(port)["applications"][0]
        app.update(name="keyed", route_prefix="/keyed", args={"config": str(path)})
        app["runtime_env"] = {**real["runtime_env"], "env_vars": {**real["runtime_env"]["env_vars"], **(env or {})}}
        deploy([real])  # the keyed app, if up, is gone: its replicas stop
        deploy([real, app])

        def client(key_id: str, **options) -> openai.OpenAI:
            return openai.OpenAI(
                base_url=f"{serve_http}/keyed/v1", api_key=KEYS[key_id][0], max_retries=0, timeout=60, **options
            )

        return client, path

    yield up
    deploy([real])


@pytest.fixture(scope="module")
def sqlite_keyed(keyed, tmp_path_factory):
    store = {"kind": "sqlite", "path": str(tmp_path_factory.mktemp("spend") / "spend.sqlite3")}
    return keyed(store)


def ask(client: openai.OpenAI, model: str = MODEL):
    """(status, error code or None, Retry-After or None, seconds)."""
    started = time.monotonic()
    try:
        client.chat.completions.create(model=model, messages=QUESTION)
        return 200, None, None, time.monotonic() - started
    except openai.APIStatusError as error:
        return error.status_code, error.body.get("code"), error.response.headers.get("retry-after"), None


def test_the_key_id_never_the_key_is_in_the_reply_the_stream_and_request_complete(sqlite_keyed, sim):
    client, _ = sqlite_keyed
    tag = f"keyed-{time.time_ns()}"
    reply = client("alice").chat.completions.create(model=MODEL, messages=QUESTION, extra_headers={"x-request-id": tag})
    assert reply.model_extra["token_killer"]["key_id"] == "alice"
    chunks = list(
        client("bob").chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].model_extra["token_killer"]["key_id"] == "bob"
    logged = [line for path in _logged(tag) for line in path.read_text().splitlines() if tag in line]
    complete = [json.loads(line[line.index("{") :]) for line in logged if "request_complete" in line]
    assert complete and complete[0]["key_id"] == "alice"
    assert not any(KEYS["alice"][0] in line for line in logged)


def test_the_responses_api_goes_through_the_same_keys(sqlite_keyed, sim):
    client, _ = sqlite_keyed
    response = client("alice").responses.create(model=MODEL, input="What is six times seven?")
    assert response.model_extra["token_killer"]["key_id"] == "alice"
    with pytest.raises(openai.PermissionDeniedError):
        client("narrow").responses.create(model="token-killer-deep", input="What is six times seven?")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client("alice").base_url), api_key="tk-wrong", max_retries=0).responses.create(
            model=MODEL, input="Hi"
        )


def test_a_flooding_key_gets_429_and_the_others_are_all_served(sqlite_keyed, sim):
    """Three keys on 6 slots: the flooder keeps 24 requests coming (each refusal retried after
    0.1 s), then two polite keys send 2 at once each, 3 times."""
    client, _ = sqlite_keyed
    sim.latency = 0.2  # a request holds its slot about a second
    flooder, alice, bob = client("flood"), client("alice"), client("bob")
    polite_done = threading.Event()

    def flood() -> list:
        results = []
        while not polite_done.is_set():
            results.append(ask(flooder))
            if results[-1][0] != 200:
                time.sleep(0.1)
        return results

    with ThreadPoolExecutor(30) as pool:
        flooding = [pool.submit(flood) for _ in range(24)]
        time.sleep(1.0)  # every slot is the flooder's now
        polite = [pool.submit(lambda c=c: [ask(c) for _ in range(3)]) for c in (alice, bob) for _ in range(2)]
        served = [r for f in polite for r in f.result()]
        polite_done.set()
        flooded = [r for f in flooding for r in f.result()]
    assert [status for status, *_ in served] == [200] * 12, served
    # Alone, the flooder met a full service (503); beside keys that wait, its excess is a 429.
    refused = [r for r in flooded if r[0] == 429]
    assert refused and all(code == "rate_limit_exceeded" and retry == "2" for _, code, retry, _ in refused)
    assert {status for status, *_ in flooded} <= {200, 429, 503}
    assert sum(status == 200 for status, *_ in flooded) >= SLOTS  # it still had its share


def test_requests_per_minute_over_the_limit_get_429_with_retry_after(sqlite_keyed, sim):
    client, _ = sqlite_keyed
    statuses = [ask(client("rpm")) for _ in range(3)]
    if [s[0] for s in statuses] != [200, 200, 429]:  # the minute turned between them: once more
        statuses = [ask(client("rpm")) for _ in range(3)]
    assert [s[0] for s in statuses] == [200, 200, 429]
    _, code, retry_after, _ = statuses[2]
    assert code == "rate_limit_exceeded" and 1 <= int(retry_after) <= 60


def test_a_key_may_use_only_its_profiles_and_lists_only_those(sqlite_keyed, sim):
    client, _ = sqlite_keyed
    narrow = client("narrow")
    assert narrow.chat.completions.create(model=MODEL, messages=QUESTION).choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError) as refused:
        narrow.chat.completions.create(model="token-killer-deep", messages=QUESTION)
    assert refused.value.body["code"] == "model_not_allowed"
    assert [m.id for m in narrow.models.list()] == [MODEL]
    assert len(client("alice").models.list().data) == 3


def spend_cli(config_path, env: dict[str, str] | None = None) -> dict[str, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "actors.keys_cli", "--config", str(config_path), "spend", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=True,
    )
    return {entry["id"]: entry for entry in json.loads(done.stdout)}


def check_spend_survives_a_restart(keyed, store: dict, env: dict[str, str] | None = None) -> None:
    """The budget key spends its 2,500 tokens a day (each request's budget is what it has left,
    then 429 insufficient_quota); after the app is deleted and deployed again, the CLI shows the
    same spend and the key is still refused."""
    client, path = keyed(store, env)
    budget = client("budget")
    budgets, outcomes = [], []
    for _ in range(12):
        try:
            reply = budget.chat.completions.create(model=MODEL, messages=QUESTION)
            budgets.append(reply.model_extra["token_killer"]["budget_tokens"])
        except openai.RateLimitError as error:
            outcomes.append((error.body["code"], error.response.headers))
            break
    assert budgets and budgets[0] == 2500 and all(b < a for a, b in zip(budgets, budgets[1:], strict=False))
    assert outcomes and outcomes[0][0] == "insufficient_quota", (budgets, outcomes)
    retry_after = int(outcomes[0][1]["retry-after"])
    assert 0 < retry_after <= 86400 and outcomes[0][1]["x-should-retry"] == "false"
    time.sleep(0.5)  # two sync intervals: every count is in the store
    before = spend_cli(path, env)["budget"]
    # The refused request counts when it was refused for its size after admission.
    assert before["day"]["requests"] in (len(budgets), len(budgets) + 1) and before["day"]["tokens"] > 0
    assert before["limits"] == {"tokens_per_day": 2500}

    client, _ = keyed(store, env)  # the restart
    after = spend_cli(path, env)["budget"]
    assert after["day"] == before["day"]
    with pytest.raises(openai.RateLimitError) as still:
        client("budget").chat.completions.create(model=MODEL, messages=QUESTION)
    assert still.value.body["code"] == "insufficient_quota"
    assert client("alice").chat.completions.create(model=MODEL, messages=QUESTION).choices  # others go on


def test_spend_survives_a_restart_in_the_embedded_store(keyed, sim, tmp_path):
    check_spend_survives_a_restart(keyed, {"kind": "sqlite", "path": str(tmp_path / "spend.sqlite3")})


def test_spend_survives_a_restart_in_postgres(keyed, sim, postgres_dsn):
    import psycopg

    with psycopg.connect(postgres_dsn) as connection:  # the session's server: start empty
        connection.execute("DROP TABLE IF EXISTS tk_spend")
    env = {"TK_TEST_SPEND_DSN": postgres_dsn}
    check_spend_survives_a_restart(keyed, {"kind": "postgres", "dsn_env": "TK_TEST_SPEND_DSN"}, env)
