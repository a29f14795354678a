"""The scale harness's network (benchmarks/scale): hosts in namespaces, every byte through the delaying
relay. A client-mode node that knows a peer only by its id (as a DHT answer names it) must reach it: p2pd
looks the address up in its own libp2p DHT. On 198.18.0.0/15, the range the harness first used, libp2p
dropped every address as unroutable and such calls failed with "routing: not found", which is what left
the harness's readers with a part of the swarm (benchmarks/README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from benchmarks.scale.links import make_links
from benchmarks.scale.procs import python
from benchmarks.scale.run import Harness


def _can_make_namespaces() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("bridge")):
        return False
    probe = f"swscale-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _can_make_namespaces(), reason="needs root, iproute2 and network namespaces (Linux)"),
]

PORT = 31000
HELPER = os.path.join(os.path.dirname(__file__), "scale_dial.py")


def test_a_client_reaches_a_peer_it_knows_by_id_only_through_the_relay(tmp_path):
    tag = f"t{os.getpid()}"
    harness = Harness(3, {0: "bootstrap", 1: "peer", 2: "client"}, make_links(3, seed=0), tag, str(tmp_path))
    try:
        harness.up([0, 1], {PORT: "p2p"})
        boot, peer, client = harness.hosts
        first = harness.start("boot", boot.netns, python(HELPER, "listen", boot.real_addr, boot.relay_addr,
                                                         str(PORT)))
        boot_maddr = first.wait_line("id ", 60)[1].split()[2]
        second = harness.start("peer", peer.netns, python(HELPER, "listen", peer.real_addr, peer.relay_addr,
                                                          str(PORT), boot_maddr))
        peer_id = second.wait_line("id ", 60)[1].split()[1]
        dialer = harness.start("client", client.netns, python(HELPER, "dial", boot_maddr, peer_id))
        line = dialer.wait_for(lambda: next((text for _, text in dialer.lines
                                               if text.startswith(("answered", "failed"))), None), 90, "an answer")
        assert line.startswith("answered"), "\n".join(text for _, text in dialer.lines)
    finally:
        done = harness.close()
    assert done["left"] == []  # cleanup's own check of what is left with this tag
