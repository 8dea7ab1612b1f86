"""Poll for a condition with a deadline: what the k8s tests do instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,  # noqa: ASYNC109
    *,
    interval: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T],
    timeout: float = ...,  # noqa: ASYNC109
    *,
    interval: float = ...,
    what: str = ...,
) -> T: ...


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling helper: the deadline is its point
    *,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Call ``predicate`` (sync or async) until it returns a truthy value; return that value.

    Raises ``TimeoutError`` naming ``what`` (or the predicate) and the last value
    seen, so that a failing test says what it was waiting for.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"waited {timeout:g}s for {what or getattr(predicate, '__name__', 'a condition')}; "
                f"last value: {value!r}"
            )
        await asyncio.sleep(interval)
