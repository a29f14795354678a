"""What a health page publishes: its owner's choice (HealthConfig.publish), as pure functions.

    full     everything (the default of a public swarm): every peer's id, addresses, name, version, load
    summary  the default of a private swarm: totals and, per model, its id, block count and block-by-block
             coverage (peer counts by status), whether it can run, its throughput; no peer ids, addresses,
             names, versions, repositories, config hashes or problem lines (they quote peer ids)
    none     nothing: every route but the reachability check answers 403 (peers still use that check)

Summary is a whitelist: `summary_json` keeps only the fields named here, so a field added to the full
document later stays out of a private swarm's page until someone decides it belongs in the summary.
Every document says what it is: "access": {"private": bool, "publish": mode}.
"""

from __future__ import annotations

from bootstrap.health.summary import ModelReport, Report, Totals

PUBLISH_MODES = ("full", "summary", "none")

_TOP = ("schema", "generated_at", "snapshot_at", "refresh_s", "totals", "models", "skipped_entries")
_TOTALS = ("models", "models_runnable", "peers", "peers_by_status", "compute_tokens_s", "network_mbps")
_MODEL = ("model_id", "num_blocks", "can_run", "blocks_covered", "min_replication", "missing_blocks",
          "compute_tokens_s", "blocks")
_BLOCK = ("block", "status", "joining", "online", "draining", "offline", "unreachable")
CRAWL_FAILED = "the last crawl failed (details are not published)"


def access(private: bool, mode: str) -> dict:
    return {"private": private, "publish": mode}


def summary_json(full: dict) -> dict:
    """The summary document of a full `swarm.health/v1` document (see the module docstring)."""
    out = {k: full[k] for k in _TOP if k in full}
    out["totals"] = {k: full["totals"][k] for k in _TOTALS if k in full["totals"]}
    out["models"] = [
        {**{k: m[k] for k in _MODEL if k in m}, "blocks": [{k: b[k] for k in _BLOCK if k in b} for b in m["blocks"]],
         "peers": [], "repositories": [], "config_hashes": []}
        for m in full["models"]
    ]
    crawl = full.get("crawl", {})
    out["crawl"] = {"duration_s": crawl.get("duration_s"), "error": CRAWL_FAILED if crawl.get("error") else None}
    out["peers"], out["problems"] = [], []
    return out


def summary_report(report: Report) -> Report:
    """`report` with only what a summary publishes, for the HTML page and the metrics. A model's peers
    become anonymous placeholders ("anonymous-1", ...): their number shows, their ids do not."""
    t = report.totals
    return Report(
        generated_at=report.generated_at,
        snapshot_at=report.snapshot_at,
        crawl_s=report.crawl_s,
        crawl_error=CRAWL_FAILED if report.crawl_error else None,
        models=tuple(
            ModelReport(model_id=m.model_id, num_blocks=m.num_blocks, repositories=(), config_hashes=(),
                        blocks=m.blocks, peer_ids=tuple(f"anonymous-{i + 1}" for i in range(len(m.peer_ids))),
                        compute_tokens_s=m.compute_tokens_s)
            for m in report.models
        ),
        peers=(),
        totals=Totals(models=t.models, models_runnable=t.models_runnable, peers=t.peers,
                      peers_by_status=t.peers_by_status, peers_by_version={}, compute_tokens_s=t.compute_tokens_s,
                      network_mbps=t.network_mbps),
        skipped_entries=report.skipped_entries,
        problems=(),
    )
