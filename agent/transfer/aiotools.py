"""asyncio helpers of the fetch path: a cancellable ``to_thread`` that never leaves its thread behind, and a
fail-fast gather that raises the first real error unwrapped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args: Any, on_abandon: Callable[[T], None] | None = None,
                     **kwargs: Any) -> T:
    """``asyncio.to_thread`` that, when cancelled, waits for the thread before re-raising.

    A cancelled ``to_thread`` returns at once while its thread runs on; the caller's cleanup (deleting the
    staging tree, closing the fd) would then race file work still in flight — a late adopt re-creating a deleted
    tree, a publish swapping the pointer after its snapshot was removed, a pread on a closed (or reused) fd. If
    the thread succeeded after all, ``on_abandon`` gets its result (to close an fd nobody will use).
    """
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue  # cancelled again: still wait; the CancelledError below is raised all the same
        if not future.cancelled() and future.exception() is None and on_abandon is not None:
            on_abandon(future.result())
        raise


async def gather_all(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all, fail fast: the first error cancels the rest (a TaskGroup), re-raised unwrapped."""
    results: list[T] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
    for t in tasks:
        results.append(t.result())
    return results


def first_error(eg: BaseExceptionGroup) -> BaseException:
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            return first_error(e)
        if not isinstance(e, asyncio.CancelledError):
            return e
    return eg.exceptions[0]
