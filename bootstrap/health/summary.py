"""summarize(snapshot, now) -> Report: the health page's content, as a pure function of one crawl.

No network, no clock (the caller passes `now`), no mutation of the snapshot. What it decides:

* A peer's **status** is what a client can expect of it now: `offline` if it announced so; else
  `unreachable` if its `info` probe failed this crawl (a killed peer shows so within one refresh,
  long before its records expire); else its state (`joining`, `online`, `draining`).
* A peer's **span** and **state**: its records may disagree (a half-applied announce, stale records
  of a span it served before a restart). Its own `info` reply, when it names one of the announced
  spans, is the truth; otherwise the span most of its records announce wins. Records of other spans
  are left out as stale; among the rest the most advanced state wins (joining < online < draining
  < offline: states only move forward, so a partly stored update is the newest word).
* A block is **covered** when at least one `online` peer serves it, **draining** when only draining
  peers do, **uncovered** otherwise. A model **can run** when every block is covered; its **min
  replication** is the fewest online peers on any block.
* A peer's **precision** is what its records announce (schema 1.3: `weight_bits`, `kv_dtype`; older
  records read as their dtype's bits): `precision_bits` is the lowest of its weights' and its KV
  cache's, and FULL_PRECISION_BITS or more is **full precision**. A model **can run at full
  precision** when every block has an online full-precision peer (what a client with
  `min_precision="full"` needs).
* Entries that contradict their place in the snapshot (a record found under another model's or
  block's key, a span past the model's last block, a value that is not a record) are skipped and
  counted in `skipped_entries`, with a line in `problems`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from bootstrap.health.reports import DEFAULT_FLAG_REPORTERS, ReportedPeer, summarize_reports
from bootstrap.health.snapshot import ModelSnapshot, Probe, Snapshot
from swarm.records import BlockRecord, BlockState, ModelRecord
from swarm.spans import Span

STATUSES = ("joining", "online", "draining", "offline", "unreachable")
BLOCK_STATUSES = ("covered", "draining", "uncovered")
MAX_PROBLEMS = 100
_STATE_ORDER = {BlockState.JOINING: 0, BlockState.ONLINE: 1, BlockState.DRAINING: 2, BlockState.OFFLINE: 3}
_MAX_BLOCK = 1 << 20
FULL_PRECISION_BITS = 16  # as client.routing counts it: unquantized 16/32-bit weights and KV cache


@dataclass(frozen=True)
class BlockCoverage:
    block: int
    counts: Mapping[str, int]  # status (STATUSES) -> number of peers serving this block with it
    status: str  # BLOCK_STATUSES
    online_full_precision: int = 0  # online peers serving it at full precision


@dataclass(frozen=True)
class PeerRow:
    peer_id: str
    model_id: str
    public_name: str
    span: Span
    state: str  # announced (or `info`-reported) state
    status: str  # STATUSES: what a client can expect now
    software_version: str
    protocol: int
    dtype: str
    quant: str
    weight_bits: int | None  # bits per weight of its linear layers as announced (None: a record before 1.3)
    kv_dtype: str  # "auto" (the dtype) or "fp8"
    precision_bits: int  # the lowest of its weights' and its KV cache's precision
    compute_tokens_s: float
    network_mbps: float
    active_sessions: int
    queued_tokens: int
    cache_tokens_left: int
    reachability: str  # direct | relayed | unknown, as announced
    addrs: tuple[str, ...]
    drain_deadline: float | None
    blocks_announced: int  # records kept for this peer (<= span length while records are fresh)
    probed: bool
    probe_reachable: bool | None  # None: not probed
    rtt_s: float | None
    probe_error: str | None
    last_seen: float | None
    problems: tuple[str, ...]

    @property
    def short_id(self) -> str:
        return "…" + self.peer_id[-8:]

    @property
    def full_precision(self) -> bool:
        return self.precision_bits >= FULL_PRECISION_BITS


@dataclass(frozen=True)
class ModelReport:
    model_id: str
    num_blocks: int
    repositories: tuple[str, ...]
    config_hashes: tuple[str, ...]
    blocks: tuple[BlockCoverage, ...]
    peer_ids: tuple[str, ...]
    compute_tokens_s: float  # sum over its online peers

    @property
    def missing_blocks(self) -> tuple[int, ...]:
        return tuple(b.block for b in self.blocks if b.status != "covered")

    @property
    def can_run(self) -> bool:
        return self.num_blocks > 0 and not self.missing_blocks

    @property
    def min_replication(self) -> int:
        return min((b.counts["online"] for b in self.blocks), default=0)

    @property
    def blocks_covered(self) -> int:
        return sum(b.status == "covered" for b in self.blocks)

    @property
    def blocks_covered_full_precision(self) -> int:
        return sum(b.online_full_precision > 0 for b in self.blocks)

    @property
    def can_run_full_precision(self) -> bool:
        return self.num_blocks > 0 and self.blocks_covered_full_precision == self.num_blocks


@dataclass(frozen=True)
class Totals:
    models: int
    models_runnable: int
    peers: int
    peers_by_status: Mapping[str, int]
    peers_by_version: Mapping[str, int]
    compute_tokens_s: float  # sum over online peers
    network_mbps: float


@dataclass(frozen=True)
class Report:
    generated_at: float
    snapshot_at: float | None
    crawl_s: float | None
    crawl_error: str | None
    models: tuple[ModelReport, ...]
    peers: tuple[PeerRow, ...]
    totals: Totals
    skipped_entries: int
    problems: tuple[str, ...]
    reported: tuple[ReportedPeer, ...] = ()  # peers clients reported for wrong results (health.reports)
    flag_reporters: int = DEFAULT_FLAG_REPORTERS


def summarize(snapshot: Snapshot, now: float, flag_reporters: int = DEFAULT_FLAG_REPORTERS) -> Report:
    """The report of one snapshot at unix time `now` (see the module docstring for the rules); reported
    peers are flagged at `flag_reporters` distinct reporters (bootstrap.health.reports)."""
    problems = _Problems()
    models, rows = [], []
    for model_id in sorted(snapshot.models, key=str):
        model_report, model_rows = _summarize_model(
            model_id, snapshot.models[model_id], snapshot.probes, problems
        )
        models.append(model_report)
        rows.extend(model_rows)
    return Report(
        generated_at=now,
        snapshot_at=snapshot.taken_at,
        crawl_s=snapshot.crawl_s,
        crawl_error=snapshot.crawl_error,
        models=tuple(models),
        peers=tuple(rows),
        totals=_totals(models, rows),
        skipped_entries=problems.skipped,
        problems=problems.lines(),
        reported=summarize_reports(snapshot.reports, flag_reporters, {r.peer_id for r in rows}),
        flag_reporters=flag_reporters,
    )


class _Problems:
    """Collects problem lines (capped) and the count of skipped entries."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self.total = 0
        self.skipped = 0

    def add(self, line: str, *, skipped: int = 0) -> None:
        self.total += 1
        self.skipped += skipped
        if len(self._lines) < MAX_PROBLEMS:
            self._lines.append(line)

    def lines(self) -> tuple[str, ...]:
        extra = self.total - len(self._lines)
        return tuple(self._lines) + ((f"... and {extra} more",) if extra else ())


