"""Client keys: the keys file, who a bearer token is, each key's limits, fair slots, and spend
kept in a real store (SQLite, and a PostgreSQL server the test session starts). No Ray."""

import asyncio
import calendar
import json

import psycopg
import pytest

from actors.admission import FairSlots, Gate
from actors.config import KeysConfig, LimitsConfig, RunSettings
from actors.keys import Key, KeyLimits, KeyRing, KeysFileError, env_key_id, hash_key, read_keys_file
from actors.protocol import APIError
from actors.spend import DAY, MINUTE, MONTH, Spend, SpendLedger, periods_at
from actors.spend_store import postgres_store, sqlite_store

# 2026-11-29 23:59:30 UTC: 30 s before the day ends, 2 days before the month does.
NOW = float(calendar.timegm((2026, 11, 29, 23, 59, 30)))


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request, tmp_path):
    """A factory of stores on one database: each call is another replica's connection."""
    if request.param == "sqlite":
        path = tmp_path / "spend.sqlite3"
        return lambda: sqlite_store(path)
    dsn = request.getfixturevalue("postgres_dsn")
    with psycopg.connect(dsn) as connection:  # one server per session: each test starts empty
        connection.execute("DROP TABLE IF EXISTS tk_spend")
    return lambda: postgres_store(dsn)


def test_periods_are_utc_minutes_days_and_months_with_their_ends():
    p = periods_at(NOW)
    assert (p.minute, p.day, p.month) == ("minute:2026-11-29T23:59", "day:2026-11-29", "month:2026-11")
    assert (p.minute_ends - NOW, p.day_ends - NOW, p.month_ends - NOW) == (30, 30, 30 + 86400)


# --- the keys file -------------------------------------------------------------------------------


def write_keys(path, text: str):
    path.write_text(text)
    return path


