"""The health server on real components: an in-process swarm (real p2pd + DHT), the real HTTP server on
127.0.0.1 port 0, the JSON and the Prometheus text parsed by real parsers, clean 4xx on bad requests.

The server runs on the in-process swarm's event loop over the bootstrap's own DHT node and p2pd,
exactly as `swarm bootstrap --health-port` runs it. Tests poll the HTTP API (what a browser or a
script sees) until the crawl shows what they expect, never sleeping blindly.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bootstrap.health.config import HealthConfig
from bootstrap.health.server import HealthServer

MODEL_ID = "health-tiny"
GHOST_MODEL = "health-ghost"
REFRESH_S = 1.0


@dataclass
class Env:
    swarm: object
    server: HealthServer
    peers: list
    url: str


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def http(url: str, method: str = "GET", timeout_s: float = 15) -> Answer:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return Answer(r.status, dict(r.headers), r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, dict(e.headers), e.read())


def wait_state(env: Env, predicate, timeout_s: float = 45.0) -> dict:
    """The first /api/v1/state document that satisfies `predicate`; fails with the last one seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = http(env.url + "api/v1/state").json()
        if predicate(doc):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"state never satisfied the condition; last: {json.dumps(doc)[:3000]}")
        time.sleep(0.2)  # polling an observable condition, paced well under one refresh


def model_of(doc: dict, model_id: str) -> dict | None:
    return next((m for m in doc["models"] if m["model_id"] == model_id), None)


def peers_of(doc: dict, model_id: str) -> list[dict]:
    return [p for p in doc["peers"] if p["model_id"] == model_id]


@pytest.fixture(scope="module")
def env(inprocess_swarm, tiny_model_path):
    peers = inprocess_swarm.start_peers(
        tiny_model_path("llama", num_layers=4), ["0:2", "2:4"], model_id=MODEL_ID
    )
    p2p, dht = inprocess_swarm._bootstrap

    async def start() -> HealthServer:
        server = HealthServer(HealthConfig(port=0, refresh_s=REFRESH_S, probe_timeout_s=2.0), dht, p2p)
        await server.start()
        return server

    server = inprocess_swarm._run(start())
    try:
        yield Env(inprocess_swarm, server, peers, server.url)
    finally:
        inprocess_swarm._run(server.close())
        for peer in peers:
            if peer in inprocess_swarm.servers:
                inprocess_swarm.stop_peer(peer)


def test_state_covers_every_block_and_lists_peers(env):
    ids = {p.peer_id for p in env.peers}

    def ready(doc):
        m = model_of(doc, MODEL_ID)
        return m is not None and m["can_run"] and {p["peer_id"] for p in peers_of(doc, MODEL_ID)} == ids

    doc = wait_state(env, ready)
    assert doc["schema"] == "swarm.health/v1" and doc["snapshot_at"] is not None
    m = model_of(doc, MODEL_ID)
    assert m["num_blocks"] == 4 and m["blocks_covered"] == 4 and m["missing_blocks"] == []
    assert [b["status"] for b in m["blocks"]] == ["covered"] * 4
    assert [b["online"] for b in m["blocks"]] == [1, 1, 1, 1] and m["min_replication"] == 1
    rows = {p["peer_id"]: p for p in peers_of(doc, MODEL_ID)}
    for peer in env.peers:
        row = rows[peer.peer_id]
        assert row["span"] == [peer.span.start, peer.span.end]
        assert row["status"] == "online" and row["blocks_announced"] == 2
        assert row["probe"]["reachable"] is True and row["probe"]["rtt_ms"] > 0
        assert row["software_version"] and row["dtype"] == "float32"
    assert doc["totals"]["peers_by_status"]["online"] >= 2


def test_page_has_coverage_map_and_peer_rows(env):
    wait_state(env, lambda d: (model_of(d, MODEL_ID) or {}).get("can_run"))
    answer = http(env.url)
    page = answer.body.decode()
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/html")
    assert f'id="coverage-{MODEL_ID}"' in page and f'id="can-run-{MODEL_ID}" class="badge can-run"' in page
    for peer in env.peers:
        assert f'data-peer-id="{peer.peer_id}"' in page


