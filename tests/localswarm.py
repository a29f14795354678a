"""Local swarms for tests: `LocalSwarm` (real `swarm` processes, from client.launcher) and `InProcessSwarm`
(bootstrap and PeerServers on one background event loop of the test process).
"""

from __future__ import annotations

import contextlib
import threading

from client.launcher import LocalSwarm, Proc, spawn

__all__ = ["LocalSwarm", "InProcessSwarm", "Proc", "spawn"]


class InProcessSwarm:
    """Bootstrap node and PeerServers on one event loop in a background thread of this process.

    Real p2pd daemons and real DHT nodes, but no Python start-up per peer, so the family matrix stays
    cheap. Peers are the same PeerServer objects `swarm peer` runs. `swarm_key`: a private swarm, whose
    bootstrap, peers and clients all hold that key.
    """

    def __init__(self, swarm_key=None):
        import asyncio

        self.swarm_key = swarm_key
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="inprocess-swarm", daemon=True)
        self._thread.start()
        self.servers = []
        self._bootstrap = self._run(self._start_bootstrap())

    def _run(self, coro, timeout_s: float = 120):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _start_bootstrap(self):
        from swarm import records
        from swarm.identity import Identity
        from swarm.net import NodeSettings, start_dht, start_p2p, visible_maddrs

        identity = Identity.load_or_create(None)
        settings = NodeSettings(identity_path=identity.p2pd_identity_path, swarm_key=self.swarm_key)
        p2p = await start_p2p(settings)
        identity.close()
        dht = await start_dht(p2p, settings, records.make_record_validator(identity))
        self.initial_peers = await visible_maddrs(p2p)
        return p2p, dht

    def start_peers(self, model_path, spans: list[str], **config_fields) -> list:
        """Start peers for these spans concurrently; returns their PeerServers once all are online."""
        import asyncio

        from peer.config import PeerConfig
        from peer.server import PeerServer
        from swarm.spans import Span

        servers = [
            PeerServer(PeerConfig(model_path=str(model_path), span=Span.parse(s),
                                  initial_peers=tuple(self.initial_peers), swarm_key=self.swarm_key, **config_fields))
            for s in spans
        ]

        async def start_all():
            await asyncio.gather(*(s.start() for s in servers))

        self._run(start_all())
        self.servers.extend(servers)
        return servers

    @contextlib.contextmanager
    def serving(self, model_path, spans: list[str], model_id: str, prompt, new_tokens: int):
        """Peers for `spans` under `model_id`, local transformers' greedy tokens for `prompt`, and a maker of
        clients (ClientConfig fields as keywords, 10 s step timeout, full precision only: they are compared
        with local transformers); on exit the clients shut down and the peers stop. Yields (servers,
        expected tokens, client maker)."""
        from transformers import AutoModelForCausalLM

        from client import ClientConfig, DistributedModelForCausalLM

        servers = self.start_peers(model_path, spans, model_id=model_id)
        local = AutoModelForCausalLM.from_pretrained(model_path).eval()
        expected = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        clients = []

        def client(**fields):
            config = ClientConfig(initial_peers=tuple(self.initial_peers), model_id=model_id, step_timeout_s=10,
                                  **{"swarm_key": self.swarm_key, "min_precision": "full", **fields})
            clients.append(DistributedModelForCausalLM.from_pretrained(model_path, client_config=config))
            return clients[-1]

        try:
            yield servers, expected, client
        finally:
            for c in clients:
                c.shutdown()
            for server in servers:
                self.stop_peer(server)

    def stop_peer(self, server) -> None:
        self._run(server.shutdown())
        self.servers.remove(server)

    def close(self) -> None:
        import asyncio

        async def stop_all():
            await asyncio.gather(*(s.shutdown() for s in self.servers), return_exceptions=True)
            from swarm.net import stop_node

            p2p, dht = self._bootstrap
            await stop_node(dht, p2p)

        try:
            self._run(stop_all(), timeout_s=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
