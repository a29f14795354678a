"""Direct TLS streams (swarm.direct): both ends authenticated by their identity keys, bad dialers refused
with the listener going on; end to end, clients and pushing peers use them and fall back to p2pd.

The listener and dialer here are the real ones on loopback sockets (real TLS); the end-to-end cases run
real in-process peers (p2pd, DHT, PeerServer) and the real client.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig, DistributedModelForCausalLM, loop
from swarm.direct import DirectDialer, DirectServer, direct_addrs, tcp_endpoint
from swarm.errors import PeerError, PeerRefused
from swarm.identity import Identity
from swarm.protocol import read_message, write_message

MODEL_ID = "direct-llama"
PROMPT = torch.tensor([[1, 17, 230, 45, 99, 4, 310, 7]])
NEW_TOKENS = 8


def run(coro, timeout_s: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@pytest.fixture(scope="module")
def identities():
    made = [Identity.load_or_create(None) for _ in range(3)]
    yield made
    for identity in made:
        identity.close()


async def echo_server(identity: Identity, seen: list):
    """A listener with one handler that echoes one message and notes the dialer's peer id."""

    async def echo(info, reader, writer):
        seen.append(info.peer_id.to_base58())
        try:
            await write_message(writer, await read_message(reader, 1 << 23))
        finally:
            writer.close()

    server = DirectServer(identity.private_key, identity.peer_id.to_base58(), {"/echo": echo})
    port = await server.start("127.0.0.1", 0)
    return server, f"/ip4/127.0.0.1/tcp/{port}"


def test_both_ends_learn_each_others_peer_id(identities):
    listener, dialer = identities[0], identities[1]

    async def main():
        seen = []
        server, addr = await echo_server(listener, seen)
        try:
            reader, writer = await DirectDialer(dialer.private_key).open(listener.peer_id.to_base58(), addr, "/echo")
            await write_message(writer, {"hello": "world", "data": b"\x00" * 3_000_000})  # several TLS records
            reply = await read_message(reader, 1 << 23)
            writer.close()
            return seen, reply, server.accepted
        finally:
            await server.close()

    seen, reply, accepted = run(main())
    assert seen == [dialer.peer_id.to_base58()]
    assert reply == {"hello": "world", "data": b"\x00" * 3_000_000}
    assert accepted == 1


def test_the_wrong_listener_and_bad_dialers_are_refused_and_the_listener_goes_on(identities):
    listener, dialer, other = identities

    async def raw_hello(addr: str, fields: dict) -> dict:
        """Speak the handshake by hand with a chosen hello; returns the listener's answer."""
        reader, writer = await asyncio.open_connection(*tcp_endpoint(addr), ssl=_any_tls())
        try:
            challenge = await read_message(reader, 1 << 16)
            good = DirectDialer(dialer.private_key)
            der = good._key_der
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            from swarm.direct import _signed_text
            signed = fields.pop("_sign_for", (listener.peer_id.to_base58(), "/echo", challenge["nonce"]))
            signature = dialer.private_key.sign(_signed_text(*signed), padding.PKCS1v15(), hashes.SHA256())
            await write_message(writer, {"type": "hello", "handler": "/echo", "key": der, "signature": signature,
                                         **fields})
            return await read_message(reader, 1 << 16)
        finally:
            writer.close()

    async def main():
        seen = []
        server, addr = await echo_server(listener, seen)
        try:
            # a dialer that expected another peer at this address stops after TLS, before any hello
            with pytest.raises(PeerError, match="not the one expected"):
                await DirectDialer(dialer.private_key).open(other.peer_id.to_base58(), addr, "/echo")
            # an unknown handler: refused with the list of handlers
            with pytest.raises(PeerRefused, match="no handler '/nope'"):
                await DirectDialer(dialer.private_key).open(listener.peer_id.to_base58(), addr, "/nope")
            answers = [
                # a hello signed for another listener (a relayed hello), or for another nonce
                await raw_hello(addr, {"_sign_for": (other.peer_id.to_base58(), "/echo", b"x" * 32)}),
                # someone else's public key with the dialer's signature
                await raw_hello(addr, {"key": DirectDialer(other.private_key)._key_der}),
                await raw_hello(addr, {"key": b"not a key"}),
                await raw_hello(addr, {"signature": "text"}),
            ]
            # not TLS at all, and TLS that never says hello: dropped
            reader, writer = await asyncio.open_connection(*tcp_endpoint(addr))
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            assert await reader.read() == b""
            writer.close()
            # the listener still serves a good dialer
            reader, writer = await DirectDialer(dialer.private_key).open(listener.peer_id.to_base58(), addr, "/echo")
            await write_message(writer, {"n": 1})
            assert await read_message(reader, 1 << 16) == {"n": 1}
            writer.close()
            return answers, seen, server.refused
        finally:
            await server.close()

    answers, seen, refused = run(main())
    assert all(a["type"] == "error" and a["fatal"] for a in answers), answers
    assert "does not sign this challenge" in answers[0]["message"] and "does not sign" in answers[1]["message"]
    assert "not a DER public key" in answers[2]["message"] and "'signature'" in answers[3]["message"]
    assert seen == [dialer.peer_id.to_base58()]  # only the good dialer reached the handler
    assert refused >= 6