def test_metrics_parse(env):
    wait_state(env, lambda d: (model_of(d, MODEL_ID) or {}).get("can_run"))
    answer = http(env.url + "metrics")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.body.decode())
        for s in family.samples
    }
    label = (("model", MODEL_ID),)
    assert samples[("swarm_model_blocks", label)] == 4
    assert samples[("swarm_model_blocks_covered", label)] == 4
    assert samples[("swarm_model_min_replication", label)] == 1
    assert samples[("swarm_model_can_run", label)] == 1
    assert samples[("swarm_model_peers", label)] == 2
    assert samples[("swarm_model_compute_tokens_per_second", label)] > 0
    assert samples[("swarm_peers", (("status", "online"),))] >= 2
    assert samples[("swarm_peers_by_version", (("version", "0.1.0"),))] >= 2
    assert samples[("swarm_health_crawl_ok", ())] == 1
    assert 0 <= samples[("swarm_health_snapshot_age_seconds", ())] < 30


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        ("nope", "GET", 404),
        ("api/v1/nope", "GET", 404),
        ("api/v2/state", "GET", 404),
        ("api/v1/state", "POST", 405),
        ("metrics", "DELETE", 405),
        ("api/v1/state?x=" + "a" * 3000, "GET", 414),
        ("?" + "b" * 20000, "GET", None),  # past aiohttp's line limit: its own 4xx
        ("api/v1/reachability", "GET", 400),
        ("api/v1/reachability?peer=abc&addr=/ip4/127.0.0.1/tcp/1", "GET", 400),
        (
            "api/v1/reachability?peer=Qm111111111111111111111111111111111111111111&addr=/ip4/127.0.0.1/tcp/1",
            "GET",
            400,
        ),
        ("api/v1/reachability?peer=%3Cscript%3E&addr=x", "GET", 400),
    ],
)
def test_bad_requests_get_clean_4xx(env, path, method, status):
    answer = http(env.url + path, method)
    assert 400 <= answer.status < 500 and (status is None or answer.status == status), answer
    assert b"Traceback" not in answer.body
    content_type = answer.headers.get("Content-Type", "")
    assert content_type.startswith(("application/json", "text/plain")), content_type  # never HTML
    if answer.status != 400 or "reachability" in path:  # aiohttp's own 400 (line too long) has no hooks
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    if status == 405:
        assert "GET" in answer.headers["Allow"]
    if path.startswith("api/"):
        assert answer.json()["status"] == answer.status and answer.json()["error"]


def test_reachability_rules(env):
    peer = env.peers[0]
    base = env.url + "api/v1/reachability?"

    def ask(**params) -> Answer:
        return http(base + urllib.parse.urlencode(params))

    bad = [
        ask(peer=peer.peer_id, addr="not a multiaddr"),
        ask(peer=peer.peer_id, addr=f"/ip4/127.0.0.1/tcp/1/p2p/{env.peers[1].peer_id}"),  # names another peer
        ask(peer=peer.peer_id, addr=f"/ip4/127.0.0.1/tcp/1/p2p/{env.peers[1].peer_id}/p2p-circuit"),
        ask(peer=peer.peer_id, addr="/dns4/localhost/tcp/1"),
        http(base + f"peer={peer.peer_id}&peer={peer.peer_id}&addr=/ip4/127.0.0.1/tcp/1"),
    ]
    assert [a.status for a in bad] == [400] * 5, [a.body for a in bad]
    other_host = ask(peer=peer.peer_id, addr="/ip4/10.1.2.3/tcp/4001")  # not the caller's IP: no scanning
    assert other_host.status == 403 and "10.1.2.3" in other_host.json()["error"]


