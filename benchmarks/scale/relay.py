"""The delaying relay: every connection between two hosts of the scale harness passes through it.

Runs in the hub namespace (benchmarks.scale.netns), where the hosts' relay addresses live. For every
listening host H and port P it accepts on (relay address of H, P). The connecting host S is known from
the connection's source address (its real address). The relay then dials H's real address from S's
relay address (so H sees S at the address S announces) and copies bytes both ways, each direction
delayed by the injected one-way delay and paced by the link's rate (benchmarks.scale.links):

    a chunk read at time t leaves at   depart = max(t, link_free) + len / rate   (link_free := depart)
    and is written at                  max(depart + delay(S -> H), not_before)

The pacer is shared by all connections of one directed host pair, so a link's cap holds across them.
Deliveries on one connection are in order (both terms only grow).

TCP's own handshake happens between the host and the hub, at once; the relay makes up for it: it dials
H only after delay(S -> H) (the SYN's trip), S's first bytes reach H no sooner than one round trip plus
delay(S -> H) after S connected (SYN, SYN-ACK, then data), and H's first bytes reach S no sooner than
two round trips after it. So a TLS or Noise handshake on top pays its round trips as over a real link.

Accuracy: the relay runs at a raised scheduling priority (nice -10 when it may), and reports how late
each delivery left against its schedule (`late_ms` percentiles; backpressure from a slow reader is not
counted, only the relay's own lag). Stats go to the config's stats_path every second.

Usage: python -m benchmarks.scale.relay CONFIG.json  (prints `relay ready N listeners` once listening).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import defaultdict, deque

from benchmarks.scale.links import Links

CHUNK_BYTES = 64 * 1024
QUEUE_CHUNKS = 64  # chunks in flight per direction before the reader waits (bounded memory)
CONNECT_TIMEOUT_S = 10.0
LATE_SAMPLES = 20000  # the lateness percentiles are of the last this many deliveries


class Pacer:
    """The departure clock of one directed link."""

    def __init__(self, rate_bytes_s: float):
        self.rate_bytes_s = rate_bytes_s
        self.free_at = 0.0

    def depart(self, now: float, size: int) -> float:
        self.free_at = max(now, self.free_at) + size / self.rate_bytes_s
        return self.free_at


class Relay:
    """config: links (Links JSON), hosts [{index, real, relay}], listen [host index], ports {port: kind},
    stats_path."""

    def __init__(self, config: dict):
        self.links = Links.from_json(config["links"])
        self.hosts = {h["index"]: h for h in config["hosts"]}
        self.by_real = {h["real"]: h["index"] for h in config["hosts"]}
        self.ports = {int(p): kind for p, kind in config["ports"].items()}
        self.stats_path = config["stats_path"]
        self.pacers: dict[tuple[int, int], Pacer] = {}
        # bytes[host][kind] = [sent, received]: what the host sent and received through the relay
        self.bytes: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self.connections: dict[str, int] = defaultdict(int)
        self.refused = 0
        self.open = 0
        self.late_s: deque[float] = deque(maxlen=LATE_SAMPLES)
        self.deliveries = 0
        self.servers: list[asyncio.base_events.Server] = []

    def pacer(self, src: int, dst: int) -> Pacer:
        key = (src, dst)
        if key not in self.pacers:
            self.pacers[key] = Pacer(self.links.rate_bytes_s(src, dst))
        return self.pacers[key]

    async def start(self, listen: list[int]) -> None:
        for index in listen:
            for port in self.ports:
                server = await asyncio.start_server(
                    lambda r, w, dst=index, port=port: self._accept(r, w, dst, port),
                    host=self.hosts[index]["relay"], port=port, limit=CHUNK_BYTES, backlog=512,
                )
                self.servers.append(server)

    async def _accept(self, reader, writer, dst: int, port: int) -> None:
        loop = asyncio.get_running_loop()
        connected_at = loop.time()
        src = self.by_real.get(writer.get_extra_info("peername")[0])
        if src is None or src == dst:
            self.refused += 1
            writer.close()
            return
        rtt = self.links.rtt_s(src, dst)
        up_writer = None
        self.open += 1
        try:
            await asyncio.sleep(self.links.delay_s(src, dst))  # the SYN's trip
            try:
                up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
                    self.hosts[dst]["real"], port, local_addr=(self.hosts[src]["relay"], 0), limit=CHUNK_BYTES,
                ), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                self.refused += 1
                return
            kind = self.ports[port]
            self.connections[kind] += 1
            forward = connected_at + rtt + self.links.delay_s(src, dst)
            await asyncio.gather(
                self._pump(reader, up_writer, src, dst, kind, not_before=forward),
                self._pump(up_reader, writer, dst, src, kind, not_before=connected_at + 2 * rtt),
            )
        finally:
            self.open -= 1
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    async def _pump(self, reader, writer, src: int, dst: int, kind: str, not_before: float) -> None:
        """Copy src -> dst with the link's delay and pacing. EOF is passed on (half-close); an error on
        either side closes this direction's writer, which ends the other direction too."""
        loop = asyncio.get_running_loop()
        delay_s = self.links.delay_s(src, dst)
        pacer = self.pacer(src, dst)
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        counts = self.bytes[src][kind], self.bytes[dst][kind]

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.late_s.append(loop.time() - at)
                self.deliveries += 1
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        me = asyncio.current_task()

        def on_delivery_end(task: asyncio.Task) -> None:  # a failed write must not leave the reader blocked
            if not task.cancelled() and task.exception() is not None:
                me.cancel()

        sender.add_done_callback(on_delivery_end)
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                now = loop.time()
                if not data:
                    await queue.put((max(now + delay_s, not_before), None))
                    break
                counts[0][0] += len(data)
                counts[1][1] += len(data)
                await queue.put((max(pacer.depart(now, len(data)) + delay_s, not_before), data))
            await sender
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
        except asyncio.CancelledError:
            if not (sender.done() and not sender.cancelled() and sender.exception() is not None):
                raise  # the relay is stopping
            writer.close()
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender

    def stats(self) -> dict:
        late = sorted(self.late_s)

        def pct(q: float) -> float | None:
            return round(late[min(len(late) - 1, int(q * len(late)))] * 1000, 2) if late else None

        return {
            "connections": dict(self.connections), "refused": self.refused, "open": self.open,
            "deliveries": self.deliveries,
            "late_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
            "bytes": {str(h): {k: {"sent": v[0], "received": v[1]} for k, v in kinds.items()}
                      for h, kinds in self.bytes.items()},
        }

    def write_stats(self) -> None:
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self.stats_path)


async def main(config_path: str) -> None:
    with open(config_path) as f:
        config = json.load(f)
    with contextlib.suppress(OSError):  # an emulated link must not lag behind the 40 processes it carries
        os.nice(-10)
    relay = Relay(config)
    await relay.start(config["listen"])
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"relay ready {len(relay.servers)} listeners", flush=True)
    while not stop.is_set():
        relay.write_stats()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    relay.write_stats()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