def _summarize_model(
    model_id: str, model: ModelSnapshot, probes: Mapping[str, Probe], problems: _Problems
) -> tuple[ModelReport, list[PeerRow]]:
    index = tuple(r for r in model.index if isinstance(r, ModelRecord) and r.model_id == model_id)
    num_blocks = _num_blocks(model_id, index, model, problems)
    by_peer = _records_by_peer(model_id, model, num_blocks, problems)
    rows = [_peer_row(model_id, pid, recs, probes.get(pid), problems) for pid, recs in by_peer.items()]
    rows.sort(key=lambda r: (r.span.start, r.span.end, r.peer_id))
    counts = [dict.fromkeys(STATUSES, 0) for _ in range(num_blocks)]
    full = [0] * num_blocks
    for row in rows:
        for block in range(row.span.start, row.span.end):
            counts[block][row.status] += 1
            full[block] += row.status == "online" and row.full_precision
    blocks = tuple(BlockCoverage(block, c, _block_status(c), full[block]) for block, c in enumerate(counts))
    report = ModelReport(
        model_id=model_id,
        num_blocks=num_blocks,
        repositories=tuple(sorted({r.repository for r in index})),
        config_hashes=tuple(sorted({r.config_hash for r in index})),
        blocks=blocks,
        peer_ids=tuple(r.peer_id for r in rows),
        compute_tokens_s=sum(r.compute_tokens_s for r in rows if r.status == "online"),
    )
    return report, rows


