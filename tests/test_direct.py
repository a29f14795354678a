"""Direct TLS streams (swarm.direct): both ends authenticated by their identity keys, bad dialers refused
with the listener going on; end to end, clients and pushing peers use them and fall back to p2pd.

The listener and dialer here are the real ones on loopback sockets (real TLS); the end-to-end cases run
real in-process peers (p2pd, DHT, PeerServer) and the real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl

import pytest
import torch

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from client import loop
from swarm import direct
from swarm.direct import DirectDialer, DirectServer, _signed_text, direct_addrs, tcp_endpoint
from swarm.errors import PeerError, PeerRefused
from swarm.identity import Identity
from swarm.protocol import FORWARD_HANDLER, read_message, write_message

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


def _any_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def _der(tag: int, body: bytes) -> bytes:
    return bytes([tag, len(body)]) + body  # short-form lengths: enough for the key below


# a SubjectPublicKeyInfo of an EC key on brainpoolP160r1: `cryptography` raises UnsupportedAlgorithm
UNSUPPORTED_CURVE_KEY = _der(0x30, _der(0x30, bytes.fromhex("06072a8648ce3d0201") + bytes.fromhex("06092b2403030208010101"))
                             + _der(0x03, b"\x00\x04" + b"\x01" * 40))


def _sign(identity: Identity, listener: str, handler: str, nonce: bytes) -> bytes:
    return identity.private_key.sign(_signed_text(listener, handler, nonce), padding.PKCS1v15(), hashes.SHA256())


def test_the_wrong_listener_and_bad_dialers_are_refused_and_the_listener_goes_on(identities):
    listener, dialer, other = identities
    me = listener.peer_id.to_base58()

    async def raw_hello(addr: str, make) -> dict:
        """Speak the handshake by hand: `make(nonce)` gives the hello's fields; returns the answer."""
        reader, writer = await asyncio.open_connection(*tcp_endpoint(addr), ssl=_any_tls())
        try:
            nonce = (await read_message(reader, 1 << 16))["nonce"]
            hello = {"type": "hello", "handler": "/echo", "key": DirectDialer(dialer.private_key)._key_der,
                     "signature": _sign(dialer, me, "/echo", nonce)}
            await write_message(writer, {**hello, **make(nonce)})
            return await read_message(reader, 1 << 16)
        finally:
            writer.close()

    small_exponent_key = rsa.generate_private_key(public_exponent=3, key_size=2048).public_key()
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()

    def der(key) -> bytes:
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    async def main():
        seen = []
        server, addr = await echo_server(listener, seen)
        try:
            # a dialer that expected another peer at this address stops after TLS, before any hello
            with pytest.raises(PeerError, match="not the one expected"):
                await DirectDialer(dialer.private_key).open(other.peer_id.to_base58(), addr, "/echo")
            # an unknown handler: refused with the list of handlers
            with pytest.raises(PeerRefused, match="no handler '/nope'"):
                await DirectDialer(dialer.private_key).open(me, addr, "/nope")
            answers = [
                await raw_hello(addr, lambda n: {"signature": _sign(dialer, other.peer_id.to_base58(), "/echo", n)}),
                await raw_hello(addr, lambda n: {"signature": _sign(dialer, me, "/echo", b"x" * 32)}),
                await raw_hello(addr, lambda n: {"signature": _sign(dialer, me, "/other", n)}),
                await raw_hello(addr, lambda n: {"key": DirectDialer(other.private_key)._key_der}),
                await raw_hello(addr, lambda n: {"key": b"not a key"}),
                await raw_hello(addr, lambda n: {"key": der(ec_key)}),
                await raw_hello(addr, lambda n: {"key": UNSUPPORTED_CURVE_KEY}),
                await raw_hello(addr, lambda n: {"key": der(small_exponent_key)}),
                await raw_hello(addr, lambda n: {"signature": "text"}),
            ]
            # not TLS at all: dropped
            reader, writer = await asyncio.open_connection(*tcp_endpoint(addr))
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            assert await reader.read() == b""
            writer.close()
            # the listener still serves a good dialer
            reader, writer = await DirectDialer(dialer.private_key).open(me, addr, "/echo")
            await write_message(writer, {"n": 1})
            assert await read_message(reader, 1 << 16) == {"n": 1}
            writer.close()
            return answers, seen, server.refused
        finally:
            await server.close()

    answers, seen, refused = run(main())
    assert all(a["type"] == "error" and a["fatal"] for a in answers), answers
    messages = [a["message"] for a in answers]
    # signed for another listener (a relayed hello), for another nonce, for another handler
    assert all("does not sign this challenge" in m for m in messages[:3]), messages
    assert "does not sign" in messages[3]  # someone else's key with the dialer's signature
    assert "not a DER public key" in messages[4] and "expected an RSA key" in messages[5]
    assert "not a DER public key" in messages[6]  # a curve the crypto library does not know
    assert "e = 65537" in messages[7] and "'signature'" in messages[8]
    assert seen == [dialer.peer_id.to_base58()]  # only the good dialer reached the handler
    assert refused == len(answers) + 3  # and the dialer that expected another peer, the unknown handler, plain TCP


