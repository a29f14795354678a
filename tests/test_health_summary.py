"""bootstrap.health.summary (pure): hand-made snapshots -> coverage, replication, peers, totals.

Also the pure renderers of the same report (JSON document, HTML hooks, Prometheus text), parsed back
with real parsers.
"""

from __future__ import annotations

import dataclasses
import html.parser
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bootstrap.health.metrics import report_metrics
from bootstrap.health.render import SCHEMA, report_html, report_json
from bootstrap.health.snapshot import ModelSnapshot, Probe, Snapshot
from bootstrap.health.summary import summarize
from swarm.records import BlockRecord, BlockState, ModelRecord

NOW = 1_800_000_000.0
MODEL = "tiny-llama"


def pid(i: int) -> str:
    return f"QmPeer{i:06d}xyzABCDEFGHJKLMNPQRSTUVWXYZabcdefg"


def record(block: int, span: tuple[int, int], state: str = "online", **fields) -> BlockRecord:
    defaults = dict(
        model_id=MODEL,
        block=block,
        state=BlockState(state),
        start=span[0],
        end=span[1],
        software_version="0.1.0",
        protocol=1,
        dtype="float32",
        block_hash="ab" * 16,
        compute_tokens_s=100.0,
        network_mbps=50.0,
        cache_tokens_left=4096,
        drain_deadline=NOW + 30 if state == "draining" else None,
    )
    return BlockRecord(**(defaults | fields))


def model_snapshot(
    num_blocks: int, peers: dict[str, list[BlockRecord]], model_id: str = MODEL
) -> ModelSnapshot:
    blocks: dict[int, dict[str, BlockRecord]] = {b: {} for b in range(num_blocks)}
    for peer_id, recs in peers.items():
        for r in recs:
            blocks.setdefault(r.block, {})[peer_id] = r
    index = (
        ModelRecord(model_id=model_id, num_blocks=num_blocks, repository=model_id, config_hash="cd" * 16),
    )
    return ModelSnapshot(index=index, blocks=blocks)


def serving(span: tuple[int, int], state: str = "online", **fields) -> list[BlockRecord]:
    return [record(b, span, state, **fields) for b in range(*span)]


def ok_probe(span=None, state=None, model_id=MODEL) -> Probe:
    info = {"type": "info", "model_id": model_id}
    if span:
        info["span"] = list(span)
    if state:
        info["state"] = state
    return Probe(reachable=True, rtt_s=0.01, info=info, last_seen=NOW - 1)


def snap(models: dict[str, ModelSnapshot], probes: dict[str, Probe] | None = None) -> Snapshot:
    return Snapshot(taken_at=NOW - 2, models=models, probes=probes or {}, crawl_s=0.5)


def test_full_coverage_can_run():
    s = snap(
        {
            MODEL: model_snapshot(
                4, {pid(1): serving((0, 2)), pid(2): serving((2, 4)), pid(3): serving((0, 4))}
            )
        }
    )
    report = summarize(s, NOW)
    (m,) = report.models
    assert m.can_run and m.missing_blocks == () and m.blocks_covered == 4
    assert [b.counts["online"] for b in m.blocks] == [2, 2, 2, 2]
    assert m.min_replication == 2
    assert report.totals.peers == 3 and report.totals.peers_by_status["online"] == 3
    assert report.totals.compute_tokens_s == pytest.approx(300.0)
    assert [r.span.start for r in report.peers] == [0, 0, 2]  # sorted by span


def test_missing_blocks_cannot_run():
    s = snap({MODEL: model_snapshot(6, {pid(1): serving((0, 2)), pid(2): serving((4, 6))})})
    (m,) = summarize(s, NOW).models
    assert not m.can_run
    assert m.missing_blocks == (2, 3)
    assert m.min_replication == 0
    assert [b.status for b in m.blocks] == [
        "covered",
        "covered",
        "uncovered",
        "uncovered",
        "covered",
        "covered",
    ]


def test_draining_peer():
    s = snap({MODEL: model_snapshot(4, {pid(1): serving((0, 4)), pid(2): serving((2, 4), "draining")})})
    report = summarize(s, NOW)
    (m,) = report.models
    assert [b.counts["draining"] for b in m.blocks] == [0, 0, 1, 1]
    assert m.can_run and m.min_replication == 1
    row = next(r for r in report.peers if r.peer_id == pid(2))
    assert row.status == "draining" and row.drain_deadline == NOW + 30
    assert report.totals.peers_by_status == {
        "joining": 0,
        "online": 1,
        "draining": 1,
        "offline": 0,
        "unreachable": 0,
    }

    only_draining = snap({MODEL: model_snapshot(2, {pid(2): serving((0, 2), "draining")})})
    (m,) = summarize(only_draining, NOW).models
    assert [b.status for b in m.blocks] == ["draining", "draining"] and not m.can_run


def test_mixed_versions():
    peers = {
        pid(1): serving((0, 2)),
        pid(2): serving((2, 4), software_version="0.2.0"),
        pid(3): serving((0, 4), software_version="0.2.0"),
    }
    report = summarize(snap({MODEL: model_snapshot(4, peers)}), NOW)
    assert report.totals.peers_by_version == {"0.1.0": 1, "0.2.0": 2}
    assert {r.peer_id: r.software_version for r in report.peers}[pid(1)] == "0.1.0"


