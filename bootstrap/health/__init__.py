"""The health monitor: crawls the DHT, probes every peer, and publishes a page, JSON and metrics.

Layout (functional core, imperative shell):
  config.py        HealthConfig: every knob, validated once; the CLIs build their flags from it
  snapshot.py      Snapshot: what one crawl saw (records per model/block/peer, probe results); plain data
  summary.py       summarize(snapshot, now) -> Report: PURE, no network; coverage, replication, peers, totals
  render.py        Report -> HTML page and the `swarm.health/v1` JSON (SCHEMA.md documents it)
  metrics.py       Report -> Prometheus text, through a collector on a fresh registry per scrape
  crawler.py       the loop that builds a Snapshot every refresh: DHT reads, then `info` probes
  reachability.py  "can others dial me directly?": dials a peer from a fresh p2pd that knows nobody
  server.py        the aiohttp app: routes are thin and read only the latest Report, never the DHT
  cli.py           `swarm health`; `swarm bootstrap --health-port` runs the same HealthServer in-process
"""