def test_silent_connections_time_out_and_the_limits_hold(identities, monkeypatch):
    """A TLS client that never says hello is dropped after the handshake timeout; connections over the
    per-host limit are closed at once, before TLS."""
    listener, dialer = identities[0], identities[1]
    monkeypatch.setattr(direct, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(direct, "MAX_PER_HOST", 2)

    async def main():
        server, addr = await echo_server(listener, [])
        try:
            silent = [await asyncio.open_connection(*tcp_endpoint(addr), ssl=_any_tls()) for _ in range(2)]
            over_reader, over_writer = await asyncio.open_connection(*tcp_endpoint(addr))
            closed_at_once = await asyncio.wait_for(over_reader.read(), 2)  # EOF or reset, no TLS
            refused_early = server.refused
            for reader, _ in silent:  # the silent ones get dropped after the timeout
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(reader.read(), 5)
            for _, writer in silent:
                writer.close()
            over_writer.close()
            await asyncio.sleep(0.1)
            # a slot is free again
            reader, writer = await DirectDialer(dialer.private_key).open(listener.peer_id.to_base58(), addr, "/echo")
            await write_message(writer, {"n": 2})
            answer = await read_message(reader, 1 << 16)
            writer.close()
            return closed_at_once, refused_early, server.refused, answer
        finally:
            await server.close()

    closed_at_once, refused_early, refused, answer = run(main())
    assert closed_at_once == b"" and refused_early == 1
    assert refused == 3 and answer == {"n": 2}


def test_a_corrupt_tls_record_reads_as_a_broken_connection(identities):
    """A peer that sends garbage under TLS: the handler sees ConnectionResetError, like any broken
    stream, not ssl.SSLError (which the handlers' except clauses would miss)."""
    listener, dialer = identities[0], identities[1]
    errors = []

    async def reader_handler(info, reader, writer):
        try:
            await read_message(reader, 1 << 16)
        except Exception as e:
            errors.append(e)
        finally:
            writer.close()

    async def main():
        server = DirectServer(listener.private_key, listener.peer_id.to_base58(), {"/read": reader_handler})
        port = await server.start("127.0.0.1", 0)
        try:
            _, writer = await DirectDialer(dialer.private_key).open(
                listener.peer_id.to_base58(), f"/ip4/127.0.0.1/tcp/{port}", "/read")
            fd = writer.transport.get_extra_info("socket").fileno()
            os.write(fd, b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # an application-data record, bad tag
            for _ in range(50):
                if errors:
                    break
                await asyncio.sleep(0.05)
            writer.close()
        finally:
            await server.close()

    run(main())
    assert len(errors) == 1 and isinstance(errors[0], ConnectionResetError), errors


def test_a_dead_address_is_skipped_for_a_while_for_that_peer_only(identities):
    listener, dialer = identities[0], identities[1]
    closed = "/ip4/127.0.0.1/tcp/1"  # nothing listens there
    peer = listener.peer_id.to_base58()

    async def main():
        server, addr = await echo_server(listener, [])
        d = DirectDialer(dialer.private_key)
        try:
            opened = await d.open_any(peer, [closed, addr], "/echo", 5)
            assert opened is not None
            opened[1].close()
            refused = await d.open_any(peer, [addr], "/nope", 5)  # a refusal: p2pd, but addr stays usable
            return d.usable(peer, [closed, addr]), d.usable("QmOther", [closed]), refused
        finally:
            await server.close()

    usable, for_another_peer, refused = run(main())
    assert refused is None
    assert usable == [usable[-1]] and usable[0] != closed
    assert for_another_peer == [closed]


def test_direct_addrs_take_the_announced_hosts():
    addrs = ["/ip4/10.0.0.5/tcp/31337/p2p/QmX", "/ip4/10.0.0.5/udp/4001/quic", "/ip6/::1/tcp/1/p2p/QmX",
             "/p2p-circuit/p2p/QmY", "/ip4/192.0.2.9/tcp/4001/p2p/QmRelay/p2p-circuit/p2p/QmX"]
    assert direct_addrs(addrs, 4444) == ["/ip4/10.0.0.5/tcp/4444", "/ip6/::1/tcp/4444"]
    assert tcp_endpoint("/ip4/10.0.0.5/tcp/4444") == ("10.0.0.5", 4444)
    with pytest.raises(ValueError):
        tcp_endpoint("/ip4/10.0.0.5/udp/4444")


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def swarm_env(inprocess_swarm, tiny_model_path):
    with inprocess_swarm.serving(tiny_model_path("llama"), ["0:3", "3:6"], MODEL_ID, PROMPT, NEW_TOKENS) as (
        servers, expected, client
    ):
        yield inprocess_swarm, servers, expected, client


def generate(model):
    with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS):
        return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def pushers_seen(server) -> tuple[list, object]:
    """Wrap `server`'s direct forward handler to note the peer id of each pushing stream."""
    seen, real = [], server.direct.handlers[FORWARD_HANDLER]

    async def noting(info, reader, writer):
        seen.append(info.peer_id.to_base58())
        await real(info, reader, writer)

    server.direct.handlers[FORWARD_HANDLER] = noting
    return seen, real


def test_steps_take_direct_streams_end_to_end(swarm_env):
    swarm, servers, expected, client = swarm_env
    first, last = servers
    assert all(s.direct_addrs for s in servers)
    before = [s.direct.accepted for s in servers]
    received = last.forward_stats.received
    seen, real = pushers_seen(last)
    try:
        assert torch.equal(generate(client()), expected)
    finally:
        last.direct.handlers[FORWARD_HANDLER] = real
    # the client's streams (session, latency probes) to both peers went direct
    assert first.direct.accepted > before[0] and last.direct.accepted > before[1]
    # and so did the pushes: one stream for the session, authenticated as the first peer
    assert seen == [first.peer_id]
    assert last.forward_stats.received - received == NEW_TOKENS and last.forward_stats.rejected == 0


def test_without_direct_streams_everything_goes_through_p2pd(swarm_env):
    swarm, servers, expected, client = swarm_env
    before = [s.direct.accepted for s in servers]
    model = client(direct=False)
    assert torch.equal(generate(model), expected)
    assert servers[0].direct.accepted == before[0]  # the client never dialed directly
    assert loop.run(model.transport()).dialer is None


def test_an_unreachable_direct_port_falls_back_to_p2pd(swarm_env):
    """The last peer announces a direct port that does not answer (a firewall): the client's streams to it
    and the first peer's pushes to it go through p2pd, with the same tokens."""
    swarm, servers, expected, client = swarm_env
    first, last = servers
    real = last.direct_addrs
    dead = "/ip4/127.0.0.1/tcp/1"
    last.direct_addrs = [dead]
    swarm._run(last.announcer.announce("online"))
    seen, real_handler = pushers_seen(last)
    try:
        model = client()
        before, received = last.direct.accepted, last.forward_stats.received
        failed = first.forward_stats.push_failed
        assert torch.equal(generate(model), expected)
        assert last.direct.accepted == before and seen == []
        assert last.forward_stats.received - received == NEW_TOKENS  # pushed, through p2pd
        assert first.forward_stats.push_failed == failed
        assert loop.run(model.transport()).dialer.usable(last.peer_id, [dead]) == []
    finally:
        last.direct.handlers[FORWARD_HANDLER] = real_handler
        last.direct_addrs = real
        swarm._run(last.announcer.announce("online"))
