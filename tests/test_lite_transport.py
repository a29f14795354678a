"""The lite transport (py-libp2p, no hivemind) against a real swarm of hivemind peers (tier 3).

hivemind and py-libp2p cannot share a process, so the lite client runs in its own process with the lite
environment's python (tests/lite_client.py; `make lite-venv` creates it: swarm-llm[lite], no hivemind),
while this process runs the swarm (client.launcher.LocalSwarm) and hivemind-side observers. Checked:
the same greedy tokens as local transformers over direct TLS streams and over libp2p streams; a kill -9
of a route peer mid-generation (a spare present) still finishes exactly; a hostile DHT node's records
that fail the owner-signature or schema checks are dropped exactly as the hivemind path drops them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import loop
from client.launcher import LocalSwarm
from client.transport import HivemindTransport

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
LITE_PYTHON = Path(os.environ.get("SWARM_LITE_PYTHON", ROOT / ".venv-lite" / "bin" / "python"))
CLIENT = Path(__file__).parent / "lite_client.py"
PROMPT = [1, 17, 230, 45, 99, 4, 310, 7]
NEW_TOKENS = 16
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def lite_python() -> Path:
    """The lite environment's python, checked to have py-libp2p and trio and no hivemind."""
    if not LITE_PYTHON.exists():
        pytest.skip(f"no lite environment at {LITE_PYTHON}: `make lite-venv` creates it (pip install "
                    "-e '.[lite]' in a venv of its own: py-libp2p and trio, no hivemind)")
    check = ("import importlib.util as u, sys; "
             "sys.exit(0 if u.find_spec('libp2p') and u.find_spec('trio') and u.find_spec('client') "
             "and not u.find_spec('hivemind') else 3)")
    if subprocess.run([str(LITE_PYTHON), "-c", check], cwd=ROOT, timeout=60).returncode != 0:
        pytest.skip(f"{LITE_PYTHON} is not a lite environment (needs swarm-llm[lite] and no hivemind): "
                    "`make lite-venv` rebuilds it")
    return LITE_PYTHON


@pytest.fixture(scope="module")
def model_path(tiny_model_path):
    return tiny_model_path("qwen3", num_layers=4)


@pytest.fixture(scope="module")
def expected(model_path) -> list[int]:
    local = AutoModelForCausalLM.from_pretrained(model_path).eval()
    out = local.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0].tolist()


@pytest.fixture(scope="module")
def swarm(model_path):
    """Three hivemind peers: a whole-model one and a 0:2 + 2:4 pair, so any one of them has a spare."""
    with LocalSwarm(str(model_path)) as swarm:
        swarm.procs_by_peer = {}
        for proc in swarm.start_peers(["0:4", "0:2", "2:4"]):
            swarm.procs_by_peer[proc.ready_line.split("peer_id=")[1].split()[0]] = proc
        yield swarm


def start_client(lite_python: Path, plan: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(lite_python), str(CLIENT), json.dumps(plan)], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(child: subprocess.Popen, prefix: str, output: list[str]) -> str:
    """The rest of the child's first line starting with `prefix` (its other lines kept in `output`)."""
    for line in child.stdout:
        if line.startswith(prefix):
            return line[len(prefix):]
        output.append(line)
    text = "".join(output)
    raise AssertionError(f"lite client exited ({child.wait()}) without {prefix.strip()!r}:\n{text}")


def run_client(lite_python: Path, plan: dict) -> dict:
    child = start_client(lite_python, plan)
    output: list[str] = []
    try:
        result = json.loads(read_until(child, "RESULT ", output))
        assert child.wait(RUN_TIMEOUT_S) == 0, "".join(output)
    finally:
        child.kill()
    return result


def plan(model_path, swarm, **fields) -> dict:
    return {"model": str(model_path), "initial_peers": list(swarm.initial_peers), "prompt": PROMPT,
            "new_tokens": NEW_TOKENS, "runs": [{"direct": True}], **fields}