def test_unreachable_peer_uncovers_its_blocks():
    s = snap(
        {MODEL: model_snapshot(4, {pid(1): serving((0, 2)), pid(2): serving((2, 4))})},
        {pid(1): ok_probe(), pid(2): Probe(reachable=False, error="connection refused", last_seen=NOW - 20)},
    )
    report = summarize(s, NOW)
    (m,) = report.models
    assert m.missing_blocks == (2, 3) and not m.can_run
    assert [b.counts["unreachable"] for b in m.blocks] == [0, 0, 1, 1]
    dead = next(r for r in report.peers if r.peer_id == pid(2))
    assert dead.status == "unreachable" and dead.state == "online"
    assert dead.probe_error == "connection refused" and dead.last_seen == NOW - 20
    assert report.totals.peers_by_status["unreachable"] == 1


def test_offline_peer_is_not_coverage():
    s = snap(
        {MODEL: model_snapshot(2, {pid(1): serving((0, 2), "offline")})}, {pid(1): Probe(reachable=False)}
    )
    report = summarize(s, NOW)
    assert report.peers[0].status == "offline"  # said goodbye: not "unreachable"
    assert report.models[0].missing_blocks == (0, 1)


def test_malformed_and_misplaced_entries_are_skipped():
    m = model_snapshot(4, {pid(1): serving((0, 4))})
    blocks = {b: dict(e) for b, e in m.blocks.items()}
    blocks[1][pid(2)] = {"v": 1, "kind": "block", "state": "online"}  # not a decoded record
    blocks[2][pid(3)] = record(3, (2, 4))  # a record for block 3 under block 2's key
    blocks[3][pid(4)] = record(3, (3, 4), model_id="other-model")  # another model's record
    blocks[3]["not a peer id!"] = record(3, (2, 4))
    blocks[7] = {pid(5): record(7, (6, 8))}  # past the model's 4 blocks
    blocks[0][pid(6)] = record(0, (0, 9))  # a span past the end
    s = snap({MODEL: dataclasses.replace(m, blocks=blocks)})
    report = summarize(s, NOW)
    assert report.skipped_entries == 6
    assert [r.peer_id for r in report.peers] == [pid(1)]
    assert report.models[0].can_run and report.models[0].min_replication == 1
    assert len(report.problems) == 6 and all("skipped" in p for p in report.problems)


def test_inconsistent_peer_records():
    # Half-applied update: blocks 0-1 already say draining, block 2 still online; plus a stale record of
    # a span the peer served before (block 3, span 3:4). Most advanced state wins; stale span dropped.
    recs = [*serving((0, 2), "draining"), record(2, (0, 3)), record(3, (3, 4))]
    recs[:2] = [dataclasses.replace(r, end=3) for r in recs[:2]]
    s = snap({MODEL: model_snapshot(4, {pid(1): recs, pid(2): serving((3, 4))})})
    report = summarize(s, NOW)
    row = next(r for r in report.peers if r.peer_id == pid(1))
    assert row.span.start == 0 and row.span.end == 3 and row.status == "draining"
    assert row.blocks_announced == 3
    assert any("stale" in p for p in row.problems) and any("disagree" in p for p in row.problems)
    m = report.models[0]
    assert [b.counts["online"] for b in m.blocks] == [0, 0, 0, 1]
    assert [b.counts["draining"] for b in m.blocks] == [1, 1, 1, 0]


def test_info_reply_decides_span_and_state():
    recs = [record(0, (0, 1)), record(1, (1, 3)), record(2, (1, 3))]  # a restart moved it from 0:1 to 1:3
    probes = {pid(1): ok_probe(span=(0, 1), state="draining")}
    s = snap({MODEL: model_snapshot(3, {pid(1): recs})}, probes)
    row = summarize(s, NOW).peers[0]
    assert (row.span.start, row.span.end, row.status) == (0, 1, "draining")  # info wins over majority
    garbled = {
        pid(1): Probe(reachable=True, info={"model_id": MODEL, "span": "1:3", "state": 7}, last_seen=NOW)
    }
    row = summarize(snap({MODEL: model_snapshot(3, {pid(1): recs})}, garbled), NOW).peers[0]
    assert (row.span.start, row.span.end, row.status) == (1, 3, "online")  # garbage ignored, majority used


def test_models_disagreeing_and_empty_snapshot():
    empty = summarize(Snapshot(), NOW)
    assert empty.models == () and empty.totals.peers == 0 and empty.snapshot_at is None
    a = model_snapshot(4, {pid(1): serving((0, 4))})
    b_index = ModelRecord(model_id=MODEL, num_blocks=6, repository="x", config_hash="ef" * 16)
    s = snap({MODEL: dataclasses.replace(a, index=a.index + (b_index,))})
    report = summarize(s, NOW)
    assert report.models[0].num_blocks == 6 and report.models[0].missing_blocks == (4, 5)
    assert any("disagree" in p for p in report.problems)


