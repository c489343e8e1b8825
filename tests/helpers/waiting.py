"""Waiting for a condition instead of sleeping for a guessed while."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

POLL_SECONDS = 0.02


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, seconds: float = 10.0
) -> None:
    """Return once ``check()`` is true; fail naming ``what`` after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"never happened within {seconds:g} s: {what}")
        await asyncio.sleep(POLL_SECONDS)