def test_lite_generation_equals_local_transformers(lite_python, model_path, swarm, expected):
    result = run_client(lite_python, plan(model_path, swarm, runs=[{"direct": True}, {"direct": False}]))
    assert not result["hivemind_imported"] and result["libp2p_imported"]
    for run in result["runs"]:  # direct TLS streams, then libp2p streams through the peers' p2pd
        assert run["transport"] == "LiteTransport"
        assert run["tokens"] == expected, f"direct={run['direct']}"
        assert run["recoveries"] == 0


# ---------------------------------------------------------------- a hostile DHT node


def _plant(node, mallory, key: str, subkey: str, wire: dict, *, tamper: dict | None = None) -> None:
    """Put an entry straight into `node`'s own storage (no validator runs), signed by `mallory`; with
    `tamper`, the signed body is then changed (the signature no longer matches)."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer
    from hivemind.utils.timed_storage import get_dht_time

    from swarm import records

    expiration = get_dht_time() + 120
    record = DHTRecord(DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey),
                       MSGPackSerializer.dumps(wire), expiration)
    signed = records.make_record_validator(mallory).sign_value(record)
    if tamper is not None:
        signed = MSGPackSerializer.dumps(wire | tamper) + signed[len(record.value):]
    assert node.protocol.storage.store_subkey(DHTID.generate(source=key), subkey, signed, expiration)


def test_records_failing_checks_are_dropped_as_on_the_hivemind_path(lite_python, model_path, swarm, monkeypatch):
    """A DHT node that stores whatever it is handed (no validator) holds, besides what honest nodes
    hold: for block 1, mallory's own well-signed record (an offline peer, so no route uses it: both
    paths must show it, which proves they asked this node; the hivemind path's reads wait for every
    node near a key here, not the first few, as swarm.lite's search does in a swarm this small); for block 0, another such record next to an
    impostor (mallory's key, an honest peer's id), so the node's whole dictionary fails; for block 2, a
    record whose body was changed after signing. Both paths must end with the same records."""
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P

    from swarm import records
    from swarm.identity import Identity
    from swarm.net import _guard_unary_calls
    from swarm.spans import default_model_id

    model_id = default_model_id(str(model_path))
    monkeypatch.setattr("swarm.dhtread.QUORUM", 1 << 10)
    hivemind_side = loop.run(HivemindTransport.create(swarm.initial_peers, 30), 60)
    mallory = Identity.load_or_create(None)
    state: dict = {}
    try:
        honest = loop.run(hivemind_side.fetch_blocks(model_id, 4), 60)
        victim, template = next(iter(honest[0].items()))

        async def start_hostile():
            state["p2p"] = await P2P.create(initial_peers=list(swarm.initial_peers),
                                            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                            identity_path=mallory.p2pd_identity_path)
            _guard_unary_calls(state["p2p"])  # as start_p2p does
            state["node"] = await DHTNode.create(p2p=state["p2p"], initial_peers=list(swarm.initial_peers),
                                                 record_validator=None)

        loop.run(start_hostile(), 60)
        node = state["node"]
        mine = dataclasses.replace(template, start=0, end=4, state=records.BlockState.OFFLINE,
                                   public_name="mallory", addrs=(), direct=())
        subkey = records.record_subkey(mine, mallory)
        for block in (0, 1, 2):
            wire = dataclasses.replace(mine, block=block).to_wire()
            _plant(node, mallory, records.block_key(model_id, block), subkey, wire,
                   tamper={"compute_tokens_s": 1e9} if block == 2 else None)
        impostor = dataclasses.replace(template, compute_tokens_s=1e9).to_wire()
        _plant(node, mallory, records.block_key(model_id, 0), f"{victim}{mallory.owner_marker}", impostor)

        seen_by_hivemind = loop.run(hivemind_side.fetch_blocks(model_id, 4), 60)
        result = run_client(lite_python, plan(model_path, swarm, fetch=True, new_tokens=2))
    finally:
        for part in (hivemind_side, state.get("node"), state.get("p2p")):
            if part is not None:
                loop.run(part.shutdown(), 30)
        mallory.close()
    seen_by_lite = result["runs"][0]["blocks"]
    mallory_id = mallory.peer_id.to_base58()
    assert mallory_id in seen_by_hivemind[1] and mallory_id not in seen_by_hivemind[0]
    assert mallory_id not in seen_by_hivemind[2]
    assert seen_by_hivemind[0][victim].compute_tokens_s == template.compute_tokens_s  # not the impostor's
    # the same peers per block (their load fields move between the two reads; the checks do not)
    assert {b: sorted(found) for b, found in seen_by_lite.items()} == {
        str(b): sorted(found) for b, found in seen_by_hivemind.items()}
    assert seen_by_lite["1"][mallory_id] == dataclasses.replace(mine, block=1).to_wire()
    assert seen_by_lite["0"][victim]["compute_tokens_s"] == template.compute_tokens_s


def test_health_monitor_on_the_lite_backend(lite_python, model_path, swarm):
    """`swarm health --transport lite`: the crawler reads the records and probes every peer over py-libp2p;
    reachability checks, which need a probe p2pd, answer 503 saying so."""
    from swarm.spans import default_model_id

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    command = [str(lite_python), "-m", "swarm.cli", "health", "--transport", "lite", "--initial-peers",
               *swarm.initial_peers, "--port", "0", "--refresh-s", "1"]
    child = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    output: list[str] = []
    try:
        url = read_until(child, "health page at ", output).strip()
        model_id, peers = default_model_id(str(model_path)), set(swarm.procs_by_peer)
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(url + "api/v1/state", timeout=15) as answer:
                doc = json.loads(answer.read())
            # mallory's offline record (the test above) may linger in caches: only the swarm's peers count
            rows = {p["peer_id"]: p for p in doc["peers"]
                    if p["model_id"] == model_id and p["peer_id"] in peers}
            if set(rows) == peers and all(row["probe"]["reachable"] for row in rows.values()):
                break
            assert time.monotonic() < deadline, f"the crawl never saw every peer: {json.dumps(doc)[:3000]}"
            time.sleep(0.2)  # polling an observable condition, paced well under one refresh
        (model,) = [m for m in doc["models"] if m["model_id"] == model_id]
        assert model["can_run"] and model["missing_blocks"] == [] and doc["crawl"]["error"] is None
        assert all(row["probe"]["rtt_ms"] > 0 and row["status"] == "online" for row in rows.values())
        with pytest.raises(urllib.error.HTTPError) as refused:
            query = f"peer={next(iter(peers))}&addr=/ip4/127.0.0.1/tcp/1"
            urllib.request.urlopen(url + "api/v1/reachability?" + query, timeout=15)
        assert refused.value.code == 503
        child.send_signal(signal.SIGINT)
        assert child.wait(30) == 0, "".join(output)
    finally:
        child.kill()


# ---------------------------------------------------------------- failover (last: it kills a peer)


def test_kill_of_a_route_peer_mid_generation_still_finishes_exactly(lite_python, model_path, swarm, expected):
    child = start_client(lite_python, plan(model_path, swarm, runs=[{"direct": False}], pause_at=5,
                                           step_timeout_s=3.0))
    output: list[str] = []
    try:
        route = json.loads(read_until(child, "ROUTE ", output))
        victim = route[0]
        swarm.procs_by_peer[victim].kill(signal.SIGKILL)
        swarm.procs_by_peer[victim].popen.wait(10)
        child.stdin.write("go\n")
        child.stdin.flush()
        result = json.loads(read_until(child, "RESULT ", output))
        assert child.wait(RUN_TIMEOUT_S) == 0, "".join(output)
    finally:
        child.kill()
    (run,) = result["runs"]
    assert run["tokens"] == expected
    assert run["recoveries"] >= 1 and victim not in run["route"]