def test_500_peers_fast():
    num_blocks, peers = 79, {}
    for i in range(500):
        start = (i * 7) % 72
        peers[pid(i)] = serving(
            (start, start + 8), "draining" if i % 50 == 0 else "online", software_version=f"0.{i % 3}.0"
        )
    probes = {pid(i): ok_probe() if i % 10 else Probe(reachable=False, error="timeout") for i in range(500)}
    s = snap({MODEL: model_snapshot(num_blocks, peers)}, probes)
    started = time.perf_counter()
    report = summarize(s, NOW)
    document = json.dumps(report_json(report, 10.0))
    page = report_html(report, 10.0)
    metrics = report_metrics(report, NOW)
    elapsed = time.perf_counter() - started
    assert report.totals.peers == 500 and len(report.peers) == 500
    assert sum(report.totals.peers_by_status.values()) == 500
    assert report.totals.peers_by_status["unreachable"] == 50
    assert report.models[0].can_run
    assert len(document) > 0 and page.count("data-peer-id=") == 500 and metrics
    assert elapsed < 2.0, f"summary + rendering of 500 peers took {elapsed:.2f} s"


# ---------------------------------------------------------------- renderers of the same report


def _sample_report():
    evil = '<script>alert("x")</script>'
    peers = {pid(1): serving((0, 2), public_name=evil), pid(2): serving((2, 4), "draining")}
    probes = {pid(1): ok_probe(), pid(2): Probe(reachable=False, error=evil)}
    return summarize(snap({MODEL: model_snapshot(6, peers)}, probes), NOW)


def test_json_document_schema():
    doc = json.loads(json.dumps(report_json(_sample_report(), 10.0)))
    assert doc["schema"] == SCHEMA == "swarm.health/v1"
    (m,) = doc["models"]
    assert m["model_id"] == MODEL and m["num_blocks"] == 6 and m["can_run"] is False
    assert m["missing_blocks"] == [2, 3, 4, 5] and m["min_replication"] == 0
    assert m["blocks"][0] == {
        "block": 0,
        "status": "covered",
        "joining": 0,
        "online": 1,
        "draining": 0,
        "offline": 0,
        "unreachable": 0,
        "online_full_precision": 1,
    }
    assert m["blocks"][2]["status"] == "uncovered" and m["blocks"][2]["unreachable"] == 1
    p1 = next(p for p in doc["peers"] if p["peer_id"] == pid(1))
    assert p1["span"] == [0, 2] and p1["probe"]["reachable"] is True and p1["probe"]["rtt_ms"] == 10.0
    assert p1["probe"]["last_seen_age_s"] == 1.0 and p1["short_id"].endswith(pid(1)[-8:])
    p2 = next(p for p in doc["peers"] if p["peer_id"] == pid(2))
    assert p2["state"] == "draining" and p2["status"] == "unreachable"
    assert doc["totals"]["peers"] == 2 and doc["totals"]["peers_by_status"]["unreachable"] == 1


class _Hooks(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.blocks, self.rows, self.ids, self.scripts = [], [], set(), 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.ids.add(a.get("id"))
        classes = (a.get("class") or "").split()
        if "block" in classes and "data-block" in a:
            self.blocks.append((int(a["data-block"]), classes))
        if "data-peer-id" in a:
            self.rows.append((a["data-peer-id"], classes))
        self.scripts += tag == "script"


def test_html_hooks_and_escaping():
    page = report_html(_sample_report(), 10.0)
    hooks = _Hooks()
    hooks.feed(page)
    assert hooks.scripts == 0 and "&lt;script&gt;" in page  # the network's strings are escaped
    assert f"coverage-{MODEL}" in hooks.ids and f"can-run-{MODEL}" in hooks.ids
    statuses = [
        next(c for c in classes if c in ("covered", "draining", "uncovered")) for _, classes in hooks.blocks
    ]
    assert statuses == ["covered", "covered", "uncovered", "uncovered", "uncovered", "uncovered"]
    assert dict((p, [c for c in cl if c.startswith("state-")]) for p, cl in hooks.rows) == {
        pid(1): ["state-online"],
        pid(2): ["state-unreachable"],
    }
    assert '<meta http-equiv="refresh" content="10">' in page and 'name="viewport"' in page


def test_metrics_parse():
    families = {
        f.name: f for f in text_string_to_metric_families(report_metrics(_sample_report(), NOW).decode())
    }
    value = {(f.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("swarm_peers", (("status", "online"),))] == 1
    assert value[("swarm_peers", (("status", "unreachable"),))] == 1
    assert value[("swarm_peers_by_version", (("version", "0.1.0"),))] == 2
    assert value[("swarm_model_blocks", (("model", MODEL),))] == 6
    assert value[("swarm_model_blocks_covered", (("model", MODEL),))] == 2
    assert value[("swarm_model_min_replication", (("model", MODEL),))] == 0
    assert value[("swarm_model_can_run", (("model", MODEL),))] == 0
    assert value[("swarm_compute_tokens_per_second", ())] == 100.0
    assert value[("swarm_health_snapshot_age_seconds", ())] == 2.0
