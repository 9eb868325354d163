"""Photos from concurrent requests, run together: an asyncio queue flushed at `max_batch` items or
after `max_wait` seconds, with admission control and a deadline per item. `replicate serve` runs
its models through one.

    batcher = Batcher(run, max_batch=32, max_wait=0.005, max_queue=256, timeout=10)
    batcher.admit(1); result = await batcher.submit(item, key); batcher.release(1)

`run(key, items)` (for example: a set of loaded models and decoded photos) runs in one worker
thread, off the event loop; ONNX Runtime spreads each batch over the cores itself, so one batch at
a time keeps the machine busy without two batches fighting for it. Items with different keys (the
models before and after a reload) are never run together.

Written here rather than taken from a serving framework: BentoML, LitServe and Ray Serve batch
across requests, but in worker processes, and processes fought ONNX Runtime for the cores when
`predict` tried them for decoding; this is the part of them a one-process server needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(Exception):
    """More photos are waiting than `max_queue`: answer 429."""


class Expired(Exception):
    """The photo waited longer than `timeout` and was dropped before it was run: answer 504."""


@dataclass
class _Item:
    item: object
    key: object
    deadline: float
    future: asyncio.Future = field(repr=False)


class Batcher:
    """See the module docstring. The limits have no defaults here: `replicate serve` passes its
    options' (config.ServeOptions). `on_batch(n)` is called with each batch's size (metrics)."""

    def __init__(
        self,
        run: Callable[[object, list], list],
        *,
        max_batch: int,
        max_wait: float,
        max_queue: int,
        timeout: float,
        on_batch: Callable[[int], None] = lambda n: None,
    ):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.max_queue, self.timeout, self.on_batch = max_queue, timeout, on_batch
        self.admitted = 0  # photos admitted and not yet answered: decoding, waiting or running
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="inference")

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        """Photos queued and not yet taken into a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    def admit(self, n: int) -> None:
        """Reserve room for `n` photos, or QueueFull; `release(n)` once they are answered."""
        if self.admitted + n > self.max_queue:
            raise QueueFull(
                f"{n} more photo(s) would pass --max-queue {self.max_queue} ({self.admitted} in "
                "hand: decoding, waiting or running): retry in a second"
            )
        self.admitted += n

    def release(self, n: int) -> None:
        self.admitted -= n

    async def submit(self, item: object, key: object) -> object:
        """`run(key, [item, ...])`'s answer for `item`, batched with the others; Expired when it
        waited longer than `timeout`."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(item, key, time.monotonic() + self.timeout, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            flush_at = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if self.admitted <= len(batch):
                    break  # no other photo is in hand to wait for: run now, not in max_wait
                left = flush_at - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            now = time.monotonic()
            live = []
            for it in batch:
                if now > it.deadline:
                    waited = self.timeout + now - it.deadline
                    self._set(
                        it, error=Expired(f"waited {waited:.1f}s (--timeout {self.timeout:g})")
                    )
                else:
                    live.append(it)
            for key in dict.fromkeys(it.key for it in live):  # in order; usually one
                same = [it for it in live if it.key is key]
                self.on_batch(len(same))
                try:
                    answers = await loop.run_in_executor(
                        self._pool, self.run, key, [it.item for it in same]
                    )
                except Exception as e:  # the models failed on this batch: each request says so
                    for it in same:
                        self._set(it, error=e)
                    continue
                for it, answer in zip(same, answers):
                    self._set(it, answer)

    @staticmethod
    def _set(it: _Item, answer=None, error: Exception | None = None) -> None:
        if it.future.done():  # its request went away (the client disconnected)
            return
        if error is not None:
            it.future.set_exception(error)
        else:
            it.future.set_result(answer)