def _any_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def test_a_dead_address_is_skipped_for_a_while(identities):
    listener, dialer = identities[0], identities[1]
    closed = "/ip4/127.0.0.1/tcp/1"  # nothing listens there

    async def main():
        server, addr = await echo_server(listener, [])
        d = DirectDialer(dialer.private_key)
        try:
            opened = await d.open_any(listener.peer_id.to_base58(), [closed, addr], "/echo", 5)
            assert opened is not None
            opened[1].close()
            return d.usable([closed, addr]), addr
        finally:
            await server.close()

    usable, addr = run(main())
    assert usable == [addr]


def test_direct_addrs_take_the_announced_hosts():
    addrs = ["/ip4/10.0.0.5/tcp/31337/p2p/QmX", "/ip4/10.0.0.5/udp/4001/quic", "/ip6/::1/tcp/1/p2p/QmX",
             "/p2p-circuit/p2p/QmY"]
    assert direct_addrs(addrs, 4444) == ["/ip4/10.0.0.5/tcp/4444", "/ip6/::1/tcp/4444"]
    assert tcp_endpoint("/ip4/10.0.0.5/tcp/4444") == ("10.0.0.5", 4444)
    with pytest.raises(ValueError):
        tcp_endpoint("/ip4/10.0.0.5/udp/4444")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def swarm_env(inprocess_swarm, tiny_model_path):
    path = tiny_model_path("llama")
    servers = inprocess_swarm.start_peers(path, ["0:3", "3:6"], model_id=MODEL_ID)
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    expected = local.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    clients = []

    def client(**fields):
        config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id=MODEL_ID,
                              step_timeout_s=10, **fields)
        clients.append(DistributedModelForCausalLM.from_pretrained(path, client_config=config))
        return clients[-1]

    try:
        yield inprocess_swarm, servers, expected, client
    finally:
        for c in clients:
            c.shutdown()
        for server in servers:
            inprocess_swarm.stop_peer(server)


def generate(model):
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS):
        return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def test_steps_take_direct_streams_end_to_end(swarm_env):
    swarm, servers, expected, client = swarm_env
    first, last = servers
    assert all(s.direct_addrs for s in servers)
    before = [s.direct.accepted for s in servers]
    pushed = first.forward_stats.pushed
    assert torch.equal(generate(client()), expected)
    # the client's session streams (and its latency probes) to both peers, and the first peer's pushes
    assert first.direct.accepted > before[0] and last.direct.accepted >= before[1] + 2
    assert first.forward_stats.pushed - pushed == NEW_TOKENS
    # the dialers were told apart by their keys: the pushes came from the first peer's identity
    assert last.forward_stats.rejected == 0


def test_without_direct_streams_everything_goes_through_p2pd(swarm_env):
    swarm, servers, expected, client = swarm_env
    before = [s.direct.accepted for s in servers]
    model = client(direct=False)
    assert torch.equal(generate(model), expected)
    assert servers[0].direct.accepted == before[0]  # the client never dialed directly
    assert loop.run(model.transport()).dialer is None


def test_an_unreachable_direct_port_falls_back_to_p2pd(swarm_env):
    """A peer whose announced direct port does not answer (a firewall): the client uses p2pd for it."""
    swarm, servers, expected, client = swarm_env
    model = client()
    transport = loop.run(model.transport())
    first = servers[0]
    real = first.direct_addrs
    first.direct_addrs = ["/ip4/127.0.0.1/tcp/1"]
    try:
        swarm._run(first.announcer.announce("online"))
        before = first.direct.accepted
        assert torch.equal(generate(model), expected)
        assert first.direct.accepted == before
        assert "/ip4/127.0.0.1/tcp/1" not in transport.dialer.usable(["/ip4/127.0.0.1/tcp/1"])
    finally:
        first.direct_addrs = real
        swarm._run(first.announcer.announce("online"))