def test_reachability_check_dials_the_peer(env):
    peer, other = env.peers
    addr = next(a for a in peer.addrs if a.startswith("/ip4/127.0.0.1/"))
    answer = http(
        env.url + "api/v1/reachability?" + urllib.parse.urlencode({"peer": peer.peer_id, "addr": addr})
    )
    verdict = answer.json()
    assert answer.status == 200 and verdict["reachable"] is True, verdict
    assert (
        verdict["peer"] == peer.peer_id
        and verdict["addr"] == addr.split("/p2p/")[0]
        and verdict["rtt_ms"] > 0
    )
    # the same address with the other peer's id: the dial reaches someone else, so not reachable
    answer = http(
        env.url
        + "api/v1/reachability?"
        + urllib.parse.urlencode({"peer": other.peer_id, "addr": addr.split("/p2p/")[0]})
    )
    assert answer.status == 200 and answer.json()["reachable"] is False
    # a port nobody listens on: not reachable, with advice in plain words
    closed = "/ip4/127.0.0.1/tcp/1"
    verdict = http(
        env.url + "api/v1/reachability?" + urllib.parse.urlencode({"peer": peer.peer_id, "addr": closed})
    ).json()
    assert verdict["reachable"] is False and "open TCP port 1" in verdict["detail"]


def test_record_without_a_live_peer_shows_unreachable(env):
    """A peer whose records are on the DHT but who answers no `info` (here: a node with no info handler)
    is shown unreachable within a refresh, and its blocks uncovered, though its records say online."""
    ghost_id = env.swarm._run(_announce_ghost(env.swarm.initial_peers))
    try:

        def shown(doc):
            rows = peers_of(doc, GHOST_MODEL)
            return rows and rows[0]["status"] == "unreachable"

        doc = wait_state(env, shown)
        (row,) = peers_of(doc, GHOST_MODEL)
        assert row["peer_id"] == ghost_id and row["state"] == "online"
        assert row["probe"]["reachable"] is False and row["probe"]["error"]
        m = model_of(doc, GHOST_MODEL)
        assert m["can_run"] is False and m["missing_blocks"] == [0, 1]
        assert [b["unreachable"] for b in m["blocks"]] == [1, 1]
    finally:
        env.swarm._run(_ghost_nodes.pop().close())


def test_peer_leaving_uncovers_its_blocks_within_a_refresh(env):
    wait_state(env, lambda d: (model_of(d, MODEL_ID) or {}).get("can_run"))
    leaving = env.peers[1]
    env.swarm.stop_peer(leaving)
    started = time.monotonic()
    doc = wait_state(
        env, lambda d: model_of(d, MODEL_ID)["missing_blocks"] == [2, 3], timeout_s=3 * REFRESH_S + 10
    )
    took = time.monotonic() - started
    row = next(p for p in peers_of(doc, MODEL_ID) if p["peer_id"] == leaving.peer_id)
    assert row["status"] in ("offline", "unreachable")
    assert model_of(doc, MODEL_ID)["can_run"] is False
    assert took < 2 * REFRESH_S + 8, f"took {took:.1f} s to show the peer gone"


# ---------------------------------------------------------------- a "ghost": records but no info handler

_ghost_nodes: list = []


class _Ghost:
    def __init__(self, p2p, dht):
        self.p2p, self.dht = p2p, dht

    async def close(self):
        await self.dht.shutdown()
        await self.p2p.shutdown()


async def _announce_ghost(initial_peers) -> str:
    from swarm import records
    from swarm.identity import Identity
    from swarm.net import NodeSettings, start_dht, start_p2p, visible_maddrs

    identity = Identity.load_or_create(None)
    settings = NodeSettings(initial_peers=tuple(initial_peers), identity_path=identity.p2pd_identity_path)
    p2p = await start_p2p(settings)
    identity.close()
    dht = await start_dht(p2p, settings, records.make_record_validator(identity))
    _ghost_nodes.append(_Ghost(p2p, dht))
    template = records.BlockRecord(
        model_id=GHOST_MODEL,
        block=0,
        state=records.BlockState.ONLINE,
        start=0,
        end=2,
        software_version="0.1.0",
        protocol=1,
        dtype="float32",
        block_hash="ab" * 16,
        compute_tokens_s=10.0,
        network_mbps=0.0,
        cache_tokens_left=100,
        addrs=tuple(await visible_maddrs(p2p)),
    )
    await records.announce_blocks(dht, identity, template, [0, 1], 60)
    model = records.ModelRecord(model_id=GHOST_MODEL, num_blocks=2, repository="ghost", config_hash="cd" * 16)
    await records.announce_model(dht, identity, model, 60)
    return identity.peer_id.to_base58()


# ---------------------------------------------------------------- no swarm: a DHT that fails


