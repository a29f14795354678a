"""Report -> the `swarm.health/v1` JSON document (SCHEMA.md) and the HTML page. Pure functions.

Every string that came from the network (names, versions, ids, errors) goes through html.escape in the
page. Stable hooks for tests and scripts: `id="coverage-<model id>"` on each coverage map,
`class="block covered|draining|uncovered"` + `data-block` on each block cell, `data-peer-id` and
`class="state-<status>"` on each peer row, `id="can-run-<model id>"` on each badge.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable

from bootstrap.health.reports import reports_html, reports_json
from bootstrap.health.summary import BLOCK_STATUSES, STATUSES, BlockCoverage, ModelReport, PeerRow, Report

SCHEMA = "swarm.health/v1"

from swarm.errors import format_blocks

# ---------------------------------------------------------------- JSON


def report_json(report: Report, refresh_s: float) -> dict:
    """The JSON document of SCHEMA (see SCHEMA.md); plain dict/list/str/int/float/bool/None only."""
    t = report.totals
    return {
        "schema": SCHEMA,
        "generated_at": report.generated_at,
        "snapshot_at": report.snapshot_at,
        "refresh_s": refresh_s,
        "crawl": {"duration_s": report.crawl_s, "error": report.crawl_error},
        "totals": {
            "models": t.models,
            "models_runnable": t.models_runnable,
            "peers": t.peers,
            "peers_by_status": dict(t.peers_by_status),
            "peers_by_version": dict(t.peers_by_version),
            "compute_tokens_s": t.compute_tokens_s,
            "network_mbps": t.network_mbps,
        },
        "models": [_model_json(m) for m in report.models],
        "peers": [_peer_json(p, report.generated_at) for p in report.peers],
        "skipped_entries": report.skipped_entries,
        "problems": list(report.problems),
        "reports": reports_json(report.reported, report.flag_reporters),
    }


def _model_json(m: ModelReport) -> dict:
    return {
        "model_id": m.model_id,
        "num_blocks": m.num_blocks,
        "repositories": list(m.repositories),
        "config_hashes": list(m.config_hashes),
        "can_run": m.can_run,
        "blocks_covered": m.blocks_covered,
        "can_run_full_precision": m.can_run_full_precision,
        "blocks_covered_full_precision": m.blocks_covered_full_precision,
        "min_replication": m.min_replication,
        "missing_blocks": list(m.missing_blocks),
        "compute_tokens_s": m.compute_tokens_s,
        "blocks": [
            {"block": b.block, "status": b.status, **b.counts,
             "online_full_precision": b.online_full_precision}
            for b in m.blocks
        ],
        "peers": list(m.peer_ids),
    }


def _peer_json(p: PeerRow, now: float) -> dict:
    return {
        "peer_id": p.peer_id,
        "short_id": p.short_id,
        "model_id": p.model_id,
        "public_name": p.public_name,
        "span": [p.span.start, p.span.end],
        "state": p.state,
        "status": p.status,
        "software_version": p.software_version,
        "protocol": p.protocol,
        "dtype": p.dtype,
        "quant": p.quant,
        "weight_bits": p.weight_bits,
        "kv_dtype": p.kv_dtype,
        "precision_bits": p.precision_bits,
        "full_precision": p.full_precision,
        "compute_tokens_s": p.compute_tokens_s,
        "network_mbps": p.network_mbps,
        "active_sessions": p.active_sessions,
        "queued_tokens": p.queued_tokens,
        "cache_tokens_left": p.cache_tokens_left,
        "reachability": p.reachability,
        "addrs": list(p.addrs),
        "drain_deadline": p.drain_deadline,
        "blocks_announced": p.blocks_announced,
        "probe": {
            "probed": p.probed,
            "reachable": p.probe_reachable,
            "rtt_ms": None if p.rtt_s is None else round(p.rtt_s * 1000, 3),
            "error": p.probe_error,
            "last_seen": p.last_seen,
            "last_seen_age_s": None if p.last_seen is None else round(max(0.0, now - p.last_seen), 3),
        },
        "problems": list(p.problems),
    }


# ---------------------------------------------------------------- HTML


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def report_html(report: Report, refresh_s: float, notice: str = "") -> str:
    """`notice`: a line under the header (plain text; a private swarm's page says what it leaves out)."""
    refresh = max(2, round(refresh_s))
    body = [_header(report), *((f'<p id="notice" class="muted">{e(notice)}</p>',) if notice else ()),
            *(_model_section(m, report) for m in report.models)]
    if not report.models:
        body.append(f'<p class="empty">{_empty_reason(report)}</p>')
    body.append(_peers_table(report.peers, report.generated_at))
    body.append(reports_html(report.reported, report.flag_reporters))
    if report.problems:
        items = "".join(f"<li>{e(p)}</li>" for p in report.problems)
        body.append(
            f'<details id="problems"><summary>{len(report.problems)} data problem(s)</summary>'
            f"<ul>{items}</ul></details>"
        )
    body.append(
        '<footer>JSON: <a href="api/v1/state">/api/v1/state</a> · Prometheus: <a href="metrics">/metrics</a>'
        f" · refreshes every {e(refresh)} s</footer>"
    )
    return _PAGE.format(refresh=refresh, css=_CSS, body="\n".join(body))


def _empty_reason(report: Report) -> str:
    if report.snapshot_at:
        return "No models are announced on the DHT yet."
    if report.crawl_error:
        return "No crawl of the DHT has succeeded yet."
    return "First crawl of the DHT in progress…"


def _header(report: Report) -> str:
    t = report.totals
    stamp = _utc(report.snapshot_at) if report.snapshot_at else "not yet"
    crawl = (
        f' <span class="warn">last crawl failed: {e(report.crawl_error)}</span>' if report.crawl_error else ""
    )
    counts = "".join(
        f'<span class="pill state-{s}">{e(s)} <b>{t.peers_by_status.get(s, 0)}</b></span>'
        for s in STATUSES
        if t.peers_by_status.get(s, 0) or s == "online"
    )
    versions = ", ".join(f"{e(v)} × {n}" for v, n in t.peers_by_version.items()) or "—"
    return (
        "<header><h1>Swarm health</h1>"
        f'<p id="totals">{t.models} model(s), {t.models_runnable} runnable · <b>{t.peers}</b> peer(s) '
        f"{counts} · {_num(t.compute_tokens_s)} tokens/s online · versions: {versions}</p>"
        f'<p class="muted">snapshot {e(stamp)}{crawl}</p></header>'
    )


def _model_section(m: ModelReport, report: Report) -> str:
    mid = e(m.model_id)
    badge = (
        f'<span id="can-run-{mid}" class="badge can-run">can run</span>'
        if m.can_run
        else f'<span id="can-run-{mid}" class="badge cannot-run">cannot run</span>'
    )
    missing = (
        f' · missing blocks: <span class="missing">{e(format_blocks(list(m.missing_blocks)))}</span>'
        if m.missing_blocks
        else ""
    )
    full = (
        f' · <span id="full-precision-{mid}">{m.blocks_covered_full_precision} at full precision</span>'
        if m.blocks_covered_full_precision < m.blocks_covered
        else ""
    )
    cells = "".join(_block_cell(b) for b in m.blocks)
    legend = "".join(f'<span class="block {s} legend"></span>{s} ' for s in BLOCK_STATUSES)
    return (
        f'<section class="model" data-model-id="{mid}"><h2>{mid} {badge}</h2>'
        f"<p>{m.num_blocks} blocks · {m.blocks_covered} covered{full} · min replication {m.min_replication}"
        f" · {len(m.peer_ids)} peer(s) · {_num(m.compute_tokens_s)} tokens/s{missing}</p>"
        f'<div class="coverage" id="coverage-{mid}">{cells}</div>'
        f'<p class="legend muted">{legend}</p></section>'
    )


def _block_cell(b: BlockCoverage) -> str:
    c = b.counts
    shade = f" rep-{min(c['online'], 3)}" if b.status == "covered" else ""
    joining = " joining" if b.status == "uncovered" and c["joining"] else ""
    title = (
        f"block {b.block}: " + ", ".join(f"{c[s]} {s}" for s in STATUSES if c[s])
        if any(c.values())
        else (f"block {b.block}: nobody")
    )
    return (
        f'<div class="block {b.status}{shade}{joining}" data-block="{b.block}" data-online="{c["online"]}" '
        f'title="{e(title)}">{c["online"] or ""}</div>'
    )


_COLUMNS = (
    ("name", ""),
    ("peer", ""),
    ("model", "opt"),
    ("span", ""),
    ("state", ""),
    ("version", "opt"),
    ("precision", "opt"),
    ("tokens/s", "opt"),
    ("load", "opt"),
    ("cache left", "opt"),
    ("reachability", "opt"),
    ("last seen", ""),
)


def _peers_table(rows: Iterable[PeerRow], now: float) -> str:
    head = "".join(f'<th class="{cls}">{name}</th>' for name, cls in _COLUMNS)
    body = "".join(_peer_tr(r, now) for r in rows) or f'<tr><td colspan="{len(_COLUMNS)}">no peers</td></tr>'
    return (
        f'<section><h2>Peers</h2><div class="scroll"><table id="peers"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div></section>"
    )


def _peer_tr(r: PeerRow, now: float) -> str:
    state = e(r.status)
    if r.status == "draining" and r.drain_deadline:
        state += f' <span class="muted">(leaves in {max(0, round(r.drain_deadline - now))} s)</span>'
    elif r.status == "unreachable":
        state += f' <span class="muted" title="{e(r.probe_error or "")}">(probe failed)</span>'
    precision = _precision_cell(r)
    seen = "never" if r.last_seen is None else f"{max(0, round(now - r.last_seen))} s ago"
    rtt = f" · {r.rtt_s * 1000:.0f} ms" if r.rtt_s is not None else ""
    cells = (
        e(r.public_name) or '<span class="muted">—</span>',
        f'<code title="{e(r.peer_id)}">{e(r.short_id)}</code>',
        e(r.model_id),
        e(r.span),
        state,
        e(r.software_version),
        precision,
        _num(r.compute_tokens_s),
        f"{r.active_sessions} sess · {r.queued_tokens} queued",
        f"{r.cache_tokens_left} tok",
        e(r.reachability),
        seen + rtt,
    )
    tds = "".join(f'<td class="{cls}">{cell}</td>' for cell, (_, cls) in zip(cells, _COLUMNS, strict=True))
    return f'<tr class="peer state-{e(r.status)}" data-peer-id="{e(r.peer_id)}">{tds}</tr>'


def _precision_cell(r: PeerRow) -> str:
    """ "float32", or "bfloat16 · int8 weights (8 bit) · fp8 KV" marked `low-precision` (bits as a title)."""
    parts = [e(r.dtype)]
    if r.quant != "none":
        bits = f" ({r.weight_bits} bit)" if r.weight_bits is not None else ""
        parts.append(f"{e(r.quant)} weights{bits}")
    if r.kv_dtype != "auto":
        parts.append(f"{e(r.kv_dtype)} KV")
    if r.full_precision:
        return f'<span class="precision full">{" · ".join(parts)}</span>'
    return (f'<span class="precision low-precision" title="{r.precision_bits}-bit precision: outputs differ '
            f'slightly from full precision">{" · ".join(parts)}</span>')


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{refresh}">
<title>Swarm health</title><style>{css}</style></head>
<body>
{body}
</body></html>
"""

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;
  padding:12px;color:#1b1f24;background:#fafafa;overflow-wrap:anywhere}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.15em;margin:.8em 0 .3em}
.muted{color:#6a737d}.warn{color:#b00020}code{font-size:.9em}.low-precision{color:#8a5a00}
.pill{display:inline-block;padding:0 .5em;margin:0 .15em;border-radius:1em;background:#eee;white-space:nowrap}
.badge{font-size:.75em;padding:.15em .6em;border-radius:1em;vertical-align:middle;color:#fff}
.can-run{background:#2e7d32}.cannot-run{background:#c62828}
.model{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:8px 12px;margin:10px 0}
.coverage{display:flex;flex-wrap:wrap;gap:2px}
.block{width:22px;height:22px;font-size:11px;line-height:22px;text-align:center;border-radius:3px;color:#fff}
.block.legend{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 .2em 0 .6em}
.block.covered{background:#66bb6a}.block.rep-2{background:#388e3c}.block.rep-3{background:#1b5e20}
.block.draining{background:#f9a825}.block.uncovered{background:#e53935}.block.uncovered.joining{background:#90a4ae}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.9em}
th,td{padding:4px 6px;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
th{position:sticky;top:0;background:#f3f4f6}
tr.state-draining{background:#fff8e1}tr.state-unreachable,tr.state-offline{background:#ffebee;color:#6a737d}
tr.state-joining{background:#eceff1}
.state-online b{color:#2e7d32}
footer{margin:1.5em 0;color:#6a737d;font-size:.9em}
@media (max-width:640px){body{padding:6px;font-size:14px}.opt{display:none}
  .block{width:18px;height:18px;line-height:18px;font-size:10px}}
"""
