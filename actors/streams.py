"""The one helper for async streams: many writers, one reader of batches of what is ready.

Used wherever results arrive from concurrent work and leave through something slow (a message
through Ray, a network write): the threads of a request, the fuser's tokens, the SSE reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

_CLOSED = object()


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Outbox(Generic[T]):
    """Items put by any number of writers, read as batches.

    A batch never waits to fill: the first item goes out at once, together with what arrived
    while the previous batch was being handled, so a slow reader gets fewer, larger batches and
    no item is held back. Each writer calls `close()` (or `fail()`) once when it is done.
    """

    def __init__(self, writers: int) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._open = writers

    def put(self, item: T) -> None:
        self._queue.put_nowait(item)

    def close(self) -> None:
        self._queue.put_nowait(_CLOSED)

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(_Failed(error))

    async def batches(self, *, idle_s: float | None = None, spacing_s: float = 0.0) -> AsyncIterator[list[T]]:
        """Batches until every writer has closed; a writer's failure is raised here. With
        `idle_s`, an empty batch comes after that long without an item (a keepalive). With
        `spacing_s`, a batch that follows the previous one sooner than that waits out the rest
        of the interval, gathering what else arrives (the first item of a quiet spell still
        goes at once): fewer, fuller messages for a busy stream."""
        queue = self._queue
        loop = asyncio.get_running_loop()
        last = -spacing_s
        while self._open:
            if idle_s is None or not queue.empty():
                item = await queue.get()
            else:
                try:
                    async with asyncio.timeout(idle_s):
                        item = await queue.get()
                except TimeoutError:
                    yield []
                    continue
            wait = spacing_s - (loop.time() - last)
            if wait > 0:
                await asyncio.sleep(wait)
            batch: list[T] = []
            failed: _Failed | None = None
            while True:
                if item is _CLOSED:
                    self._open -= 1
                elif isinstance(item, _Failed):
                    failed = item
                    break
                else:
                    batch.append(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                last = loop.time()
                yield batch  # what arrived before a failure is delivered first
            if failed is not None:
                raise failed.error


async def batches(
    sources: Iterable[AsyncIterator[T]], *, idle_s: float | None = None, spacing_s: float = 0.0
) -> AsyncIterator[list[T]]:
    """The items of every source as they arrive, in batches (see `Outbox`). A source's exception
    is raised here; the other sources are then cancelled. Ends when every source has."""
    sources = list(sources)
    outbox: Outbox[T] = Outbox(len(sources))

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                outbox.put(item)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            outbox.fail(exc)
        else:
            outbox.close()

    pumps = [asyncio.ensure_future(pump(source)) for source in sources]
    try:
        async for batch in outbox.batches(idle_s=idle_s, spacing_s=spacing_s):
            yield batch
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
