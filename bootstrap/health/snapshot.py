"""Snapshot: everything one crawl saw, as plain typed data (the input of the pure summary).

The crawler (crawler.py) fills it from the DHT and from `info` probes; tests build it by hand. Nothing
in it is trusted: records passed the strict decoder in swarm.records, but may still disagree with
each other or with the key they were found under, and `info` replies are raw maps from the network.
summary.summarize() checks all of that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from swarm.records import BlockRecord, ModelRecord, ReportRecord


@dataclass(frozen=True)
class Probe:
    """One peer's `info` probe in this crawl.

    reachable: the peer answered `info` within the probe timeout.
    rtt_s: the whole exchange (connect + request + reply), when reachable.
    info: the raw reply map (untrusted), when reachable.
    error: why it failed, when not reachable.
    last_seen: unix time of the latest successful probe, this crawl or an earlier one (None: never).
    """

    reachable: bool
    rtt_s: float | None = None
    info: Mapping[str, object] | None = None
    error: str | None = None
    last_seen: float | None = None


@dataclass(frozen=True)
class ModelSnapshot:
    """One model id: its index entries (several if peers disagree) and its block records.

    blocks: {block: {peer_id: record}} for blocks 0..num_blocks-1 as read from keys f"{model_id}.{block}".
    """

    index: tuple[ModelRecord, ...]
    blocks: Mapping[int, Mapping[str, BlockRecord]]


@dataclass(frozen=True)
class Snapshot:
    """taken_at: unix time the crawl finished (None: no crawl finished yet).
    models: {model_id: ModelSnapshot}; probes: {peer_id: Probe} (a peer with no entry was not probed).
    reports: {accused peer_id: {reporter peer_id: ReportRecord}}, for the peers the crawl saw.
    crawl_s / crawl_error: how long the crawl took, and what went wrong in it, if anything.
    """

    taken_at: float | None = None
    models: Mapping[str, ModelSnapshot] = field(default_factory=dict)
    probes: Mapping[str, Probe] = field(default_factory=dict)
    crawl_s: float | None = None
    crawl_error: str | None = None
    reports: Mapping[str, Mapping[str, ReportRecord]] = field(default_factory=dict)
