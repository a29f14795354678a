"""The lite network backend: py-libp2p (on trio) instead of hivemind's p2pd, for clients and the health
crawler on platforms the Go daemon has no build for (`pip install swarm-llm[lite]`).

  bridge.py  TrioThread: a trio loop on a thread of its own; asyncio streams over py-libp2p streams
  host.py    LiteHost (trio side): the py-libp2p host, dials, streams, hivemind's unary RPC, FIND_NODE
  dht.py     DHTReader: hivemind's DHT find RPC, its value format and checks, its beam search
  node.py    LiteNode (asyncio side): records (fetch_blocks / fetch_models), streams, info probes

hivemind and py-libp2p cannot share a process (both register libp2p's protobuf types): this package
never imports hivemind, and `backend()` tells which of the two a process should use. Importing this
package imports neither; its modules import trio and py-libp2p.
"""

from __future__ import annotations

import importlib.util

from swarm.errors import ConfigError

BACKENDS = ("auto", "hivemind", "lite")


def backend(name: str) -> str:
    """"hivemind" or "lite" for a transport option: "auto" is hivemind where it is installed, else lite.
    ConfigError when the one named (or neither) is installed, saying which extra to install."""
    if name not in BACKENDS:
        raise ConfigError(f"transport={name!r}: expected one of {', '.join(BACKENDS)}")
    has_hivemind = importlib.util.find_spec("hivemind") is not None
    has_lite = importlib.util.find_spec("libp2p") is not None and importlib.util.find_spec("trio") is not None
    if name == "auto":
        name = "hivemind" if has_hivemind else "lite"
    if name == "hivemind" and not has_hivemind:
        raise ConfigError("the hivemind transport needs hivemind: pip install 'swarm-llm[hivemind]' (or use "
                          "the lite transport: 'swarm-llm[lite]')")
    if name == "lite" and not has_lite:  # (with hivemind installed too, nothing on the lite path imports it)
        raise ConfigError("the lite transport needs py-libp2p and trio: pip install 'swarm-llm[lite]', in an "
                          "environment of its own if hivemind is there (they cannot share a process)")
    return name
