"""Timing probes for the decode benchmark: where one decode step's time goes, on both sides of each hop.

Nothing here changes what the product does: the probes wrap a few module-level names (the wire codec,
the client's `SpanStream.step`, the peer's `SpanModel.run_packed`) with functions that call the original and note
`time.monotonic()` around it. On Linux that clock is CLOCK_MONOTONIC, one clock for every process of the
machine, so a client's and a peer's timestamps can be subtracted from each other.

- `ClientProbe`: a context manager for the benchmark's own process; records, per decode step, the
  `forward` of the distributed model, `InferenceSession.step` (sync facade) and `_step` (on the client
  loop), and for every hop the `SpanStream.step` round trip with its serialization parts.
- `python benchmarks/probe.py peer ARGS...`: runs `swarm peer ARGS...` (the real CLI, in its own process)
  with peer-side probes that append one JSON line per served step to the file named by $SWARM_PROBE_FILE.

Both assume one inference session at a time per process (what the benchmark does): a step's record is
the one most recently opened, not looked up per stream.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import msgpack

now = time.monotonic  # CLOCK_MONOTONIC: comparable across processes on one machine


class _TimedMsgpack:
    """Stands in for the `msgpack` module inside swarm.protocol; notes how long (un)packing took."""

    def __init__(self, on_pack, on_unpack):
        self._on_pack, self._on_unpack = on_pack, on_unpack

    def packb(self, *args, **kwargs):
        start = now()
        out = msgpack.packb(*args, **kwargs)
        self._on_pack(now() - start)
        return out

    def unpackb(self, *args, **kwargs):
        start = now()
        out = msgpack.unpackb(*args, **kwargs)
        self._on_unpack(now() - start)
        return out

    def __getattr__(self, name: str) -> Any:  # UnpackException and the rest: the real module's
        return getattr(msgpack, name)


class _Patches:
    """Set attributes and put the originals back on exit."""

    def __init__(self):
        self._saved: list[tuple[object, str, object]] = []

    def set(self, owner, name: str, value) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def restore(self) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()


def _add(record: dict | None, key: str, seconds: float) -> None:
    if record is not None:
        record[key] = record.get(key, 0.0) + seconds


def _packed(record: dict | None, seconds: float) -> None:
    """A message was just serialized: what follows in write_message is the socket write, then drain."""
    if record is not None:
        _add(record, "msgpack_pack_s", seconds)
        record["t_packed"] = now()


# ---------------------------------------------------------------- client side


class ClientProbe:
    """Records the client's side of every step while active (`with ClientProbe() as probe:`).

    After exit: `forwards` (model.forward), `session_steps` (InferenceSession.step, caller's thread),
    `loop_steps` (InferenceSession._step, client loop), `hops` (SpanStream.step); each a list of dicts
    with monotonic `t0`/`t1` and, for hops, the span, the session position, codec times in seconds,
    `t_packed` (step message serialized, about to be written to the socket) and `t_read` (reply read
    and unpacked).
    """

    def __init__(self, cuda_sync: bool = False):
        self.cuda_sync = cuda_sync  # wait for the GPU at the end of forward, so its time is the GPU's too
        self.forwards: list[dict] = []
        self.session_steps: list[dict] = []
        self.loop_steps: list[dict] = []
        self.hops: list[dict] = []
        self._hop: dict | None = None
        self._patches = _Patches()

    def __enter__(self) -> ClientProbe:
        import client.model
        import client.session
        import client.stream
        import swarm.protocol

        s, st, p = client.session, client.stream, self._patches
        p.set(swarm.protocol, "msgpack", _TimedMsgpack(
            lambda dt: _packed(self._hop, dt), lambda dt: _add(self._hop, "msgpack_unpack_s", dt)
        ))
        p.set(st, "pack_tensor", self._timed(st.pack_tensor, "pack_tensor_s"))
        p.set(st, "unpack_tensor", self._timed(st.unpack_tensor, "unpack_tensor_s"))
        p.set(st, "read_message", self._read(st.read_message))
        p.set(st.SpanStream, "step", self._span_step(st.SpanStream.step))
        p.set(s.InferenceSession, "step", self._sync_span(s.InferenceSession.step, self.session_steps))
        p.set(s.InferenceSession, "_step", self._async_span(s.InferenceSession._step, self.loop_steps))
        model_cls = client.model.DistributedModelForCausalLM
        p.set(model_cls, "forward", self._sync_span(model_cls.forward, self.forwards, self.cuda_sync))
        return self

    def __exit__(self, *exc) -> None:
        self._patches.restore()

    def _timed(self, fn, key: str):
        def timed(*args, **kwargs):
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                _add(self._hop, key, now() - start)

        return timed

    def _read(self, fn):
        async def read_message(reader, max_bytes):
            message = await fn(reader, max_bytes)
            if self._hop is not None:
                self._hop["t_read"] = now()
            return message

        return read_message

    def _span_step(self, fn):
        probe = self

        async def step(stream, hidden, position_ids, valid, position, *args, **kwargs):
            probe._hop = {"span": str(stream.hop.span), "peer_id": stream.hop.peer_id, "position": position,
                          "new": hidden.shape[1], "t0": now()}
            try:
                return await fn(stream, hidden, position_ids, valid, position, *args, **kwargs)
            finally:
                probe._hop["t1"] = now()
                probe.hops.append(probe._hop)
                probe._hop = None

        return step

    @staticmethod
    def _sync_span(fn, records: list, cuda_sync: bool = False):
        def wrapper(*args, **kwargs):
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                if cuda_sync:
                    import torch

                    torch.cuda.synchronize()
                records.append({"t0": start, "t1": now()})

        return wrapper

    @staticmethod
    def _async_span(fn, records: list):
        async def wrapper(*args, **kwargs):
            start = now()
            try:
                return await fn(*args, **kwargs)
            finally:
                records.append({"t0": start, "t1": now()})

        return wrapper


# ---------------------------------------------------------------- peer side


class PeerProbe:
    """Peer-side probes: one JSON line per served step, written after its reply is sent.

    Fields (monotonic seconds): t_read (step message read and unpacked), unpack_s, parse_s (strict
    decoding), t_compute0/t_compute1 (SpanModel forward and copy to CPU, on the compute thread),
    pack_tensor_s, msgpack_pack_s, t_write0 (write_message of the result called), t_packed (result
    serialized, about to be written to the socket), t_write1 (written and drained).
    """

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)  # line-buffered: a line per step survives a kill
        self._step: dict | None = None
        self._last_unpack_s = 0.0
        self._patches = _Patches()

    def install(self) -> None:
        import peer.server
        import swarm.protocol
        import swarm.runtime.span as span

        srv, p = peer.server, self._patches
        p.set(swarm.protocol, "msgpack", _TimedMsgpack(lambda dt: _packed(self._step, dt), self._note_unpack))
        p.set(srv, "read_message", self._read(srv.read_message))
        p.set(srv, "parse_step", self._parse(srv.parse_step))
        p.set(srv, "pack_tensor", self._pack(srv.pack_tensor))
        p.set(srv, "write_message", self._write(srv.write_message))
        p.set(span.SpanModel, "run_packed", self._run(span.SpanModel.run_packed))

    def _note_unpack(self, seconds: float) -> None:
        self._last_unpack_s = seconds

    def _read(self, fn):
        async def read_message(reader, max_bytes):
            message = await fn(reader, max_bytes)
            # no await between the unpack inside `fn` and here, so _last_unpack_s is this message's
            if isinstance(message, dict) and message.get("type") == "step":
                self._step = {"t_read": now(), "unpack_s": self._last_unpack_s}
            return message

        return read_message

    def _parse(self, fn):
        def parse_step(message, **kwargs):
            start = now()
            request = fn(message, **kwargs)
            if self._step is not None:
                self._step.update(parse_s=now() - start, position=request.position,
                                  new=request.hidden.shape[1])
            return request

        return parse_step

    def _pack(self, fn):
        def pack_tensor(tensor):
            start = now()
            try:
                return fn(tensor)
            finally:
                _add(self._step, "pack_tensor_s", now() - start)

        return pack_tensor

    def _run(self, fn):
        """SpanModel.run_packed, on the scheduler's thread: the batched forward (one session here) and, on CUDA,
        a synchronize so that the GPU's time lands in compute."""
        probe = self

        def run(model, segments, *args, **kwargs):
            record = probe._step
            start = now()
            out = fn(model, segments, *args, **kwargs)
            if model.device.type == "cuda":
                import torch

                torch.cuda.synchronize(model.device)
            if record is not None:
                record.update(t_compute0=start, t_compute1=now(), span=str(model.span))
            return out

        return run

    def _write(self, fn):
        async def write_message(writer, message):
            record = self._step if message.get("type") == "result" else None
            start = now()
            await fn(writer, message)
            if record is not None and "t_compute1" in record:
                record.update(t_write0=start, t_write1=now())
                self._file.write(json.dumps(record) + "\n")
                self._step = None

        return write_message


def read_peer_records(paths, t_start: float, t_end: float) -> list[dict]:
    """Every peer step record in the files whose reply was written within [t_start, t_end]."""
    out = []
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if t_start <= record["t_write1"] <= t_end:
                    out.append(record)
    return out


def _peer_main(argv: list[str]) -> int:
    path = os.environ.get("SWARM_PROBE_FILE")
    if path:
        PeerProbe(path).install()
    from swarm.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_peer_main(sys.argv[1:]))
