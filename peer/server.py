"""PeerServer: the imperative shell of a volunteer server.

Owns one event loop's worth of tasks: p2pd + DHT node (swarm.net), the inference and info handlers,
the announcer heartbeat and the session expiry sweep. Compute runs on one worker thread so the event
loop keeps serving the network while a step runs. Handlers are thin: parse (peer.requests), delegate
(SessionManager, SpanModel), serialize (swarm.protocol). States: joining -> online -> (draining ->)
offline; peer.drain decides when to drain and when to leave, and tells this server by `begin_drain`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import swarm
from peer.announcer import Announcer
from peer.config import PeerConfig
from peer.drain import DrainingRefusal
from peer.forward import ForwardLink, ForwardStats, PushChannels
from peer.memory import blocks_to_take
from peer.network import NetworkStats, neighbour_records, run_probes
from peer.placement import SwarmSnapshot
from peer.rebalance import PeerPosition, Rebalancer, place_on_join, read_snapshot, typical_tokens_s
from peer.requests import message_type, parse_open, parse_rollback, parse_step
from peer.scheduler import Scheduler
from peer.sessions import Session, SessionManager
from peer.stack import build_stack, plan_memory
from peer.throughput import ThroughputCache, measure_span, throughput_key
from swarm import records
from swarm.direct import DirectDialer, DirectServer, direct_addrs
from swarm.errors import ConfigError, PeerFull, PeerRefused, ProtocolError
from swarm.identity import Identity
from swarm.net import NodeSettings, start_dht, start_p2p, stop_node, visible_maddrs
from swarm.protocol import (
    ERROR_DRAINING,
    ERROR_FULL,
    ERROR_PROTOCOL,
    ERROR_REFUSED,
    FORWARD_HANDLER,
    INFERENCE_HANDLER,
    INFO_HANDLER,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    WIRE_DTYPES,
    check_minor,
    error_message,
    pack_tensor,
    push_token,
    read_message,
    require,
    write_message,
)
from swarm.runtime import CacheFull, KVBudget, SpanModel, load_span
from swarm.runtime.loading import config_hash, dtype_name, load_config, parse_dtype
from swarm.runtime.quant import weight_bits
from swarm.spans import Span, check_model_id, default_model_id

logger = logging.getLogger(__name__)

FORWARD_BACKLOG = 8  # forwarded steps a session holds before it drops more (a confused or hostile pusher)
CLIENT_READ_AHEAD = 2  # client messages read before the steps ahead of them ran (memory is bounded)
SNAPSHOT_TIMEOUT_S = 10.0  # reading the model's block records for placement, announcing a move
FATAL_LINGER_S = 2.0  # after a fatal error, how long a client may take to read it and close


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


class PeerServer:
    def __init__(self, config: PeerConfig, say=None):
        self.config = config
        self.say = say or (lambda line: logger.info("%s", line))  # the CLI prints these lines
        self.model_id = check_model_id(config.model_id) if config.model_id else default_model_id(config.model_path)
        default_dtype = "bfloat16" if config.device.startswith("cuda") else "float32"
        self.dtype = parse_dtype(config.dtype or default_dtype)
        self.model_config = load_config(config.model_path, config.attn_implementation)
        self.span = config.span
        self.state = "joining"
        self.span_model: SpanModel | None = None
        self.sessions: SessionManager | None = None
        self.budget: KVBudget | None = None
        self.scheduler: Scheduler | None = None
        self.device_baseline_bytes = 0  # device memory held before any session (weights, buffers)
        self.p2p = None
        self.dht = None
        self.announcer: Announcer | None = None
        self.identity: Identity | None = None
        self.compute_tokens_s: float | None = None  # per block (peer.throughput); None until known
        self.throughput_cache = ThroughputCache(config.throughput_cache)
        self.network = NetworkStats()  # round trips and bandwidth to neighbours (peer.network), announced
        self.next_span: Span | None = None  # while draining to move: where to (announced; peer.rebalance)
        self.leaving = False  # told to leave (begin_drain) or failed to move: no move goes on
        self.fatal = asyncio.Event()  # set when the peer cannot go on serving (a move failed)
        self.rebalancer: Rebalancer | None = None
        self._rng = random.Random()
        self.drain_deadline: float | None = None  # unix time this peer leaves; set once draining starts
        self.forward_stats = ForwardStats()
        self.steps_served = 0  # steps run and answered
        self.serve_s = 0.0  # summed over those: from submitting the step to its result written
        self.answer_s = 0.0  # the part of it after the output came back: pushing it on and replying
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._tasks: list[asyncio.Task] = []
        self.addrs: list[str] = []
        self.direct: DirectServer | None = None  # direct TLS streams beside p2pd (swarm.direct)
        self.direct_addrs: list[str] = []
        self.dialer: DirectDialer | None = None
        self.channels: PushChannels | None = None  # the streams this peer pushes steps on (peer.forward)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Join the network, choose the span if none was given (announced `joining` before it loads; see
        peer.rebalance), load it, serve, announce online. Returns when ready."""
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        if self.span is not None:  # a given span that cannot fit fails before anything starts
            plan_memory(self.config, self.span, self.dtype, self.model_id, self.say)
        await self._join_network()
        chosen = self.span is None
        if chosen:
            self.span = await self._choose_span()
        await self._load(self.span)
        await self._serve()
        if not chosen:
            await self.announcer.announce("joining")
        self.state = "online"
        await self.announcer.announce("online")
        self._tasks = [
            asyncio.create_task(self.announcer.run(), name="announcer"),
            asyncio.create_task(self._expire_sessions(), name="expiry"),
        ]
        if self.config.network_probe_period_s > 0:
            self._tasks.append(asyncio.create_task(run_probes(
                self.network, self.config.network_probe_period_s, self._neighbour_records, self.p2p, self.peer_id,
                self.config.forward_timeout_s * 2, self._rng), name="network-probe"))
        if chosen and self.config.rebalance_period_s > 0:
            self.rebalancer = Rebalancer(
                period_s=self.config.rebalance_period_s, margin=self.config.rebalance_margin,
                delay_s=self.config.rebalance_delay_s, read=self._read_snapshot, position=self._position,
                move=self.move_to, rng=self._rng, on_fatal=self._on_fatal, say=self.say,
            )
            self._tasks.append(asyncio.create_task(self.rebalancer.run(), name="rebalance"))

    async def _load(self, span: Span) -> None:
        """Load `span` and build what serves it (peer.stack), then recall or measure the compute throughput.
        The new objects replace the old ones only once all are built."""
        planned = plan_memory(self.config, span, self.dtype, self.model_id, self.say)
        loaded = await asyncio.get_running_loop().run_in_executor(
            self._compute,
            lambda: load_span(
                self.config.model_path, span, dtype=self.dtype, device=self.config.device,
                attn_implementation=self.config.attn_implementation, progress=self.config.progress,
                quant=self.config.quant, offload_blocks=self.config.offload_blocks,
            ),
        )
        span_model = SpanModel(loaded, cuda_graphs=self.config.cuda_graphs, kv_dtype=self.config.kv_dtype,
                               kv_offload=self.config.kv_offload)
        stack = build_stack(self.config, span_model, self.model_config,
                            planned, batch_wait_s(self.config), self.say)
        self.span_model, self.budget, self.scheduler, self.sessions = (
            stack.span_model, stack.budget, stack.scheduler, stack.sessions)
        self.compute_tokens_s = await self._throughput(stack.span_model)
        if stack.span_model.device.type == "cuda":
            self.device_baseline_bytes = torch.cuda.memory_allocated(stack.span_model.device)
            torch.cuda.reset_peak_memory_stats(stack.span_model.device)
        stack.scheduler.start()

    async def _throughput(self, span_model: SpanModel | None) -> float | None:
        """Per-block tokens/s from the cache (peer.throughput), else measured on `span_model` and cached;
        None when not cached and nothing is loaded to measure."""
        key = throughput_key(torch.device(self.config.device), self.precision_key, config_hash(self.model_config))
        cached = None if self.config.remeasure_throughput else self.throughput_cache.get(key)
        if cached is not None or span_model is None:
            return cached
        measured = await asyncio.get_running_loop().run_in_executor(
            self._compute, measure_span, span_model, self.model_config.hidden_size)
        self.throughput_cache.put(key, measured)
        self.say(f"measured {measured:.0f} tokens/s per block on {key.device} (cached in {self.throughput_cache.path})")
        return measured

    async def _join_network(self) -> None:
        """Start p2pd and the DHT node (no handlers yet: nothing is served before a span is loaded)."""
        self.identity = Identity.load_or_create(self.config.identity_path)
        settings = NodeSettings(
            initial_peers=self.config.initial_peers, host=self.config.host, port=self.config.port,
            announce_maddrs=self.config.announce_maddrs, identity_path=self.identity.p2pd_identity_path,
            swarm_key=self.config.swarm_key, startup_timeout_s=self.config.join_timeout_s,
            # hivemind checks that no running node holds the identity by starting a second daemon (15 s to
            # start at most: on a loaded machine that alone failed a peer's start); an identity made for this
            # process cannot be held elsewhere
            check_identity_free=not self.identity.is_ephemeral,
        )
        self.announcer = Announcer(self)
        try:
            self.p2p = await start_p2p(settings)
        finally:
            self.identity.close()  # an ephemeral key file is read once by p2pd at start
        self.dht = await start_dht(self.p2p, settings, records.make_record_validator(self.identity))
        self.addrs = await visible_maddrs(self.p2p)
        self.dialer = DirectDialer(self.identity.private_key, self.config.swarm_key)
        self.channels = PushChannels(self.p2p, self.dialer, self.config.forward_timeout_s, self._record_of,
                                     self.forward_stats)

    async def _serve(self) -> None:
        """Register the handlers on p2pd and start the direct TLS server beside it."""
        await self.p2p.add_binary_stream_handler(INFERENCE_HANDLER, self._handle_inference)
        await self.p2p.add_binary_stream_handler(INFO_HANDLER, self._handle_info)
        await self.p2p.add_binary_stream_handler(FORWARD_HANDLER, self._handle_forward)
        if self.config.direct_port is not None:
            self.direct = DirectServer(self.identity.private_key, self.peer_id, {
                INFERENCE_HANDLER: self._handle_inference, INFO_HANDLER: self._handle_info,
                FORWARD_HANDLER: self._handle_forward,
            }, self.config.swarm_key)
            try:
                port = await self.direct.start(self.config.host, self.config.direct_port)
            except OSError as e:
                raise ConfigError(f"direct port {self.config.direct_port} on {self.config.host}: {e.strerror}; "
                                  "pick another --direct-port (0 for any) or pass --no-direct") from e
            self.direct_addrs = direct_addrs(self.config.announce_maddrs or self.addrs, port)

    # ------------------------------------------------------------ block selection and moving (peer.rebalance)

    async def _read_snapshot(self) -> SwarmSnapshot:
        return await read_snapshot(self.dht, self.model_id, self.model_config.num_hidden_layers, SNAPSHOT_TIMEOUT_S)

    async def _choose_span(self) -> Span:
        """No --blocks: take as many blocks as memory allows where the swarm is weakest (peer.placement)."""
        length, why = blocks_to_take(self.config, self.model_config, self.dtype)
        snapshot = await self._read_snapshot()
        # announced while joining: the cached figure, else a typical peer's until this one is measured
        self.compute_tokens_s = await self._throughput(None) or typical_tokens_s(snapshot)

        async def announce_joining(span: Span) -> None:
            self.span = span
            await self.announcer.announce("joining")

        span = await place_on_join(snapshot, self._read_snapshot, announce_joining, self.peer_id, length,
                                   self.config.join_jitter_s, self._rng)
        self.say(f"chose blocks {span}: {why}, where the swarm is weakest")
        return span

    def _position(self) -> PeerPosition:
        movable = self.state == "online" and not self.leaving and self.compute_tokens_s is not None
        return PeerPosition(self.peer_id, self.span, self.compute_tokens_s / self.span.length, movable)

    async def move_to(self, span: Span) -> None:
        """Rebalancing: drain exactly as on SIGTERM, but announced as moving to `span` (others count this peer
        there), then load `span` and announce it (joining -> online). Sessions still open after
        drain_grace_s end; their clients rebuild them elsewhere. A drain ordered meanwhile (begin_drain)
        stops the move: the peer stays draining and leaves."""
        deadline = time.time() + self.config.drain_grace_s
        self.state, self.drain_deadline, self.next_span = "draining", deadline, span
        self.say(f"moving: draining blocks {self.span} ({self.sessions.active} sessions open), then loading {span}")
        with contextlib.suppress(Exception):  # the heartbeat announces it again
            await asyncio.wait_for(self.announcer.announce("draining"), SNAPSHOT_TIMEOUT_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sessions.wait_empty(), max(0.0, deadline - time.time()))
        if self.leaving:
            return
        for session in self.sessions.expired(now_s=math.inf):  # every session still open
            session.end(ConnectionAbortedError("this peer moved to other blocks"))
        old_scheduler = self.scheduler
        self.state, self.drain_deadline, self.next_span, self.span = "joining", None, None, span
        self.span_model = None  # the old weights go before the new ones load
        await asyncio.to_thread(old_scheduler.stop)
        await self.announcer.announce("joining")
        await self._load(span)
        if self.leaving:
            return
        self.state = "online"
        await self.announcer.announce("online")
        self.say(f"online: serving blocks {span} of {self.model_id} after moving")

    def _on_fatal(self, reason: str) -> None:
        self.say(f"leaving ({reason})")
        self.leaving = True
        self.fatal.set()

    async def _neighbour_records(self) -> dict:
        return await neighbour_records(self.dht, self.model_id, self.model_config.num_hidden_layers, self.span,
                                       SNAPSHOT_TIMEOUT_S)

    async def shutdown(self) -> None:
        """Announce offline, stop tasks, stop the network. Safe to call once after start()."""
        self.state = "offline"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.announcer is not None and self.dht is not None:
            try:
                await asyncio.wait_for(self.announcer.announce("offline"), timeout=5)
            except (TimeoutError, OSError) as e:
                logger.warning("could not announce offline: %s", e)
        if self.channels is not None:
            self.channels.close()
        if self.direct is not None:
            await self.direct.close()
        await stop_node(self.dht, self.p2p)
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        await asyncio.to_thread(self._compute.shutdown, wait=True, cancel_futures=True)

    def begin_drain(self, deadline: float) -> None:
        """From now on refuse new sessions (error code ERROR_DRAINING) and tell `deadline` (unix time) in
        `info` and on every result; open sessions keep running. The caller (peer.drain) announces it. The
        peer is leaving: a move in progress stops."""
        self.state = "draining"
        self.drain_deadline = deadline
        self.next_span = None
        self.leaving = True

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    def info(self) -> dict:
        return {
            "type": "info",
            "version": swarm.__version__,
            "protocol": [PROTOCOL_MAJOR, PROTOCOL_MINOR],
            "handlers": [INFERENCE_HANDLER, INFO_HANDLER, FORWARD_HANDLER],
            "model_id": self.model_id,
            "span": [self.span.start, self.span.end],
            "state": self.state,
            **self._drain_fields(),
            "dtype": dtype_name(self.dtype),
            "precision": self.precision,
            "hidden_size": self.model_config.hidden_size,
            "limits": self.config.limits,
            "cache_tokens_left": self.sessions.cache_tokens_left if self.sessions else 0,
            "active_sessions": self.sessions.active if self.sessions else 0,
            **self._load_fields(),
        }

    @property
    def precision(self) -> dict:
        """What this peer serves at (announced in the record, shown on the health page)."""
        c = self.config
        return {"quant": c.quant, "weight_bits": weight_bits(c.quant, self.dtype), "kv_dtype": c.kv_dtype,
                "offload_blocks": c.offload_blocks, "kv_offload": c.kv_offload}

    @property
    def precision_key(self) -> str:
        """The dtype and whatever else changes the compute throughput (the throughput cache's key)."""
        c = self.config
        extras = [c.quant] * (c.quant != "none") + ["kv_fp8"] * (c.kv_dtype == "fp8")
        extras += [f"offload{c.offload_blocks}"] * bool(c.offload_blocks) + ["kv_host"] * c.kv_offload
        return "+".join([dtype_name(self.dtype), *extras])

    def _load_fields(self) -> dict:
        """KV memory, device memory and batching figures (benchmarks and the health page read them)."""
        if self.sessions is None:
            return {}
        fields = {
            "kv_cache": {
                "budget_bytes": self.budget.total_bytes, "used_bytes": self.budget.used_bytes,
                "tokens": self.sessions.cached_tokens, "page_tokens": self.budget.page_tokens,
                "bytes_per_token_theory": self.sessions.span_token_bytes,
            },
            "scheduler": self.scheduler.stats.as_dict(),
            "steps": {"served": self.steps_served, "serve_s": round(self.serve_s, 4),
                      "answer_s": round(self.answer_s, 4)},
            "forward": self.forward_stats.as_dict(),
            "throughput": {"compute_tokens_s": self.compute_tokens_s, "network": self.network.as_dict(),
                           "moves": self.rebalancer.moves if self.rebalancer else 0},
        }
        if self.direct is not None:
            fields["direct"] = {"addrs": self.direct_addrs, "accepted": self.direct.accepted,
                                "refused": self.direct.refused}
        graphs = self.span_model.graphs
        if graphs is not None:
            fields["cuda_graphs"] = {"recorded": graphs.recorded, "record_ms": round(graphs.record_s * 1000, 1),
                                     "replays": graphs.replays, "disabled": graphs.disabled}
        if self.span_model.device.type == "cuda":
            device = self.span_model.device
            fields["device_memory"] = {
                "baseline_bytes": self.device_baseline_bytes,
                "allocated_bytes": torch.cuda.memory_allocated(device),
                "peak_bytes": torch.cuda.max_memory_allocated(device),
            }
        return fields

    def _drain_fields(self) -> dict:
        """`drain_deadline` (unix time), present in `info` and results exactly while the peer drains."""
        return {"drain_deadline": self.drain_deadline} if self.state == "draining" else {}

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.config.session_idle_timeout_s / 2))
            for session in self.sessions.expired():
                logger.info("session %s of %s expired after idling", session.session_id, session.client_id)
                self.sessions.close(session)
                session.end(TimeoutError(f"session idle for over {self.config.session_idle_timeout_s:g} s"))

    # ------------------------------------------------------------ handlers

    async def _handle_info(self, stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await asyncio.wait_for(read_message(reader, 64 * 1024), self.config.open_timeout_s)
                if (kind := message_type(request)) != "info":
                    raise ProtocolError(f"field 'type': an info stream takes 'info', not {kind!r}")
            except ProtocolError as e:  # answered like any bad message, so the client learns why
                await self._send_fatal(reader, writer, ERROR_PROTOCOL, str(e))
                return
            await write_message(writer, self.info())
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError) as e:
            logger.debug("info request failed: %s", e)
        except Exception:  # a bug of ours: said loudly (the stream closes unanswered)
            logger.exception("answering info failed")
        finally:
            writer.close()

    async def _handle_inference(self, stream_info, reader, writer) -> None:
        client_id = stream_info.peer_id.to_base58()
        session: Session | None = None
        try:
            session = await self._open_session(client_id, reader, writer)
            if session is not None:
                await self._serve_steps(session, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            logger.debug("client %s closed its stream", client_id)
        except TimeoutError:
            logger.info("client %s idle on its stream for too long; closing the session", client_id)
        except Exception:
            logger.exception("inference stream of %s failed", client_id)
        finally:
            self.sessions.close(session)
            writer.close()

    async def _open_session(self, client_id: str, reader, writer) -> Session | None:
        try:
            # an open is small; it is held to the announced message limit like every other message
            limit = min(64 * 1024, self.config.max_message_bytes)
            message = await asyncio.wait_for(read_message(reader, limit), timeout=self.config.open_timeout_s)
            if message_type(message) != "open":
                raise ProtocolError("the first message of an inference stream must be 'open'")
            if self.state == "draining":
                raise DrainingRefusal(self.drain_deadline, time.time())
            if self.state != "online":
                raise PeerRefused(f"peer is {self.state} and takes no new sessions")
            request = parse_open(message, self.model_id, self.span, self.config.max_session_length_tokens)
            session = await self.sessions.open(client_id, request.blocks, request.batch_size, request.max_length,
                                               request.wait_s)
            if self.state != "online":  # a drain began while the session waited for memory
                self.sessions.close(session)
                if self.state == "draining":
                    raise DrainingRefusal(self.drain_deadline, time.time())
                raise PeerRefused(f"peer is {self.state} and takes no new sessions")
        except (ProtocolError, PeerRefused) as e:
            await self._send_fatal(reader, writer, _error_code(e), str(e))
            return None
        opened = {
            "type": "opened", "session": session.session_id, "dtype": dtype_name(self.dtype),
            "push_key": session.push_key, "minor": PROTOCOL_MINOR,
        }
        try:
            await write_message(writer, opened)
        except BaseException:  # the client left before the reply: the caller never sees this session
            self.sessions.close(session)
            raise
        return session

    @staticmethod
    async def _send_fatal(reader, writer, code: str, text: str) -> None:
        """Send a fatal error, then discard input until the client closes (at most FATAL_LINGER_S); the
        caller closes the stream after. Closing (or half-closing) while the client still sends, e.g. the rest
        of an oversized message, makes p2pd reset the stream, and the reset overtakes the error reply."""
        await write_message(writer, error_message(code, text, fatal=True))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_discard(reader), timeout=FATAL_LINGER_S)

    async def _read_client(self, session: Session, reader, ahead: asyncio.Semaphore) -> None:
        """Move the client's messages into the session's inbox (beside forwarded steps), reading at most
        CLIENT_READ_AHEAD messages ahead of the steps run; a read error (framing broken, stream closed)
        goes in too, and ends the reading."""
        try:
            while True:
                await ahead.acquire()
                message = await read_message(reader, self.config.max_message_bytes)
                session.inbox.put_nowait(("client", message, False))
        except ProtocolError as e:  # answered (fatally) once the steps ahead of it ran
            session.inbox.put_nowait(("client", e, False))
        except Exception as e:  # the client is gone: stop at once, even mid-step (the step is dropped)
            session.end(e)

    async def _serve_steps(self, session: Session, reader, writer) -> None:
        ahead = asyncio.Semaphore(CLIENT_READ_AHEAD)
        reading = asyncio.create_task(self._read_client(session, reader, ahead))
        link = ForwardLink(self.channels, next_block=session.blocks[1])
        try:
            while True:
                source, message, cohort_end = await session.inbox.get()  # the expiry sweep ends an idle wait
                if isinstance(message, ProtocolError):  # framing broken or oversized: the stream can't be trusted
                    await self._send_fatal(reader, writer, ERROR_PROTOCOL, str(message))
                    return
                if isinstance(message, BaseException):
                    raise message
                if source == "client":
                    ahead.release()
                else:
                    session.forwards_queued -= 1
                session.last_used_s = time.monotonic()
                if not await self._serve_step(session, source, message, reader, writer, link, cohort_end):
                    return
        finally:
            reading.cancel()

    async def _serve_step(self, session: Session, source: str, message: dict, reader, writer, link: ForwardLink,
                          cohort_end: bool = False) -> bool:
        """Run one message of the inbox; False when the session ends (the client said goodbye, or the device
        had no memory for the step). `cohort_end`: the last step of a pushed batch (the scheduler need not
        wait for more steps)."""
        try:
            kind = message_type(message)
            if kind == "close" and source == "client":
                return False
            if kind == "rollback" and source == "client":
                session.rollback(parse_rollback(message, position=session.position))
                await write_message(writer, {"type": "rolled_back", "position": session.position,
                                             **self._drain_fields()})
                return True
            if kind != "step":
                raise ProtocolError(f"unknown message type {kind!r} (expected 'step', 'rollback' or 'close')")
            if source == "forward" and message.get("position") != session.position:
                self.forward_stats.duplicates += 1  # the client's own copy ran first (or the pusher is confused)
                return True
            if source == "client" and require(message.get("fallback", False), bool, "fallback") and require(
                message.get("position"), int, "position"
            ) == session.forwarded_at:
                self.forward_stats.duplicates += 1  # the forwarded copy ran already, and its result went out
                return True
            request = parse_step(
                message, batch_size=session.batch_size, hidden_size=self.model_config.hidden_size,
                dtype_name=dtype_name(self.dtype), position=session.position,
                max_length=session.max_length, max_tokens_per_step=self.config.max_tokens_per_step,
            )
        except ProtocolError as e:
            if source == "forward":  # the client did not send it: it times out and sends the step itself
                self.forward_stats.dropped += 1
                logger.info("dropped a bad forwarded step for session %s: %s", session.session_id, e)
            else:
                await write_message(writer, error_message(ERROR_PROTOCOL, str(e)))
            return True
        begun = time.monotonic()
        at = session.position
        try:
            out = await self._run_step(session, request, cohort_end)
        except CacheFull as e:  # pages the device could not give within the bound: the client reroutes
            await self._send_fatal(reader, writer, ERROR_REFUSED, f"out of KV memory on this peer's device ({e}); "
                                   "the session was closed, go on on another peer")
            return False
        computed = time.monotonic()
        hidden = pack_tensor(out)
        if source == "forward":
            session.forwarded_at = at
            self.forward_stats.received += 1
        pushed = False
        if request.push:
            target = request.push[0]
            pushed_hidden = hidden if target.dtype == hidden["dtype"] else pack_tensor(out.to(WIRE_DTYPES[target.dtype]))
            step = {"position": at, "hidden": pushed_hidden,  # every hop holds the same positions
                    "position_ids": message["position_ids"], "valid": message["valid"]}
            pushed = await link.send(step, target, request.push[1:])
            if pushed:
                self.forward_stats.pushed += 1
            else:
                self.forward_stats.push_failed += 1
        result = {"type": "result", "step": request.step_id, "position": session.position, "hidden": hidden}
        if request.push:
            result["pushed"] = pushed
        # in-band drain notice: the client learns it on this step, whatever the DHT says
        await write_message(writer, {**result, **self._drain_fields()})
        done = time.monotonic()
        self.steps_served += 1
        self.serve_s += done - begun
        self.answer_s += done - computed
        return True

    async def _run_step(self, session: Session, request, cohort_end: bool):
        """The step's output from the scheduler; raises the session's end reason (its client left, or it
        expired) as soon as it comes, even while the step waits or runs."""
        session.stepping = self.scheduler.submit(session.cache, request.hidden, request.position_ids,
                                                 request.valid, alone=self.sessions.active == 1,
                                                 cohort_end=cohort_end)
        try:
            return await session.stepping
        except asyncio.CancelledError:
            if session.ended is not None and not asyncio.current_task().cancelling():
                raise session.ended from None
            raise
        finally:
            session.stepping = None

    async def _record_of(self, peer_id: str, next_block: int) -> records.BlockRecord | None:
        """Peer `peer_id`'s own record of `next_block` (None if it has none): where it can be dialed."""
        # hivemind's traversal, not the quorum read: with the quorum read the pushes of tests/test_pipeline
        # came late and the clients' own copies ran first (duplicates); not understood yet
        found = await records.fetch_blocks(self.dht, self.model_id, self.model_config.num_hidden_layers,
                                           blocks=range(next_block, next_block + 1),
                                           timeout_s=self.config.forward_timeout_s, quorum=False)
        return found.get(next_block, {}).get(peer_id)

    async def _handle_forward(self, stream_info, reader, writer) -> None:
        """Steps pushed by the previous peer of a route, alone or batched ("steps"): each names a session
        here and shows a push token made by that session's client for this pusher (the stream's
        authenticated peer id) and position. A malformed message or step ends the stream."""
        pusher = stream_info.peer_id.to_base58()
        try:
            while True:
                async with asyncio.timeout(self.config.session_idle_timeout_s):
                    message = await read_message(reader, self.config.max_message_bytes)
                batched = message.get("type") == "steps"
                try:
                    if batched:
                        check_minor(message)  # the batch's own version; each step in it carries one too
                    steps = require(message.get("steps"), list, "steps") if batched else [message]
                    claims = [_forward_claim(step) for step in steps]
                except ProtocolError as e:
                    logger.info("bad forwarded step from %s: %s", pusher, e)
                    return
                taken = [(session, step) for step, claim in zip(steps, claims, strict=True)
                         if (session := self._accept_forward(*claim, pusher)) is not None]
                for i, (session, step) in enumerate(taken):
                    # the last step of a batch tells the scheduler that this cohort is all here
                    session.inbox.put_nowait(("forward", step, batched and i == len(taken) - 1))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ProtocolError) as e:
            logger.debug("forward stream from %s ended: %r", pusher, e)
        finally:
            writer.close()

    def _accept_forward(self, session_id: int, token: str, position: int, pusher: str) -> Session | None:
        """The session a forwarded step goes to (counted in its backlog), or None: no such session, a token
        not made for this pusher and position, or a session whose backlog of forwarded steps is full (a
        confused or hostile pusher)."""
        session = self.sessions.get(session_id)
        if session is None or not hmac.compare_digest(
            token.encode(), push_token(session.push_key, pusher, position).encode()
        ):
            self.forward_stats.rejected += 1
            return None
        if session.forwards_queued >= FORWARD_BACKLOG:
            self.forward_stats.overflowed += 1
            return None
        session.forwards_queued += 1
        return session


def _forward_claim(step) -> tuple[int, str, int]:
    """What a forwarded step claims (session, token, position), checked for type only; the step itself is
    decoded like any other when its session runs it."""
    step = require(step, dict, "steps[]")
    return (require(step.get("session"), int, "session"), require(step.get("token"), str, "token"),
            require(step.get("position"), int, "position"))


def batch_wait_s(config: PeerConfig) -> float:
    if config.batch_wait_ms is not None:
        return config.batch_wait_ms / 1000
    return 0.04 if config.device.startswith("cuda") else 0.0


def _error_code(e: ProtocolError | PeerRefused) -> str:
    if isinstance(e, DrainingRefusal):
        return ERROR_DRAINING
    if isinstance(e, PeerFull):
        return ERROR_FULL
    return ERROR_REFUSED if isinstance(e, PeerRefused) else ERROR_PROTOCOL
