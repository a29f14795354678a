"""The sync facade: one event loop on a daemon thread per process, for the sync client API.

`run(coro, timeout_s)` submits a coroutine and waits for it; every client await still carries its own
timeout inside the coroutine, this one only bounds the whole call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="swarm-client-loop", daemon=True).start()
        return _loop


def run(coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
    """Run a coroutine on the client loop from synchronous code and return its result."""
    loop = get_loop()
    if threading.current_thread().name == "swarm-client-loop":
        raise RuntimeError("client.loop.run called from the client loop itself; await the coroutine instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout_s)
    except TimeoutError:
        future.cancel()
        raise
