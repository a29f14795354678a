"""DrainController: when a peer leaves, and whether it first lets its open sessions finish.

Notices that start draining (the first one wins):
  - SIGTERM (what an orchestrator or `kill` sends);
  - a file appearing at `drain_notice_file`, checked every `drain_notice_file_period_s` (how spot-instance
    agents hand the notice to the processes of a machine); an existing file counts, so remove it before
    restarting the peer;
  - `drain_notice_url` answering a GET with 200 and a non-empty body, polled every
    `drain_notice_url_period_s`; 404 means no notice. This is how AWS's instance metadata endpoint
    `http://169.254.169.254/latest/meta-data/spot/instance-action` behaves. Other answers and network
    errors are logged and polled again: a flaky metadata service never stops the peer.
Requests to leave at once: SIGINT (Ctrl-C), or any second SIGTERM/SIGINT while draining.

Draining, as the rest of the swarm sees it: the server's state becomes "draining" with a deadline of
now + `drain_grace_s` (unix time), announced on the DHT at once; new sessions are refused with error code
`swarm.protocol.ERROR_DRAINING`; open sessions keep stepping, and every result carries `drain_deadline`
so their clients learn it on their next step. The peer leaves when its last session closes or the
deadline passes, whichever comes first.

Mutates: the server's state, through `server.begin_drain()`, and its DHT records, through its announcer;
nothing else. `run()` returns why the peer leaves; the caller then shuts the server down (announcing
offline). Watchers never raise: a failed poll is logged and retried.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from swarm.errors import PeerRefused

from peer.config import PeerConfig

logger = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_S = 5.0  # the draining announce; leaving is not held up by a slow DHT
MAX_NOTICE_BYTES = 64 * 1024
# Metadata endpoints are link-local and never behind a proxy; an http_proxy variable must not reroute them.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DrainingRefusal(PeerRefused):
    """A new session asked of a draining peer; answered with error code `ERROR_DRAINING`, fatal."""

    def __init__(self, deadline: float, now: float):
        at = datetime.fromtimestamp(deadline, UTC).strftime("%H:%M:%S UTC")
        super().__init__(
            f"peer is draining: it is leaving the swarm in {max(0.0, deadline - now):.0f} s (at {at}) and "
            "takes no new sessions; open the session on another peer"
        )
        self.deadline = deadline


def fetch_notice(url: str, timeout_s: float) -> str | None:
    """One poll of a termination-notice endpoint (GET, no proxy).

    Returns the notice (the body, stripped) when the answer is 200 with a non-empty body; None when it is
    404 or any other success without a body (no notice). Raises OSError (urllib.error.URLError and
    HTTPError included, timeouts) or http.client.HTTPException for anything else.
    """
    try:
        with _NO_PROXY_OPENER.open(urllib.request.Request(url, method="GET"), timeout=timeout_s) as reply:
            status, body = reply.status, reply.read(MAX_NOTICE_BYTES)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            return None
        raise
    text = body.decode("utf-8", errors="replace").strip()
    return text if status == 200 and text else None


class DrainController:
    """Watches for notices and decides when the peer leaves (see the module docstring).

    `server` needs: `begin_drain(deadline)`, `announcer.announce(state)`, `state`, and `sessions` with
    `active` and `wait_empty()`. `on_signal`, `notice` and `leave_now` are synchronous and safe to call
    from a loop signal handler; `run()` is awaited once, in the same event loop.
    """

    def __init__(
        self, server, config: PeerConfig, *, clock: Callable[[], float] = time.time,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ):
        self._server = server
        self._config = config
        self._clock = clock  # unix time: the deadline travels to other machines
        self._say = say  # the two operator-facing lines: draining starts, leaving
        self._notice: str | None = None  # what asked to drain, first
        self._leave_now: str | None = None  # what asked to leave at once, first
        self._noticed = asyncio.Event()
        self._leaving = asyncio.Event()

    # ------------------------------------------------------------ requests (sync)

    def on_signal(self, sig: signal.Signals) -> None:
        """SIGTERM drains; SIGINT, or any signal once a notice came, leaves at once."""
        name = signal.Signals(sig).name
        if self._notice is not None:
            self.leave_now(f"{name} while draining")
        elif sig == signal.SIGTERM:
            self.notice(name)
        else:
            self.leave_now(name)

    def notice(self, source: str) -> None:
        if self._notice is None:
            self._notice = source
            self._noticed.set()

    def leave_now(self, reason: str) -> None:
        if self._leave_now is None:
            self._leave_now = reason
            self._leaving.set()

    # ------------------------------------------------------------ the loop

    async def run(self) -> str:
        """Watch for notices until it is time to leave; returns why, for the operator's log line."""
        async with asyncio.TaskGroup() as group:
            watchers = [group.create_task(w, name=name) for name, w in self._watchers()]
            try:
                return await self._until_leave()
            finally:
                for watcher in watchers:
                    watcher.cancel()

    def _watchers(self) -> list[tuple[str, Awaitable[None]]]:
        c = self._config
        out = []
        if c.drain_notice_file:
            out.append(("drain-notice-file", self._watch_file(c.drain_notice_file)))
        if c.drain_notice_url:
            out.append(("drain-notice-url", self._watch_url(c.drain_notice_url)))
        return out

    async def _until_leave(self) -> str:
        await _first_of(self._noticed.wait(), self._leaving.wait())
        if self._leave_now is not None:
            return self._leave_now
        grace_s = self._config.drain_grace_s
        deadline = self._clock() + grace_s
        self._server.begin_drain(deadline)  # from here on, no new session is opened
        sessions = self._server.sessions
        self._say(f"draining: leaving within {grace_s:g} s ({sessions.active} sessions open; "
                  f"notice: {self._notice})")
        await _first_of(self._announce_draining(), self._leaving.wait())
        left_s = deadline - self._clock()
        ended = await _first_of(sessions.wait_empty(), self._leaving.wait(), timeout_s=left_s)
        if self._leave_now is not None:
            return self._leave_now
        if ended:
            return "all sessions closed"
        return f"grace period of {grace_s:g} s over with {sessions.active} sessions open"

    async def _announce_draining(self) -> None:
        try:
            await asyncio.wait_for(self._server.announcer.announce(self._server.state), ANNOUNCE_TIMEOUT_S)
        except Exception:  # the heartbeat announces "draining" again at its next period
            logger.warning("could not announce draining; the heartbeat will retry", exc_info=True)

    # ------------------------------------------------------------ watchers

    async def _watch_file(self, path: str) -> None:
        while not os.path.exists(path):
            await asyncio.sleep(self._config.drain_notice_file_period_s)
        self.notice(f"file {path}")

    async def _watch_url(self, url: str) -> None:
        period_s, timeout_s = self._config.drain_notice_url_period_s, self._config.drain_notice_url_timeout_s
        loop = asyncio.get_running_loop()
        # A private thread: a poll in flight when the peer leaves must not hold up asyncio.run's cleanup.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drain-notice")
        last_error = None
        try:
            while True:
                try:
                    text = await loop.run_in_executor(executor, fetch_notice, url, timeout_s)
                except (OSError, http.client.HTTPException) as e:
                    log = logger.debug if str(e) == last_error else logger.warning  # once per kind of failure
                    log("drain notice URL %s: %s", url, e)
                    last_error, text = str(e), None
                except Exception:  # supervisor loop: a bug here must not take the peer down
                    logger.exception("polling the drain notice URL %s failed", url)
                    text = None
                if text is not None:
                    self.notice(f"URL {url}: {_one_line(text)}")
                    return
                await asyncio.sleep(period_s)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)


def _one_line(text: str, max_chars: int = 200) -> str:
    """Remote text shown on the operator's one-line log: whitespace collapsed, non-printables dropped."""
    return "".join(ch for ch in " ".join(text.split()) if ch.isprintable())[:max_chars]


async def _first_of(*aws: Awaitable, timeout_s: float | None = None) -> bool:
    """Wait until the first of `aws` finishes (True) or `timeout_s` passes (False); cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, timeout=None if timeout_s is None else max(0.0, timeout_s),
                                     return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
