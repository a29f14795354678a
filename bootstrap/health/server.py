"""HealthServer: the HTTP face of the health monitor (aiohttp), in the caller's event loop.

What the page, the JSON and the metrics show is the owner's choice (HealthConfig.publish, see
publish.py): everything, a summary without peer ids and addresses (a private swarm's default), or
nothing (403).

Routes (GET and HEAD; any other method gets 405):
  /                        the HTML page (refreshes itself every refresh_s)
  /api/v1/state            the JSON document, schema "swarm.health/v1" (bootstrap/health/SCHEMA.md)
  /metrics                 Prometheus text format (metrics.py lists the metrics)
  /api/v1/reachability     ?peer=<peer id>&addr=<multiaddr>: can others dial that peer there directly?

Requests never touch the DHT: they read the latest Report, which the crawler task replaces every
refresh. Bad requests get a 4xx with a JSON (API) or text body: unknown path 404, wrong method 405,
query string over `max_query_chars` 414, malformed parameters 400, address not the caller's 403, too
many reachability checks at once 429 (503 if the probe daemon cannot start). An unexpected error is
logged with its traceback and answered 500 without one.

Owns: the crawler task, the aiohttp runner, each reachability check's probe p2pd. `start()` returns once the
HTTP socket listens (before the first crawl ends: the page then says so); `close()` stops all three.
It borrows `dht` and `p2p` (the bootstrap's own, or `swarm health`'s) and never shuts them down.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bootstrap.health.config import HealthConfig
from bootstrap.health.crawler import Crawler
from bootstrap.health.metrics import report_metrics
from bootstrap.health.publish import access, summary_json, summary_report
from bootstrap.health.render import report_html, report_json
from bootstrap.health.snapshot import Snapshot
from bootstrap.health.summary import Report, summarize
from swarm.errors import PeerError, ProtocolError

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HealthServer:
    def __init__(self, config: HealthConfig, dht: Any, p2p: Any, clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock
        self.crawler = Crawler(dht, p2p, config, clock)
        self.checker = _reachability_checker(config)
        self.report: Report = summarize(Snapshot(), clock())
        self.refreshed = asyncio.Event()  # set after each published snapshot (tests wait on it)
        self._checks = asyncio.Semaphore(config.max_concurrent_reachability_checks)
        self._runner: web.AppRunner | None = None
        self._crawl_task: asyncio.Task | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host if ':' not in host else f'[{host}]'}:{self.port}/"

    async def start(self) -> None:
        """Listen on (host, port) and start crawling. Raises OSError if the port is taken."""
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = site._server.sockets[0].getsockname()[1]
        self._crawl_task = asyncio.create_task(self.crawler.run(self.publish), name="health-crawler")

    async def close(self) -> None:
        try:
            if self._crawl_task is not None:
                self._crawl_task.cancel()
                await asyncio.gather(self._crawl_task, return_exceptions=True)
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            if self.checker is not None:
                await self.checker.close()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def publish(self, snapshot: Snapshot) -> None:
        """Replace the served report (the crawler calls this after each crawl)."""
        self.report = summarize(snapshot, self.clock(), self.config.report_flag_reporters)
        self.refreshed.set()
        self.refreshed = asyncio.Event()

    # ------------------------------------------------------------ HTTP

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.on_response_prepare.append(_harden)
        app.router.add_get("/", self._page)
        app.router.add_get("/api/v1/state", self._state)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/api/v1/reachability", self._reachability)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The shared prelude: bound the query string, turn errors into clean answers."""
        if len(request.query_string) > self.config.max_query_chars:
            return _error(request, 414, f"query string longer than {self.config.max_query_chars} characters")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400 and request.path.startswith("/api/"):  # JSON errors on the API, Allow kept
                allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
                return _error(request, e.status, e.reason, headers=allow)
            raise
        except Exception:
            logger.exception("health server: %s %s failed", request.method, request.path_qs[:200])
            return _error(request, 500, "internal error; see the health server's log")

    @property
    def _private(self) -> bool:
        return self.config.swarm_key is not None

    def _unpublished(self, request: web.Request) -> web.Response | None:
        """The 403 of a page whose owner publishes nothing (publish "none"), else None."""
        if self.config.publish_mode != "none":
            return None
        return _error(request, 403, "this swarm's owner publishes nothing on its health page"
                      + (" (a private swarm)" if self._private else ""))

    def _published_report(self) -> Report:
        return summary_report(self.report) if self.config.publish_mode == "summary" else self.report

    async def _page(self, request: web.Request) -> web.Response:
        if (refused := self._unpublished(request)) is not None:
            return refused
        notice = ""
        if self.config.publish_mode == "summary":
            notice = ("Private swarm: " if self._private else "") + (
                "its owner publishes a summary only (no peer ids, addresses, names or versions).")
        elif self._private:
            notice = "Private swarm: only holders of its swarm key may join; its owner publishes this page in full."
        return web.Response(
            text=report_html(self._published_report(), self.config.refresh_s, notice),
            content_type="text/html", headers=_NO_CACHE,
        )

    async def _state(self, request: web.Request) -> web.Response:
        if (refused := self._unpublished(request)) is not None:
            return refused
        document = report_json(self.report, self.config.refresh_s)
        if self.config.publish_mode == "summary":
            document = summary_json(document)
        document["access"] = access(self._private, self.config.publish_mode)
        return web.json_response(document, headers=_NO_CACHE)

    async def _metrics(self, request: web.Request) -> web.Response:
        if (refused := self._unpublished(request)) is not None:
            return refused
        body = report_metrics(self._published_report(), self.clock())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, **_NO_CACHE})

    async def _reachability(self, request: web.Request) -> web.Response:
        if self.checker is None:
            return _error(request, 503, "reachability checks need the hivemind backend (a probe p2pd); this "
                          "health monitor runs on the lite one")
        from bootstrap.health.reachability import parse_request

        query = request.query
        if any(len(query.getall(k)) > 1 for k in query):
            return _error(request, 400, "give each parameter once")
        try:
            check = parse_request(
                query.get("peer"), query.get("addr"), request.remote, self.config.reachability_same_ip_only
            )
        except ProtocolError as e:
            return _error(request, 400, str(e))
        except PermissionError as e:
            return _error(request, 403, str(e))
        if self._checks.locked():
            return _error(
                request,
                429,
                "too many reachability checks at once; retry in a few seconds",
                headers={"Retry-After": "5"},
            )
        try:
            async with self._checks:
                verdict = await self.checker.check(check)
        except PeerError as e:  # our own probe daemon failed, not the peer under test
            return _error(request, 503, str(e), headers={"Retry-After": "30"})
        return web.json_response(
            {
                "reachable": verdict.reachable,
                "peer": check.peer_id,
                "addr": check.addr,
                "detail": verdict.detail,
                "rtt_ms": None if verdict.rtt_s is None else round(verdict.rtt_s * 1000, 3),
                "your_ip": request.remote,
            }
        )


_NO_CACHE = {"Cache-Control": "no-store"}


def _reachability_checker(config: HealthConfig):
    """The reachability checker (a fresh p2pd per check), or None where hivemind is not installed: a
    health monitor on the lite backend (swarm.lite) serves everything else."""
    if importlib.util.find_spec("hivemind") is None:
        return None
    from bootstrap.health.reachability import ReachabilityChecker

    return ReachabilityChecker(config.reachability_timeout_s, config.swarm_key)


async def _harden(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, error pages included: error bodies may quote a caller's input, so browsers must
    take them for what their Content-Type says (JSON, plain text), never sniff them into HTML."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")


def _error(request: web.Request, status: int, message: str, headers: dict | None = None) -> web.Response:
    if request.path.startswith("/api/"):
        return web.json_response({"error": message, "status": status}, status=status, headers=headers)
    return web.Response(text=f"{status}: {message}\n", status=status, headers=headers)