def _num_blocks(
    model_id: str, index: tuple[ModelRecord, ...], model: ModelSnapshot, problems: _Problems
) -> int:
    """The model's block count: from its index entries (the largest if they disagree), else its block keys."""
    counts = sorted({r.num_blocks for r in index})
    if len(counts) > 1:
        problems.add(
            f"model {model_id}: index entries disagree on the number of blocks ({counts}); "
            f"showing {counts[-1]}"
        )
    if len({r.config_hash for r in index}) > 1:
        problems.add(
            f"model {model_id}: peers serve different configs under one model id (config hashes differ)"
        )
    if counts:
        return counts[-1]
    keys = [b for b in model.blocks if type(b) is int and 0 <= b < _MAX_BLOCK]
    return max(keys, default=-1) + 1


def _records_by_peer(
    model_id: str, model: ModelSnapshot, num_blocks: int, problems: _Problems
) -> dict[str, list[BlockRecord]]:
    """{peer_id: its records that agree with the key they were found under}; the rest is skipped."""
    by_peer: dict[str, list[BlockRecord]] = defaultdict(list)
    for block, entries in model.blocks.items():
        if not isinstance(entries, Mapping):
            problems.add(f"model {model_id}: block key {block!r:.40} holds no record map; skipped", skipped=1)
            continue
        for peer_id, record in entries.items():
            problem = _entry_problem(model_id, num_blocks, block, peer_id, record)
            if problem:
                problems.add(f"model {model_id}: {problem}; skipped", skipped=1)
            else:
                by_peer[peer_id].append(record)
    return by_peer


def _entry_problem(
    model_id: str, num_blocks: int, block: object, peer_id: object, record: object
) -> str | None:
    if type(peer_id) is not str or not peer_id.isalnum() or len(peer_id) > 128:
        return f"an entry under block {block!r:.20} has an invalid peer id {peer_id!r:.60}"
    if not isinstance(record, BlockRecord):
        return f"peer {peer_id} under block {block!r:.20}: not a block record ({type(record).__name__})"
    if type(block) is not int or not 0 <= block < num_blocks:
        return f"peer {peer_id}: block key {block!r:.20} is outside the model's {num_blocks} blocks"
    if record.model_id != model_id or record.block != block:
        return f"peer {peer_id}: a record for {record.model_id}.{record.block} found under {model_id}.{block}"
    if record.end > num_blocks:
        return f"peer {peer_id}: span {record.span} runs past the model's {num_blocks} blocks"
    return None


