"""Reported peers: what clients' report records (swarm.records.ReportRecord) say, as pure functions.

A client that catches a peer returning wrong results (client.verify) stores a signed report under
f"swarm.reports.{peer}", one subkey per reporter. The page counts **distinct reporters** per peer, never
reports: one reporter holds at most one live report on a peer however often it writes (the DHT keeps one
value per subkey, and a report lives at most an hour after its check), so one malicious reporter adds at
most 1 to an honest peer's count. A peer is **flagged** only when at least `flag_reporters` (default 3)
distinct reporters report it. The page shows and flags; nobody acts on it: clients never read reports
and ban only on their own checks. Distinct reporters are distinct keys, and keys are free in a public
swarm: the count is a hint to look closer, not proof (a private swarm's admission makes keys scarce).

Reports on peers the crawl did not see are not shown (they are not fetched: the crawler asks for the
peers it found), and entries whose reporter or accused contradict their place are skipped.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from swarm.records import ReportRecord
from swarm.spans import Span

DEFAULT_FLAG_REPORTERS = 3


@dataclass(frozen=True)
class ReportedPeer:
    peer_id: str
    reporters: int  # distinct reporters with a live report on it
    flagged: bool  # reporters >= the page's flag threshold
    models: tuple[str, ...]
    spans: tuple[Span, ...]  # the blocks reported wrong, distinct
    latest: float  # unix time of the newest report's check
    max_rel_error: float  # the largest error a report gives

    @property
    def short_id(self) -> str:
        return "…" + self.peer_id[-8:]


def summarize_reports(reports: Mapping[str, Mapping[str, ReportRecord]], flag_reporters: int,
                      known_peers: Iterable[str] | None = None) -> tuple[ReportedPeer, ...]:
    """{accused: {reporter: report}} -> one row per reported peer, most reporters first. `known_peers`:
    only these (the crawl's peers), when given."""
    known = None if known_peers is None else set(known_peers)
    rows = []
    for accused, by_reporter in reports.items():
        if known is not None and accused not in known:
            continue
        kept = [r for reporter, r in by_reporter.items()
                if isinstance(r, ReportRecord) and r.accused == accused and r.reporter == reporter]
        if not kept:
            continue
        reporters = len({r.reporter for r in kept})
        rows.append(ReportedPeer(
            peer_id=accused, reporters=reporters, flagged=reporters >= flag_reporters,
            models=tuple(sorted({r.model_id for r in kept})),
            spans=tuple(sorted({r.span for r in kept}, key=lambda s: (s.start, s.end))),
            latest=max(r.time for r in kept), max_rel_error=max(r.rel_error for r in kept),
        ))
    rows.sort(key=lambda r: (-r.reporters, r.peer_id))
    return tuple(rows)


def reports_json(rows: Iterable[ReportedPeer], flag_reporters: int) -> dict:
    return {
        "flag_reporters": flag_reporters,
        "peers": [
            {"peer_id": r.peer_id, "reporters": r.reporters, "flagged": r.flagged, "models": list(r.models),
             "blocks": [[s.start, s.end] for s in r.spans], "latest": r.latest,
             "max_rel_error": r.max_rel_error}
            for r in rows
        ],
    }


def reports_html(rows: tuple[ReportedPeer, ...], flag_reporters: int) -> str:
    """The "Reported peers" section (empty string when nobody is reported). Hooks: `id="reports"`, and on
    each row `data-peer-id`, `data-reporters` and `class="reported flagged"` when flagged."""
    if not rows:
        return ""
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    body = "".join(
        f'<tr class="reported{" flagged" if r.flagged else ""}" data-peer-id="{e(r.peer_id)}" '
        f'data-reporters="{r.reporters}"><td><code title="{e(r.peer_id)}">{e(r.short_id)}</code></td>'
        f"<td>{e(', '.join(r.models))}</td><td>{e(', '.join(str(s) for s in r.spans))}</td>"
        f"<td><b>{r.reporters}</b></td><td>{'flagged' if r.flagged else '—'}</td></tr>"
        for r in rows
    )
    return (
        '<section id="reports"><h2>Reported peers</h2>'
        f'<p class="muted">clients that caught these peers returning wrong results; a peer is flagged at '
        f"{flag_reporters} or more distinct reporters. Clients ban only on their own checks, never on "
        "reports."
        "</p><div class=\"scroll\"><table><thead><tr><th>peer</th><th>model</th><th>blocks</th>"
        f"<th>distinct reporters</th><th>flag</th></tr></thead><tbody>{body}</tbody></table></div></section>"
    )
