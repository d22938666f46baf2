"""Plain Python handlers: a kind's ``prepare``, ``process`` or ``on_finished`` may be a
plain function (or a plain generator) instead of an ``async`` one. Plain handlers run in
worker threads, so a ``time.sleep``, a blocking client library or a slow regular
expression never stops the event loop: other tasks, lease renewals, /healthz and the
watchdog carry on meanwhile.

A plain ``process`` takes one of ``--concurrency`` threads (set_thread_limit); plain
``prepare`` and ``on_finished`` share anyio's default thread pool, so that preparations
and hooks go on while every executor runs a long task.
Python cannot stop a thread: a plain handler past its kind's timeout, or whose job was
canceled, is abandoned (its outcome is written at once) and keeps its thread until it
returns.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

#: Payloads a plain ``prepare`` hands over per trip to its thread, at most, and the
#: longest a trip gathers them for (so that a slow generator still makes progress).
CHUNK = 1000
CHUNK_SECONDS = 0.05

# One limiter per event loop, as anyio keeps its own default one.
_limiter: RunVar[anyio.CapacityLimiter] = RunVar("herder_plain_handlers")


def set_thread_limit(threads: int) -> None:
    """At most ``threads`` plain handlers run at once on this event loop (the daemon's
    concurrency)."""
    _limiter_here().total_tokens = max(1, threads)


async def in_thread(fn: Callable[..., Any], *args: Any, executor: bool = False) -> Any:
    """``fn(*args)`` in a worker thread (one of the executors' with ``executor``); a
    cancellation abandons the thread."""
    limiter = _limiter_here() if executor else None
    return await anyio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=True)


def _limiter_here() -> anyio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(10)
        _limiter.set(limiter)
        return limiter


def is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def as_async(fn: Callable[..., Any], *, executor: bool = False) -> Callable[..., Any]:
    """``fn`` as a coroutine function: itself if it is one, else run in a thread."""
    if is_async(fn):
        return fn

    @functools.wraps(fn)
    async def call(arg: Any) -> Any:
        value = await in_thread(fn, arg, executor=executor)
        if inspect.isawaitable(value):  # a plain callable that returned a coroutine
            value = await value
        return value

    return call


def as_async_iterator(fn: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    """A ``prepare`` as an async generator function, whatever it is: an async generator
    function; a coroutine function or plain function returning an iterable (async or
    not); or a plain generator function, iterated in its thread a chunk per trip."""
    if inspect.isasyncgenfunction(fn):
        return fn

    @functools.wraps(fn)
    async def iterate(arg: Any) -> AsyncIterator[Any]:
        if inspect.iscoroutinefunction(fn):
            produced = await fn(arg)
        else:
            produced = await in_thread(fn, arg)
            if inspect.isawaitable(produced):
                produced = await produced
        if hasattr(produced, "__aiter__"):
            async for item in produced:
                yield item
            return
        iterator = await in_thread(iter, produced)
        try:
            while True:
                chunk, done = await in_thread(_next_chunk, iterator)
                for item in chunk:
                    yield item
                if done:
                    return
        finally:
            if hasattr(iterator, "close"):
                with anyio.CancelScope(shield=True):
                    await in_thread(_close, iterator)

    return iterate


def _close(iterator: Any) -> None:
    # Fails while the generator still runs in an abandoned thread, or for a hostile close().
    with contextlib.suppress(Exception):
        iterator.close()


def _next_chunk(iterator: Iterator[Any]) -> tuple[list[Any], bool]:
    chunk: list[Any] = []
    deadline = time.monotonic() + CHUNK_SECONDS
    for item in iterator:
        chunk.append(item)
        if len(chunk) >= CHUNK or time.monotonic() >= deadline:
            return chunk, False
    return chunk, True