def _peer_row(
    model_id: str, peer_id: str, records: list[BlockRecord], probe: Probe | None, problems: _Problems
) -> PeerRow:
    info_span, info_state = _info_claims(model_id, peer_id, probe, problems)
    span_counts = Counter(r.span for r in records)
    if info_span in span_counts:
        span = info_span
    else:  # the span most records announce; on a tie the earliest
        span = min(span_counts, key=lambda s: (-span_counts[s], s.start, s.end))
    kept = sorted((r for r in records if r.span == span), key=lambda r: r.block)
    row_problems = []
    if len(kept) < len(records):
        others = sorted({str(s) for s in span_counts if s != span})
        row_problems.append(
            f"{len(records) - len(kept)} stale record(s) announce other spans ({', '.join(others)})"
        )
    states = {r.state for r in kept}
    if len(states) > 1:
        row_problems.append(f"records disagree on state ({', '.join(sorted(states))})")
    state = info_state or max(states, key=_STATE_ORDER.__getitem__)
    rep = next((r for r in kept if r.state == state), kept[0])
    for line in row_problems:
        problems.add(f"peer {peer_id} ({model_id}): {line}")
    return PeerRow(
        peer_id=peer_id,
        model_id=model_id,
        public_name=rep.public_name,
        span=span,
        state=str(state),
        status=_status(state, probe),
        software_version=rep.software_version,
        protocol=rep.protocol,
        dtype=rep.dtype,
        quant=rep.quant,
        weight_bits=rep.weight_bits,
        kv_dtype=rep.kv_dtype or "auto",
        precision_bits=rep.precision_bits,
        compute_tokens_s=rep.compute_tokens_s,
        network_mbps=rep.network_mbps,
        active_sessions=rep.active_sessions,
        queued_tokens=rep.queued_tokens,
        cache_tokens_left=rep.cache_tokens_left,
        reachability=str(rep.reachability),
        addrs=rep.addrs,
        drain_deadline=rep.drain_deadline if state == BlockState.DRAINING else None,
        blocks_announced=len(kept),
        probed=probe is not None,
        probe_reachable=None if probe is None else bool(probe.reachable),
        rtt_s=_finite(probe.rtt_s) if probe and probe.reachable else None,
        probe_error=None if probe is None or probe.reachable else str(probe.error or "no answer")[:300],
        last_seen=_finite(probe.last_seen) if probe else None,
        problems=tuple(row_problems),
    )


def _info_claims(
    model_id: str, peer_id: str, probe: Probe | None, problems: _Problems
) -> tuple[Span | None, BlockState | None]:
    """(span, state) from the peer's own `info` reply, each None where the reply lacks or garbles it."""
    info = probe.info if probe is not None and probe.reachable else None
    if not isinstance(info, Mapping) or info.get("model_id") != model_id:
        if isinstance(info, Mapping) and "model_id" in info:
            problems.add(
                f"peer {peer_id}: announces {model_id} but its info names {str(info['model_id'])[:96]!r}"
            )
        return None, None
    span = info.get("span")
    ok_span = (
        type(span) is list
        and len(span) == 2
        and all(type(x) is int for x in span)
        and 0 <= span[0] < span[1] <= _MAX_BLOCK
    )
    state = info.get("state")
    ok_state = type(state) is str and state in BlockState.__members__.values()
    return (Span(*span) if ok_span else None), (BlockState(state) if ok_state else None)


def _status(state: BlockState, probe: Probe | None) -> str:
    if state == BlockState.OFFLINE:
        return "offline"
    if probe is not None and not probe.reachable:
        return "unreachable"
    return str(state)


def _block_status(counts: Mapping[str, int]) -> str:
    if counts["online"]:
        return "covered"
    return "draining" if counts["draining"] else "uncovered"


def _finite(value: object) -> float | None:
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def _totals(models: list[ModelReport], rows: list[PeerRow]) -> Totals:
    first_row: dict[str, PeerRow] = {}
    for row in rows:  # a peer id under two models is one peer
        first_row.setdefault(row.peer_id, row)
    peers = first_row.values()
    by_status = dict.fromkeys(STATUSES, 0) | Counter(r.status for r in peers)
    online = [r for r in peers if r.status == "online"]
    return Totals(
        models=len(models),
        models_runnable=sum(m.can_run for m in models),
        peers=len(first_row),
        peers_by_status=by_status,
        peers_by_version=dict(sorted(Counter(r.software_version for r in peers).items())),
        compute_tokens_s=sum(r.compute_tokens_s for r in online),
        network_mbps=sum(r.network_mbps for r in online),
    )
