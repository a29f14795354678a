"""A process for tests/test_scale_net.py, run inside one of the scale harness's hosts.

    python tests/scale_dial.py listen REAL RELAY PORT [INITIAL_PEER]  serves a ping, prints `id PEER_ID MADDR`
    python tests/scale_dial.py dial INITIAL_PEER PEER_ID              pings it (10 tries, 1 s apart), printing
                                                                      `error ...` per failed try, then
                                                                      `answered attempt N after T s` or `failed`

The dialing process starts as a client does (client mode: it listens on loopback only, so nobody dials
it) and knows the listener by peer id only, as when a DHT answer names a node: p2pd must find the address.
"""

from __future__ import annotations

import asyncio
import sys

from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2

from swarm.net import NodeSettings, start_p2p


async def listen(real: str, relay: str, port: int, initial: list[str]) -> None:
    p2p = await start_p2p(NodeSettings(initial_peers=initial, host=real, port=port,
                                       announce_maddrs=[f"/ip4/{relay}/tcp/{port}"]))

    async def ping(request, context):
        return dht_pb2.PingResponse(available=True)

    await p2p.add_protobuf_handler("scale-dial-ping", ping, dht_pb2.PingRequest)
    print(f"id {p2p.peer_id.to_base58()} /ip4/{relay}/tcp/{port}/p2p/{p2p.peer_id.to_base58()}", flush=True)
    await asyncio.sleep(3600)


async def dial(initial: str, target: str) -> None:
    p2p = await start_p2p(NodeSettings(initial_peers=[initial], client_mode=True, check_identity_free=False))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for attempt in range(1, 11):
            try:
                answer = await asyncio.wait_for(p2p.call_protobuf_handler(
                    PeerID.from_base58(target), "scale-dial-ping", dht_pb2.PingRequest(), dht_pb2.PingResponse), 30)
                print(f"{'answered' if answer.available else 'failed unavailable'} attempt {attempt} "
                      f"after {loop.time() - started:.2f} s", flush=True)
                return
            except Exception as e:
                print(f"error {e!r} at {loop.time() - started:.2f} s", flush=True)
                await asyncio.sleep(1)
        print("failed", flush=True)
    finally:
        await p2p.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "listen":
        _, _, real, relay, port, *initial = sys.argv
        asyncio.run(listen(real, relay, int(port), initial))
    else:
        asyncio.run(dial(sys.argv[2], sys.argv[3]))