def test_a_keys_file_holds_hashes_ids_limits_and_profiles(tmp_path):
    path = write_keys(
        tmp_path / "keys.yaml",
        f"""
- id: alice
  hash: {hash_key("tk-alice")}
  limits: {{requests_per_minute: 60, max_in_flight: 4, tokens_per_day: 100000, usd_per_month: 20}}
  profiles: [token-killer]
- id: bob
  hash: {hash_key("tk-bob")}
""",
    )
    ring = KeyRing.load(path, env_keys=["plain-env-key"])
    alice = ring.authenticate("Bearer tk-alice")
    assert alice.id == "alice" and alice.limits.tokens_per_day == 100000 and alice.profiles == ("token-killer",)
    assert ring.authenticate("bearer  tk-bob ").id == "bob"
    assert ring.authenticate("Bearer plain-env-key").id == env_key_id("plain-env-key")
    assert env_key_id("plain-env-key").startswith("env-") and "plain" not in env_key_id("plain-env-key")
    for header in (None, "", "Bearer", "Bearer tk-carol", "Basic tk-alice", "tk-alice"):
        with pytest.raises(APIError) as refused:
            ring.authenticate(header)
        assert refused.value.status == 401 and refused.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "text, named",
    [
        ("- id: alice\n  hash: tk-the-plain-key\n", "0.hash"),  # a plain key is never accepted
        (f"- id: alice\n  hash: {hash_key('a')}\n  limits: {{tokens_per_dya: 5}}\n", "0.limits.tokens_per_dya"),
        (f"- id: 'has space'\n  hash: {hash_key('a')}\n", "0.id"),
        (f"- id: a\n  hash: {hash_key('a')}\n  limits: {{max_in_flight: 0}}\n", "0.limits.max_in_flight"),
        ("keys: {}\n", "should be a valid list"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_entry(tmp_path, text, named):
    with pytest.raises(KeysFileError, match=named.replace(".", r"\.")):
        read_keys_file(write_keys(tmp_path / "keys.yaml", text))


def test_two_keys_with_one_id_are_refused(tmp_path):
    path = write_keys(
        tmp_path / "k.yaml", f"- {{id: a, hash: '{hash_key('1')}'}}\n- {{id: a, hash: '{hash_key('2')}'}}\n"
    )
    with pytest.raises(KeysFileError, match="two keys have the id 'a'"):
        KeyRing.load(path, [])


def test_an_environment_key_also_in_the_file_keeps_the_files_entry(tmp_path):
    path = write_keys(tmp_path / "k.yaml", f"- {{id: named, hash: '{hash_key('shared')}'}}\n")
    ring = KeyRing.load(path, ["shared", "other"])
    assert ring.authenticate("Bearer shared").id == "named"
    assert sorted(ring.by_id) == sorted(["named", env_key_id("other")])
    assert KeyRing.load(None, []).open


# --- fair slots ----------------------------------------------------------------------------------


async def test_a_single_key_at_capacity_gets_503_at_once():
    slots = FairSlots(limit=2, retry_after_s=1, wait_s=5)
    await slots.enter("a")
    await slots.enter("a")
    with pytest.raises(APIError) as refused:
        await asyncio.wait_for(slots.enter("a"), 0.5)
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert refused.value.headers["Retry-After"] == "1"


async def test_a_key_that_holds_every_slot_is_refused_while_another_waits_for_the_next():
    clock = Clock(0.0)
    slots = FairSlots(limit=4, retry_after_s=1, wait_s=5, clock=clock)
    flood = [await slots.enter("flood") for _ in range(4)]  # alone, a key may take every slot
    waiting = asyncio.ensure_future(slots.enter("polite"))
    await asyncio.sleep(0)
    assert not waiting.done()
    with pytest.raises(APIError) as refused:  # holds 4, its share of 4 slots between 2 keys is 2
        await slots.enter("flood")
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    flood[0].release()
    polite = await asyncio.wait_for(waiting, 1)  # the freed slot went to the waiting key
    assert polite.key_id == "polite" and slots.in_flight == {"flood": 3, "polite": 1}
    flood[1].release()  # a slot is free, but the flooder is over its share while polite is active
    with pytest.raises(APIError):
        await slots.enter("flood")
    assert (await slots.enter("polite")).key_id == "polite"  # below its share: a free slot is its
    flood[2].release()
    flood[3].release()
    assert (await slots.enter("flood")).key_id == "flood"  # below its share (2) again
    await slots.enter("flood")
    with pytest.raises(APIError):  # at its share while polite runs
        await slots.enter("flood")


async def test_a_key_whose_requests_ended_stays_active_briefly_then_its_share_is_free():
    clock = Clock(0.0)
    slots = FairSlots(limit=4, retry_after_s=1, wait_s=5, clock=clock)
    polite = await slots.enter("polite")
    flood = [await slots.enter("flood") for _ in range(2)]  # its share beside polite: 2
    polite.release()  # between two of polite's requests
    clock.now += FairSlots.ACTIVE_FOR_S / 2
    with pytest.raises(APIError):
        await slots.enter("flood")
    clock.now += FairSlots.ACTIVE_FOR_S  # polite has gone quiet: the flooder is alone
    flood += [await slots.enter("flood") for _ in range(2)]
    assert slots.in_flight == {"flood": 4}


async def test_a_freed_slot_goes_to_the_waiting_key_with_the_fewest_in_flight():
    slots = FairSlots(limit=6, retry_after_s=1, wait_s=5)
    held = [await slots.enter("a") for _ in range(4)] + [await slots.enter("b")] + [await slots.enter("c")]
    b_waits = asyncio.ensure_future(slots.enter("b"))  # b holds 1, c holds 1: c asked later
    await asyncio.sleep(0)
    c_waits = asyncio.ensure_future(slots.enter("c"))
    await asyncio.sleep(0)
    held[0].release()
    await asyncio.sleep(0)
    assert b_waits.done() and not c_waits.done()  # equal in flight: first come
    held[1].release()
    await asyncio.sleep(0)
    assert c_waits.done() and slots.in_flight == {"a": 2, "b": 2, "c": 2}


async def test_a_wait_ends_with_503_after_admission_wait_s_and_leaves_no_trace():
    slots = FairSlots(limit=2, retry_after_s=3, wait_s=0.05)
    await slots.enter("a")
    await slots.enter("a")
    with pytest.raises(APIError) as refused:
        await slots.enter("b")
    assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "3"
    assert not slots._waiting and slots.current == 2


async def test_a_waiting_client_that_leaves_gives_its_place_up():
    slots = FairSlots(limit=1, retry_after_s=1, wait_s=5)
    held = await slots.enter("a")
    waiting = asyncio.ensure_future(slots.enter("b"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    held.release()
    assert slots.current == 0 and not slots._waiting and not slots.in_flight


# --- each key's limits ---------------------------------------------------------------------------


async def gate_with(tmp_path, limits: KeyLimits, clock: Clock, max_in_flight: int = 100, **key) -> Gate:
    ledger = SpendLedger(sqlite_store(tmp_path / "spend.sqlite3"), clock=clock)
    await ledger.start()
    ring = KeyRing([Key(id="k", hash=hash_key("tk-k"), limits=limits, **key)])
    return Gate(ring, ledger, FairSlots(max_in_flight, 1, 5))


async def test_requests_per_minute_are_refused_with_429_until_the_minute_ends(tmp_path):
    gate = await gate_with(tmp_path, KeyLimits(requests_per_minute=3), Clock())
    key = gate.authenticate("Bearer tk-k")
    for _ in range(3):
        (await gate.admit(key))[1].release()
    with pytest.raises(APIError) as refused:
        await gate.admit(key)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers["Retry-After"] == "30"  # the minute ends at 23:59:60
    gate.ledger.clock.now += 30
    await gate.admit(key)
    await gate.close()


async def test_requests_in_flight_per_key_are_limited(tmp_path):
    gate = await gate_with(tmp_path, KeyLimits(max_in_flight=2), Clock())
    key = gate.authenticate("Bearer tk-k")
    first = (await gate.admit(key))[1]
    await gate.admit(key)
    with pytest.raises(APIError) as refused:
        await gate.admit(key)
    assert refused.value.status == 429 and "2 requests at once" in refused.value.message
    first.release()
    await gate.admit(key)
    await gate.close()


@pytest.mark.parametrize(
    "limits, usage, resets_in",
    [
        (KeyLimits(tokens_per_day=1000), (600, 400, 0.0), "30"),
        (KeyLimits(tokens_per_month=1000), (900, 100, 0.0), str(30 + 86400)),
        (KeyLimits(usd_per_day=0.5), (10, 10, 0.5), "30"),
        (KeyLimits(usd_per_month=2), (10, 10, 2.5), str(30 + 86400)),
    ],
)
async def test_a_spent_budget_is_429_insufficient_quota_until_its_period_ends(tmp_path, limits, usage, resets_in):
    clock = Clock()
    gate = await gate_with(tmp_path, limits, clock)
    key = gate.authenticate("Bearer tk-k")
    grant, slot = await gate.admit(key)
    gate.record(grant.key_id, *usage)
    slot.release()
    with pytest.raises(APIError) as refused:
        await gate.admit(key)
    error = refused.value
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "insufficient_quota")
    assert error.headers["Retry-After"] == resets_in and error.headers["x-should-retry"] == "false"
    clock.now += int(resets_in)  # the next period starts from nothing
    await gate.admit(key)
    await gate.close()


async def test_a_request_gets_at_most_the_tokens_its_key_has_left_as_its_budget(tmp_path):
    gate = await gate_with(tmp_path, KeyLimits(tokens_per_day=10_000, tokens_per_month=50_000), Clock())
    key = gate.authenticate("Bearer tk-k")
    grant, slot = await gate.admit(key)
    gate.record(grant.key_id, 3000, 1000, 0.0)
    slot.release()
    grant, _ = await gate.admit(key)
    assert (grant.remaining_tokens, grant.period) == (6000, DAY)
    assert grant.settings("token-killer", RunSettings()).budget_tokens == 6000  # none asked: the rest
    assert grant.settings("token-killer", RunSettings(budget_tokens=9000)).budget_tokens == 6000
    assert grant.settings("token-killer", RunSettings(budget_tokens=2000)).budget_tokens == 2000
    # Too little left for the request's minimum: a spent quota (429), not a bad request (400).
    small = APIError(400, "needs at least 7000", code="budget_too_small")
    error = grant.budget_error(small, RunSettings(budget_tokens=6000))
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "insufficient_quota", "30")
    assert grant.budget_error(small, RunSettings(budget_tokens=5000)) is small  # the client's own budget
    await gate.close()


async def test_a_key_uses_only_its_profiles(tmp_path):
    gate = await gate_with(tmp_path, KeyLimits(), Clock(), profiles=("token-killer",))
    grant, _ = await gate.admit(gate.authenticate("Bearer tk-k"))
    assert grant.settings("token-killer", RunSettings()) == RunSettings()
    with pytest.raises(APIError) as refused:
        grant.settings("token-killer-deep", RunSettings())
    assert (refused.value.status, refused.value.code, refused.value.param) == (403, "model_not_allowed", "model")
    await gate.close()


# --- spend in the store --------------------------------------------------------------------------


async def test_replicas_share_spend_through_the_store_and_a_restart_reads_it_back(make_store):
    clock = Clock()
    one, two = SpendLedger(make_store(), clock), SpendLedger(make_store(), clock)
    await one.start()
    await two.start()
    one.count_request("alice")
    one.count_usage("alice", 100, 20, 0.25)
    two.count_request("alice")
    two.count_usage("alice", 1000, 200, 1.5)
    two.count_usage("bob", 7, 3, 0.0)
    assert one.spent("alice", DAY) == Spend(1, 100, 20, 0.25)  # its own at once
    await one.sync()
    await two.sync()
    await one.sync()
    for ledger in (one, two):
        assert ledger.spent("alice", DAY) == Spend(2, 1100, 220, 1.75)
        assert ledger.spent("alice", MONTH) == Spend(2, 1100, 220, 1.75)
        assert ledger.spent("alice", MINUTE).requests == 2
    await one.close()
    await two.close()
    restarted = SpendLedger(make_store(), clock)
    await restarted.start()
    assert restarted.spent("alice", DAY) == Spend(2, 1100, 220, 1.75) and restarted.spent("bob", DAY).tokens == 10
    clock.now += 60  # the next minute and day: counted afresh, the month goes on
    await restarted.sync()
    assert restarted.spent("alice", MINUTE) == Spend() and restarted.spent("alice", DAY) == Spend()
    assert restarted.spent("alice", MONTH).tokens == 1320
    await restarted.close()


async def test_counts_are_kept_while_the_store_is_unreachable_and_written_when_it_is_back(tmp_path):
    store = sqlite_store(tmp_path / "spend.sqlite3")
    ledger = SpendLedger(store)
    await ledger.start()
    real = store.exchange

    async def down(*args, **kwargs):
        raise OSError("store down")

    store.exchange = down
    ledger.count_usage("alice", 10, 5, 0.0)
    with pytest.raises(OSError):
        await ledger.sync()
    ledger.count_usage("alice", 1, 1, 0.0)
    assert ledger.spent("alice", DAY).tokens == 17  # still counted here
    store.exchange = real
    await ledger.sync()
    await ledger.close()
    again = SpendLedger(sqlite_store(tmp_path / "spend.sqlite3"))
    await again.start()
    assert again.spent("alice", DAY).tokens == 17  # written once, nothing lost or doubled
    await again.close()


def test_keys_config_defaults_to_the_embedded_store():
    config = KeysConfig()
    assert config.file is None and config.store.kind == "sqlite" and config.sync_interval_s == 1.0
    assert KeysConfig.model_validate({"store": {"kind": "postgres"}}).store.dsn_env == "TOKEN_KILLER_SPEND_DSN"
    assert LimitsConfig().max_in_flight == 1000


# --- the CLI -------------------------------------------------------------------------------------


def test_the_cli_makes_keys_it_never_stores_and_imports_the_environments_under_their_ids(tmp_path, monkeypatch, capsys):
    from actors.keys_cli import main

    config = tmp_path / "service.yaml"
    keys = tmp_path / "keys.yaml"
    config.write_text(f"keys: {{file: {keys}, store: {{kind: sqlite, path: {tmp_path / 'spend.sqlite3'}}}}}\n")
    main(["--config", str(config), "new", "alice", "--tokens-per-day", "5000", "--profiles", "token-killer"])
    plain = capsys.readouterr().out.strip()
    assert plain.startswith("tk-") and plain not in keys.read_text()
    monkeypatch.setenv("TOKEN_KILLER_API_KEYS", "old-key-1, old-key-2")
    main(["--config", str(config), "import-env"])
    ring = KeyRing.load(keys, [])
    alice = ring.authenticate(f"Bearer {plain}")
    assert alice.limits.tokens_per_day == 5000 and alice.profiles == ("token-killer",)
    assert ring.authenticate("Bearer old-key-2").id == env_key_id("old-key-2")  # the id it had
    with pytest.raises(SystemExit, match="already has a key 'alice'"):
        main(["--config", str(config), "new", "alice"])
    capsys.readouterr()
    main(["--config", str(config), "spend", "--json"])
    report = {entry["id"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert report["alice"]["day"]["tokens"] == 0 and report["alice"]["limits"] == {"tokens_per_day": 5000}
