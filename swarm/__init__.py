"""Shared core of Swarm: vocabulary, DHT records, wire protocol, errors, the block runtime, identity.

Layout (one inference step, in files):
  client/model.py      embeds tokens, calls the remote chain, applies norm + head, HF generate does the rest
  client/session.py    one stream per span of the route; keeps every span's inputs
  client/routing.py    pure route planner over a DHT snapshot
  swarm/protocol.py    message schemas and tensor codec both sides agree on
  peer/server.py       handlers: parse, validate, delegate to the session's SpanRuntime
  swarm/runtime/       the model's own decoder layers for [start, end), with a per-session KV cache
"""

__version__ = "0.1.0"
