"""A trio event loop on a thread of its own, and asyncio streams over its py-libp2p streams.

py-libp2p runs on trio; swarm's client and health monitor run on asyncio. `TrioThread` runs one trio
loop on a daemon thread for the life of a transport; asyncio code calls into it with `call` (a trio
coroutine's result as an awaitable, cancelled on the trio side when the asyncio caller is) and wraps
a py-libp2p stream as a real `asyncio.StreamReader`/`StreamWriter` pair with `open_streams`, so the
swarm protocol code (swarm.protocol's framing, client.stream) runs on it unchanged.

Crossing threads: asyncio -> trio through `TrioToken.run_sync_soon` (thread-safe, never blocks), trio
-> asyncio through `loop.call_soon_threadsafe`. A bridged stream has one trio task that writes what the
asyncio side wrote, in order (an unbounded channel, with asyncio-side flow control: the writer pauses
above HIGH_WATER_BYTES not yet handed to py-libp2p), and one that feeds what it reads to the asyncio
protocol. `writer.close()` half-closes (FIN) once everything written has gone out, then waits up to
CLOSE_WAIT_S for the remote end to finish before resetting the stream; `transport.abort()` resets at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import trio

logger = logging.getLogger(__name__)

READ_BYTES = 1 << 16
HIGH_WATER_BYTES = 4 << 20  # written but not yet sent: above this the asyncio writer's drain() waits
LOW_WATER_BYTES = 1 << 20
CLOSE_WAIT_S = 5.0


class TrioThread:
    """One trio loop on a daemon thread; `start()` from the asyncio loop that will use it."""

    def __init__(self, name: str = "swarm-lite-trio"):
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future | None = None
        self._finished: asyncio.Future | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._ready, self._finished = self.loop.create_future(), self.loop.create_future()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        await self._ready

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # reported to whoever awaits start() or stop()
            self._resolve(self._ready, e)
            self._resolve(self._finished, e)
        else:
            self._resolve(self._finished, None)

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        def resolve():
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the asyncio loop is closed: nobody is waiting any more
            pass

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._resolve(self._ready, None)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel every trio task and end the thread (waits up to `timeout_s`)."""
        if self.token is None or self._finished.done():
            return
        try:
            self.token.run_sync_soon(self._stop.set)
        except trio.RunFinishedError:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), timeout_s)
        except TimeoutError:
            logger.warning("the py-libp2p loop did not stop within %s s", timeout_s)

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a plain function on the trio thread, soon (from any thread). Raises ConnectionError once
        the trio loop has ended."""
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise ConnectionError("the py-libp2p loop has stopped") from None

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a trio task in the thread's nursery (from any thread)."""
        self.soon(self._nursery.start_soon, fn, *args)

    async def start_task(self, fn: Callable[..., Awaitable[Any]]) -> Any:
        """`nursery.start(fn)` in the thread's nursery, from asyncio: returns once `fn` has called
        `task_status.started()`; `fn` then runs until the loop stops."""
        async def starter():
            return await self._nursery.start(fn)

        return await self.call(starter)

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Await trio coroutine `fn(*args)` from asyncio; its exception is raised here. Cancelling the
        caller (a timeout, say) cancels the trio task."""
        future = self.loop.create_future()
        scope = trio.CancelScope()

        async def runner():
            try:
                with scope:
                    result = await fn(*args)
                    self.loop.call_soon_threadsafe(_set_result, future, result)
                    return
                self.loop.call_soon_threadsafe(_set_exception, future, ConnectionError("cancelled"))
            except Exception as e:  # handed to the asyncio caller
                self.loop.call_soon_threadsafe(_set_exception, future, e)

        self.spawn(runner)
        try:
            return await future
        except asyncio.CancelledError:
            try:
                self.soon(scope.cancel)
            except ConnectionError:
                pass
            raise

    def open_streams(self, stream, peername: str = "") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """asyncio (reader, writer) over py-libp2p `stream` (call on the asyncio loop); the bridge owns the
        stream from now on and closes or resets it when the writer is closed or the remote end goes."""
        reader = asyncio.StreamReader(limit=READ_BYTES, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        transport = _BridgedTransport(self, stream, protocol, peername)
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
        transport.start()
        return reader, writer


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class _BridgedTransport(asyncio.Transport):
    """The asyncio face of one py-libp2p stream. Its asyncio-side state is touched on the asyncio loop
    only; `_outgoing` and the pump tasks live on the trio thread."""

    def __init__(self, bridge: TrioThread, stream, protocol: asyncio.StreamReaderProtocol, peername: str):
        super().__init__()
        self._bridge, self._stream, self._protocol = bridge, stream, protocol
        self._extra = {"peername": peername}
        self._closing = False
        self._lost = False
        self._paused = False
        self._unsent = 0  # bytes written here and not yet handed to py-libp2p
        self._send, self._outgoing = trio.open_memory_channel(math.inf)
        self._reset = trio.Event()  # set on the trio thread (abort)

    def start(self) -> None:
        self._bridge.spawn(self._pump)

    # -------------------------------------------------- asyncio side

    def write(self, data) -> None:
        if self._closing:
            return  # as asyncio's own transports: writes after close() are dropped
        data = bytes(data)
        if not data:
            return
        self._unsent += len(data)
        try:
            self._bridge.soon(self._send.send_nowait, data)
        except ConnectionError as e:
            self._connection_lost(e)
            return
        if not self._paused and self._unsent > HIGH_WATER_BYTES:
            self._paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def _sent(self, nbytes: int) -> None:
        self._unsent -= nbytes
        if self._paused and self._unsent <= LOW_WATER_BYTES:
            self._paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self._unsent

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._bridge.soon(self._send.close)
        except ConnectionError as e:
            self._connection_lost(e)

    def abort(self) -> None:
        self._closing = True
        try:
            self._bridge.soon(self._reset.set)
        except ConnectionError as e:
            self._connection_lost(e)

    def get_extra_info(self, name, default=None):
        return self._extra.get(name, default)

    def is_reading(self) -> bool:
        return not self._lost

    def pause_reading(self) -> None:  # reads are bounded by the stream's own window; nothing to pause
        pass

    def resume_reading(self) -> None:
        pass

    def _data(self, data: bytes) -> None:
        if not self._lost:
            self._protocol.data_received(data)

    def _eof(self) -> None:
        if not self._lost:
            self._protocol.eof_received()

    def _connection_lost(self, error: BaseException | None) -> None:
        if not self._lost:
            self._lost = True
            self._closing = True
            self._protocol.connection_lost(error)

    # -------------------------------------------------- trio side

    def _to_asyncio(self, fn, *args) -> None:
        try:
            self._bridge.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the asyncio loop has closed: nobody reads this stream any more
            pass

    async def _pump(self) -> None:
        error: BaseException | None = None
        remote_done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_all, remote_done)
                nursery.start_soon(self._watch_reset, nursery.cancel_scope)
                async for data in self._outgoing:
                    await self._stream.write(data)
                    self._to_asyncio(self._sent, len(data))
                await self._stream.close_write()
                with trio.move_on_after(CLOSE_WAIT_S):
                    await remote_done.wait()
                nursery.cancel_scope.cancel()
        except Exception as e:  # a reset or broken connection: the asyncio side sees a lost connection
            error = ConnectionResetError(f"libp2p stream: {type(e).__name__}: {e}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await self._stream.reset()
                except Exception:  # already gone
                    pass
            self._to_asyncio(self._connection_lost, error)

    async def _watch_reset(self, scope: trio.CancelScope) -> None:
        await self._reset.wait()
        scope.cancel()

    async def _read_all(self, done: trio.Event) -> None:
        from libp2p.network.stream.exceptions import StreamEOF

        try:
            while True:
                try:
                    data = await self._stream.read(READ_BYTES)
                except StreamEOF:
                    break
                if not data:
                    break
                self._to_asyncio(self._data, data)
            self._to_asyncio(self._eof)
        except Exception as e:  # reset by the remote end
            self._to_asyncio(self._connection_lost, ConnectionResetError(f"libp2p stream: {type(e).__name__}"))
        finally:
            done.set()