class _BrokenDHT:
    async def get_many(self, *args, **kwargs):
        raise RuntimeError("the DHT is down")


def test_failed_crawl_is_reported_not_raised():
    """A crawl that fails leaves the server answering: the JSON says why, metrics say crawl_ok 0."""
    import asyncio

    import aiohttp

    async def scenario():
        config = HealthConfig(port=0, refresh_s=0.2)
        async with HealthServer(config, _BrokenDHT(), p2p=None) as server:
            await asyncio.wait_for(server.refreshed.wait(), 10)
            async with aiohttp.ClientSession() as http_session:
                async with http_session.get(server.url + "api/v1/state") as r:
                    doc = await r.json()
                async with http_session.get(server.url + "metrics") as r:
                    metrics = await r.text()
                async with http_session.get(server.url) as r:
                    page = await r.text()
        return doc, metrics, page

    doc, metrics, page = asyncio.run(scenario())
    assert doc["crawl"]["error"] == "RuntimeError: the DHT is down" and doc["models"] == []
    assert doc["snapshot_at"] is None
    assert "swarm_health_crawl_ok 0.0" in metrics
    assert "No crawl of the DHT has succeeded yet" in page and "the DHT is down" in page


# ---------------------------------------------------------------- the command lines, as processes


def _spawn_health(args: list[str]):
    """`swarm health ARGS` (through its entry point once pyproject declares it, else its main())."""
    import subprocess
    import sys
    import threading
    from importlib.metadata import entry_points

    from localswarm import Proc, spawn

    if "health" in {ep.name for ep in entry_points(group="swarm.commands")}:
        return spawn("health", ["health", *args])
    code = "import sys; from bootstrap.health.cli import main; sys.exit(main(sys.argv[1:]))"
    popen = subprocess.Popen(
        [sys.executable, "-u", "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    proc = Proc("health", popen)
    threading.Thread(target=proc._pump, daemon=True).start()
    return proc


@pytest.mark.slow
def test_bootstrap_health_port_and_swarm_health_processes():
    """`swarm bootstrap --health-port 0` serves the page from its own process; `swarm health` joined
    through it serves the same swarm; both exit cleanly on SIGINT."""
    from localswarm import spawn

    bootstrap = spawn(
        "bootstrap", ["bootstrap", "--host", "127.0.0.1", "--health-port", "0", "--health-refresh-s", "1"]
    )
    procs = [bootstrap]
    try:
        maddr = bootstrap.wait_line(lambda line: line.startswith("/ip4/"), 60).strip()
        urls = [bootstrap.wait_line(lambda line: line.startswith("health page at "), 60).split()[-1]]
        health = _spawn_health(["--initial-peers", maddr, "--port", "0", "--refresh-s", "1"])
        procs.append(health)
        urls.append(health.wait_line(lambda line: line.startswith("health page at "), 60).split()[-1])
        for url in urls:
            env = Env(None, None, [], url)
            doc = wait_state(env, lambda d: d["snapshot_at"] is not None, timeout_s=30)
            assert doc["schema"] == "swarm.health/v1" and doc["crawl"]["error"] is None
            assert http(url + "metrics").status == 200 and http(url + "nope").status == 404
    finally:
        codes = [proc.stop() for proc in reversed(procs)]
    assert codes == [0] * len(procs), [p.output for p in procs]


def test_crawl_bounds_what_the_open_index_can_claim():
    """Anyone can announce a model: one claiming a huge block count, or a flood of model ids, is capped."""
    from bootstrap.health.crawler import Crawler
    from swarm.records import ModelRecord

    def entry(model_id: str, num_blocks: int = 4, repository: str = "r") -> ModelRecord:
        return ModelRecord(
            model_id=model_id, num_blocks=num_blocks, repository=repository, config_hash="cd" * 16
        )

    crawler = Crawler(None, None, HealthConfig(max_models=2, max_blocks_per_model=100))
    index = [
        entry("huge", 1 << 20),
        entry("a"),
        entry("b"),
        entry("b", repository="s"),
        entry("c"),
        entry("c", 8),
    ]
    assert {m: len(e) for m, e in crawler._bounded_index(index).items()} == {"b": 2, "c": 2}
