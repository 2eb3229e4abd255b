"""Outbox and batches(): many writers, one reader of batches of what is ready."""

import asyncio
import time

import pytest

from actors.streams import Outbox, batches
from tests.support import until


async def collect(outbox, **kwargs):
    return [batch async for batch in outbox.batches(**kwargs)]


async def test_everything_ready_goes_out_as_one_batch_and_ends_when_every_writer_closed():
    outbox = Outbox(2)
    outbox.put(1)
    outbox.put(2)
    outbox.close()
    outbox.put(3)  # the other writer is still open
    outbox.close()
    assert await collect(outbox) == [[1, 2, 3]]


async def test_no_writers_means_no_batches():
    assert await collect(Outbox(0)) == []


async def test_the_first_item_goes_out_at_once_and_what_arrives_meanwhile_comes_next():
    outbox = Outbox(1)
    seen = []

    async def read():
        async for batch in outbox.batches():
            seen.append(batch)
            await asyncio.sleep(0.02)  # a slow reader: the next items pile up

    reader = asyncio.ensure_future(read())
    outbox.put("a")
    await until(lambda: seen)
    assert seen == [["a"]]  # not held back waiting for more
    outbox.put("b")
    outbox.put("c")
    outbox.close()
    await asyncio.wait_for(reader, 1)
    assert seen == [["a"], ["b", "c"]]


async def test_an_idle_outbox_yields_an_empty_batch_as_a_keepalive():
    outbox = Outbox(1)
    iterator = outbox.batches(idle_s=0.05).__aiter__()
    started = time.monotonic()
    assert await asyncio.wait_for(anext(iterator), 1) == []
    assert 0.04 < time.monotonic() - started < 0.5
    outbox.put("x")
    assert await anext(iterator) == ["x"]  # an item ready is never delayed by the keepalive
    outbox.close()
    assert await anext(iterator, None) is None


async def test_no_keepalive_while_items_flow():
    outbox = Outbox(1)

    async def write():
        for i in range(5):
            outbox.put(i)
            await asyncio.sleep(0.01)
        outbox.close()

    writer = asyncio.ensure_future(write())
    got = await collect(outbox, idle_s=0.2)
    await writer
    assert [] not in got and [i for batch in got for i in batch] == [0, 1, 2, 3, 4]


async def test_a_writer_failure_is_raised_to_the_reader():
    outbox = Outbox(2)
    outbox.fail(ValueError("writer broke"))
    with pytest.raises(ValueError, match="writer broke"):
        await collect(outbox)


async def test_items_put_before_a_failure_are_delivered_before_it_is_raised():
    outbox = Outbox(1)
    outbox.put("first")
    outbox.put("second")
    outbox.fail(ValueError("writer broke"))
    got = []
    with pytest.raises(ValueError, match="writer broke"):
        async for batch in outbox.batches():
            got += batch
    assert got == ["first", "second"]


async def _source(items, delay=0.0, fail=None, log=None):
    try:
        for item in items:
            await asyncio.sleep(delay)
            yield item
        if fail is not None:
            raise fail
    except asyncio.CancelledError:
        if log is not None:
            log.append("cancelled")
        raise


async def test_batches_merges_every_source_and_ends_when_all_have():
    got = [batch async for batch in batches([_source([1, 2], 0.01), _source(["a", "b", "c"], 0.005)])]
    flat = [item for batch in got for item in batch]
    assert sorted(flat, key=str) == [1, 2, "a", "b", "c"]
    assert [i for i in flat if isinstance(i, int)] == [1, 2]  # each source in its own order
    assert [i for i in flat if isinstance(i, str)] == ["a", "b", "c"]


async def test_a_source_failure_is_raised_and_the_other_sources_are_cancelled():
    log = []
    slow = _source(range(100), 0.05, log=log)
    with pytest.raises(RuntimeError, match="source broke"):
        async for _ in batches([slow, _source([1], 0.0, fail=RuntimeError("source broke"))]):
            pass
    assert log == ["cancelled"]


async def test_leaving_batches_early_cancels_the_sources():
    log = []
    iterator = batches([_source(range(100), 0.01, log=log)]).__aiter__()
    assert await anext(iterator) == [0]
    await iterator.aclose()
    assert log == ["cancelled"]


async def test_batches_keepalive():
    iterator = batches([_source(["late"], 0.15)], idle_s=0.05).__aiter__()
    assert await anext(iterator) == []
    rest = [batch async for batch in iterator]
    assert rest[-1] == ["late"] and all(batch == [] for batch in rest[:-1])
