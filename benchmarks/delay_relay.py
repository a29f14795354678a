"""A user-space delaying TCP relay: a slow link on loopback, for benchmarks.

For each route LISTEN -> TARGET it accepts connections on 127.0.0.1:LISTEN, opens one to TARGET for each,
and copies bytes both ways, every chunk held back by the one-way delay in each direction: a chunk read
at time t is written at t + delay, in the order read. A peer started with `--port TARGET
--announce-maddrs /ip4/127.0.0.1/tcp/LISTEN` (and `--no-direct`, so no direct TLS port is announced
beside it) is then dialled through the relay by every client and every other peer, so each link of a
route (client -> peer, peer -> peer, peer -> client) pays the delay once per direction, as a home
connection would, while bandwidth stays loopback's.

What it does not model: TCP's handshake (a new connection is set up at once; benchmarks warm up their
connections first), bandwidth limits, jitter and loss. Half-closes are passed on (after the delay);
an error on either side closes both. Backpressure: at most QUEUE_CHUNKS chunks wait per direction, then
the relay stops reading, as a full socket buffer would.

    python benchmarks/delay_relay.py --delay-ms 50 --route 0:4100 --route 0:4101

prints `relay ready LISTEN_PORT ...` (0 picks a free port) once listening; on SIGINT or SIGTERM it
prints one JSON line of per-route counts (connections, bytes each way) and exits. `DelayRelay` is the
same thing for a caller's own event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import dataclass

CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 256


@dataclass
class Route:
    listen_port: int
    target_host: str
    target_port: int
    connections: int = 0
    bytes_to_target: int = 0
    bytes_from_target: int = 0

    def stats(self) -> dict:
        return {"listen_port": self.listen_port, "target": f"{self.target_host}:{self.target_port}",
                "connections": self.connections, "bytes_to_target": self.bytes_to_target,
                "bytes_from_target": self.bytes_from_target}


class DelayRelay:
    """Relays every route with `delay_s` one way. `start()` listens (returns the ports); `close()` stops."""

    def __init__(self, routes: list[Route], delay_s: float, host: str = "127.0.0.1"):
        if delay_s < 0:
            raise ValueError("the delay must be >= 0")
        self.routes, self.delay_s, self.host = routes, delay_s, host
        self.servers: list[asyncio.base_events.Server] = []
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> list[int]:
        for route in self.routes:
            server = await asyncio.start_server(lambda r, w, route=route: self._accept(r, w, route),
                                                self.host, route.listen_port, limit=CHUNK_BYTES)
            route.listen_port = server.sockets[0].getsockname()[1]
            self.servers.append(server)
        return [route.listen_port for route in self.routes]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader, writer, route: Route) -> None:
        self.tasks.add(asyncio.current_task())
        up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection(route.target_host, route.target_port,
                                                                 limit=CHUNK_BYTES)
            route.connections += 1
            await asyncio.gather(self._pump(reader, up_writer, route, "bytes_to_target"),
                                 self._pump(up_reader, writer, route, "bytes_from_target"))
        except (OSError, asyncio.IncompleteReadError):
            pass  # the target is gone, or a side reset: both sides close
        except asyncio.CancelledError:
            pass  # close(): this connection handler ends here (asyncio's callback would report a cancel)
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            self.tasks.discard(asyncio.current_task())

    async def _pump(self, reader, writer, route: Route, counter: str) -> None:
        """Copy reader -> writer, each chunk written `delay_s` after it was read, in order; EOF passed on."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                setattr(route, counter, getattr(route, counter) + len(data))
                reader_done = not data
                put = asyncio.ensure_future(queue.put((loop.time() + self.delay_s, data)))
                await asyncio.wait({put, delivering}, return_when=asyncio.FIRST_COMPLETED)
                if delivering.done():  # the writer failed (or passed the EOF on): stop reading
                    put.cancel()
                    break
                if reader_done:
                    break
            await delivering  # raises what the writer hit (a reset), which closes both sides
        finally:
            if not delivering.done():
                delivering.cancel()


def parse_route(text: str) -> Route:
    """LISTEN:TARGET_PORT or LISTEN:TARGET_HOST:TARGET_PORT."""
    parts = text.split(":")
    try:
        if len(parts) == 2:
            return Route(int(parts[0]), "127.0.0.1", int(parts[1]))
        if len(parts) == 3:
            return Route(int(parts[0]), parts[1], int(parts[2]))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected LISTEN:TARGET_PORT or LISTEN:HOST:TARGET_PORT")


async def serve(routes: list[Route], delay_s: float) -> None:
    relay = DelayRelay(routes, delay_s)
    ports = await relay.start()
    print("relay ready", *ports, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(json.dumps({"delay_ms": delay_s * 1000, "routes": [r.stats() for r in routes]}), flush=True)
    await relay.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, default=50.0,
                   help="one-way delay per direction of every connection")
    p.add_argument("--route", type=parse_route, action="append", required=True, metavar="LISTEN:TARGET",
                   help="relay 127.0.0.1:LISTEN to TARGET (a port on 127.0.0.1, or HOST:PORT); "
                        "LISTEN 0 = any")
    args = p.parse_args(argv)
    asyncio.run(serve(args.route, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
