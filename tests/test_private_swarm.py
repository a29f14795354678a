"""Private swarms (swarm.admission, swarm.swarmkey): only holders of the swarm key get through any door.

Pure tier: the key file, the stream admission proof, the health summary's whitelist. Local-swarm tier:
a private in-process swarm (real p2pd, real DHT, real PeerServers with direct TLS ports, a real health
server) where an insider's generation equals local transformers, and two outsiders (no key, a wrong
key) are refused with a clear error at each door: joining the DHT, storing and reading records with
a bare hivemind node that skips our checks, opening a session on a member through p2pd and through
its direct TLS port, asking `info`, and reading the health page. The process tier runs the CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from bootstrap.health.cli import start_health
from bootstrap.health.config import HealthConfig
from bootstrap.health.publish import summary_json
from client.transport import HivemindTransport
from swarm import records
from swarm.admission import ERROR_PRIVATE, admit_fields, check_admit
from swarm.direct import DirectDialer
from swarm.errors import ConfigError, NotAdmitted, PeerRefused
from swarm.identity import Identity
from swarm.net import NodeSettings, connect, start_p2p, stop_node
from swarm.probe import request_info
from swarm.protocol import INFERENCE_HANDLER, read_message, write_message
from swarm.swarmkey import SwarmKey, main as make_swarm_key

MODEL_ID = "private-tiny"
PRIVATE = "this swarm is private"


# ---------------------------------------------------------------- pure


def test_key_file_written_loaded_and_never_shown(tmp_path, capsys):
    path = tmp_path / "swarm.key"
    assert make_swarm_key([str(path)]) == 0
    key = SwarmKey.load(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key.key_id in capsys.readouterr().out
    assert path.read_text().splitlines()[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"]
    assert key.secret.hex() not in repr(key) and key.key_id in repr(key)
    assert SwarmKey.load(path) == key and SwarmKey.generate().key_id != key.key_id
    assert key.derive("a") != key.derive("b")
    assert make_swarm_key([str(path)]) == 1  # never over an existing key
    assert "never overwritten" in capsys.readouterr().err
    assert SwarmKey.load(path) == key


@pytest.mark.parametrize("content, says", [
    (None, "does not exist; ask the swarm's owner"),
    (b"hello\n", "not a swarm key file"),
    (b"/key/swarm/psk/1.0.0/\n/base16/\nzz\n", "not a swarm key file"),
    (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"ab" * 31 + b"\n", "holds 31 bytes"),
    (b"/key/swarm/psk/1.0.0/\n/base32/\n" + b"ab" * 32 + b"\n", "not a swarm key file"),
])
def test_bad_key_files_say_what_is_wrong(tmp_path, content, says):
    path = tmp_path / "bad.key"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=says):
        SwarmKey.load(path)


def test_base64_key_files_load(tmp_path):
    import base64

    key = SwarmKey.generate()
    path = tmp_path / "b64.key"
    path.write_bytes(b"/key/swarm/psk/1.0.0/\n/base64/\n" + base64.b64encode(key.secret) + b"\n")
    assert SwarmKey.load(path).secret == key.secret


def test_admission_proof_binds_key_dialer_listener_and_handler():
    key, other = SwarmKey.generate(), SwarmKey.generate()
    shown = admit_fields(key, "dialer", "listener", "/h")
    check_admit(key, shown, "dialer", "listener", "/h")
    with pytest.raises(NotAdmitted, match=f"{PRIVATE}: .* admits only .* --swarm-key FILE"):
        check_admit(key, {}, "dialer", "listener", "/h")
    with pytest.raises(NotAdmitted, match=f"your swarm key \\(id {other.key_id}\\) is not its key"):
        check_admit(key, admit_fields(other, "dialer", "listener", "/h"), "dialer", "listener", "/h")
    for dialer, listener, handler in (("eve", "listener", "/h"), ("dialer", "other", "/h"), ("dialer", "listener", "/x")):
        with pytest.raises(NotAdmitted, match="made for another peer or handler"):
            check_admit(key, shown, dialer, listener, handler)


def test_summary_is_a_whitelist():
    full = {
        "schema": "swarm.health/v1", "generated_at": 1.0, "snapshot_at": 1.0, "refresh_s": 1.0,
        "crawl": {"duration_s": 0.1, "error": "TimeoutError: peer QmSecret"},
        "totals": {"models": 1, "models_runnable": 1, "peers": 2, "peers_by_status": {"online": 2},
                   "peers_by_version": {"0.1.0": 2}, "compute_tokens_s": 5.0, "network_mbps": 1.0, "new": 1},
        "models": [{"model_id": "m", "num_blocks": 1, "can_run": True, "blocks_covered": 1, "min_replication": 2,
                    "missing_blocks": [], "compute_tokens_s": 5.0, "repositories": ["/home/owner/m"],
                    "config_hashes": ["abc"], "peers": ["QmSecret"],
                    "blocks": [{"block": 0, "status": "covered", "online": 2, "who": "QmSecret"}]}],
        "peers": [{"peer_id": "QmSecret", "addrs": ["/ip4/10.0.0.1/tcp/1"]}],
        "skipped_entries": 0, "problems": ["peer QmSecret: stale"], "verification": {"QmSecret": "ok"},
    }
    out = summary_json(full)
    text = json.dumps(out)
    assert "QmSecret" not in text and "10.0.0.1" not in text and "/home/owner" not in text
    assert "verification" not in out and "new" not in out["totals"] and "peers_by_version" not in out["totals"]
    assert out["models"][0]["blocks"] == [{"block": 0, "status": "covered", "online": 2}]
    assert out["totals"]["peers"] == 2 and out["models"][0]["can_run"] is True and out["crawl"]["error"]


# ---------------------------------------------------------------- a private swarm in this process


def http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def private(tiny_model_path):
    """A private in-process swarm: bootstrap, two peers of a 2-block llama, a health server publishing the
    summary (a private swarm's default) and one publishing nothing. Yields a namespace of all of it."""
    from localswarm import InProcessSwarm

    key = SwarmKey.generate()
    swarm = InProcessSwarm(swarm_key=key)
    path = tiny_model_path("llama", 2)
    prompt = torch.tensor([[5, 9, 2, 7]])
    ns = type("Private", (), {})()
    try:
        with swarm.serving(path, ["0:1", "1:2"], MODEL_ID, prompt, new_tokens=6) as (servers, expected, client):
            p2p, dht = swarm._bootstrap
            health = [swarm._run(start_health(HealthConfig(port=0, refresh_s=1.0, swarm_key=key, publish=publish),
                                              dht, p2p)) for publish in (None, "none")]
            ns.__dict__.update(swarm=swarm, key=key, servers=servers, expected=expected, client=client,
                               prompt=prompt, health=health, model_path=path)
            try:
                yield ns
            finally:
                for server in health:
                    swarm._run(server.close())
    finally:
        swarm.close()


def test_insider_generates_exactly(private):
    model = private.client()
    assert model.client_config.swarm_key == private.key
    out = model.generate(private.prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, private.expected)


@pytest.fixture(params=["no key", "wrong key"])
def outsider_key(request):
    return None if request.param == "no key" else SwarmKey.generate()


def _expect_refusal(text: str, key: SwarmKey | None) -> None:
    assert PRIVATE in text, text
    if key is None:
        assert "--swarm-key FILE" in text, text
    else:
        assert f"your swarm key (id {key.key_id}) is not its key" in text, text


def test_outsider_cannot_join_the_dht(private, outsider_key):
    with pytest.raises(NotAdmitted) as caught:
        private.swarm._run(HivemindTransport.create(private.swarm.initial_peers, 15, swarm_key=outsider_key))
    _expect_refusal(str(caught.value), outsider_key)


def test_insider_key_on_a_public_swarm_says_so(inprocess_swarm):
    with pytest.raises(ConfigError, match="is public .* leave --swarm-key out"):
        inprocess_swarm._run(HivemindTransport.create(inprocess_swarm.initial_peers, 15,
                                                      swarm_key=SwarmKey.generate()))


def test_bare_hivemind_node_cannot_store_or_read_records(private):
    """An outsider that skips our join check and talks hivemind's DHT RPCs itself: every RPC is refused
    with the reason in its error text, so stores fail and reads find nothing."""
    from hivemind.dht.node import DHTNode
    from hivemind.dht.routing import DHTID
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2
    from hivemind.utils.timed_storage import get_dht_time

    async def scenario():
        # a plain P2P (no key, no admission) connected to the bootstrap
        p2p = await start_p2p(NodeSettings(client_mode=True, initial_peers=tuple(private.swarm.initial_peers)))
        node = None
        try:
            with pytest.raises(RuntimeError, match="none of the initial_peers responded"):
                await DHTNode.create(p2p=p2p, initial_peers=private.swarm.initial_peers, client_mode=True)
            node = await DHTNode.create(p2p=p2p, initial_peers=private.swarm.initial_peers, client_mode=True,
                                        ensure_bootstrap_success=False)
            bootstrap = PeerID.from_base58(private.swarm.initial_peers[0].rsplit("/p2p/", 1)[1])
            stub = node.protocol.get_stub(bootstrap)
            key_id = DHTID.generate(source=records.block_key(MODEL_ID, 0)).to_bytes()
            errors = []
            for call in (lambda: stub.rpc_find(dht_pb2.FindRequest(keys=[key_id], peer=node.protocol.node_info)),
                         lambda: stub.rpc_store(dht_pb2.StoreRequest(keys=[key_id], subkeys=[b""], values=[b"x"],
                                                                     expiration_time=[get_dht_time() + 60],
                                                                     in_cache=[False], peer=node.protocol.node_info)),
                         lambda: stub.rpc_ping(dht_pb2.PingRequest(peer=node.protocol.node_info))):
                try:
                    await call()
                    errors.append(None)
                except Exception as e:
                    errors.append(str(e))
            return errors
        finally:
            await stop_node(node, p2p)

    errors = private.swarm._run(scenario())
    for text in errors:
        assert text is not None and PRIVATE in text and "--swarm-key" in text, errors
    # and the records are there for members
    model = private.client()
    from client import loop

    found = loop.run(model.transport(), timeout_s=60)
    blocks = loop.run(found.fetch_blocks(MODEL_ID, 2), timeout_s=60)
    assert {b: len(peers) for b, peers in blocks.items()} == {0: 1, 1: 1}


async def _outsider_p2p(key: SwarmKey | None):
    identity = Identity.load_or_create(None)
    p2p = await start_p2p(NodeSettings(client_mode=True, identity_path=identity.p2pd_identity_path, swarm_key=key))
    identity.close()
    return p2p, identity


def test_outsider_cannot_open_a_session_through_p2pd(private, outsider_key):
    server = private.servers[0]

    async def scenario():
        p2p, _ = await _outsider_p2p(outsider_key)
        try:
            await connect(p2p, server.p2p.peer_id, server.addrs, 10)
            _, reader, writer = await p2p.call_binary_stream_handler(server.p2p.peer_id, INFERENCE_HANDLER)
            await write_message(writer, {"type": "open", "model_id": MODEL_ID, "blocks": [0, 1], "batch_size": 1,
                                         "max_length": 16})
            reply = await asyncio.wait_for(read_message(reader, 1 << 16), 10)
            writer.close()
            with pytest.raises(PeerRefused) as info_refused:
                await request_info(p2p, server.peer_id, server.addrs, 10)
            return reply, str(info_refused.value)
        finally:
            await p2p.shutdown()

    reply, info_text = private.swarm._run(scenario())
    assert reply["type"] == "error" and reply["code"] == ERROR_PRIVATE and reply["fatal"] is True
    _expect_refusal(reply["message"], outsider_key)
    _expect_refusal(info_text, outsider_key)
    assert server.sessions.active == 0


def test_outsider_cannot_open_a_session_on_the_direct_port(private, outsider_key):
    server = private.servers[1]
    assert server.direct_addrs

    async def scenario():
        identity = Identity.load_or_create(None)
        identity.close()
        dialer = DirectDialer(identity.private_key, outsider_key)
        with pytest.raises(NotAdmitted) as caught:
            await dialer.open(server.peer_id, server.direct_addrs[0], INFERENCE_HANDLER)
        return str(caught.value)

    _expect_refusal(private.swarm._run(scenario()), outsider_key)
    assert server.sessions.active == 0


def test_health_page_publishes_what_the_owner_allows(private):
    summary, nothing = private.health
    peer_ids = [s.peer_id for s in private.servers]
    end = time.monotonic() + 30
    while True:
        status, body = http(summary.url + "api/v1/state")
        doc = json.loads(body)
        if doc["models"] and doc["models"][0]["can_run"] or time.monotonic() > end:
            break
        time.sleep(0.3)
    assert status == 200 and doc["access"] == {"private": True, "publish": "summary"}
    assert doc["models"][0]["model_id"] == MODEL_ID and doc["models"][0]["can_run"], doc
    assert doc["totals"]["peers"] == 2 and doc["peers"] == []
    status, page = http(summary.url)
    for text in (json.dumps(doc), page.decode(), http(summary.url + "metrics")[1].decode()):
        for pid in peer_ids:
            assert pid not in text and pid[-8:] not in text
        for addr in private.servers[0].addrs:
            assert addr.split("/p2p/")[0] not in text
    assert "Private swarm" in page.decode() and "2 peer(s)" in page.decode()
    for route in ("", "api/v1/state", "metrics"):
        status, body = http(nothing.url + route)
        assert status == 403 and b"publishes nothing" in body
