"""peer.throughput (the cached compute figure) and peer.network (round trip and bandwidth figures): the cache
file in a temporary folder, a real measurement on a tiny model's span, and the network statistics."""

from __future__ import annotations

import json

import pytest
import torch

from peer.network import NetworkStats, bandwidth_mbps
from peer.throughput import ThroughputCache, ThroughputKey, default_cache_path, measure_span, throughput_key
from swarm.runtime import SpanModel, load_span
from swarm.spans import Span

KEY = ThroughputKey(device="cpu:Test CPU:x86_64", dtype="float32", config_hash="ab" * 16, threads=1)


def test_the_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_path() == tmp_path / "a" / "throughput.json"
    monkeypatch.delenv("SWARM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "swarm" / "throughput.json"
    assert ThroughputCache(tmp_path / "given.json").path == tmp_path / "given.json"


def test_a_figure_is_cached_per_key(tmp_path):
    cache = ThroughputCache(tmp_path / "sub" / "throughput.json")
    assert cache.get(KEY) is None
    cache.put(KEY, 1234.5)
    assert ThroughputCache(cache.path).get(KEY) == 1234.5  # a new process reads it back
    for other in (
        ThroughputKey("cuda:NVIDIA H100", "float32", "ab" * 16, 0),
        ThroughputKey(KEY.device, "bfloat16", "ab" * 16, 1),
        ThroughputKey(KEY.device, "float32", "cd" * 16, 1),
        ThroughputKey(KEY.device, "float32", "ab" * 16, 2),
        ThroughputKey(KEY.device, "float32", "ab" * 16, 1, method="other-method"),
    ):
        assert cache.get(other) is None, other
    cache.put(ThroughputKey(KEY.device, "bfloat16", "ab" * 16, 1), 99.0)
    assert cache.get(KEY) == 1234.5  # entries of other keys survive a write
    assert json.loads(cache.path.read_text())["version"] == 1


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"entries": 5}',
        '{"entries": {"%s": {"tokens_s": "fast"}}}',
        '{"entries": {"%s": {"tokens_s": -1}}}',
        '{"entries": {"%s": {"tokens_s": NaN}}}',
    ],
)
def test_a_broken_cache_file_is_an_empty_cache_and_is_rewritten(tmp_path, content):
    path = tmp_path / "throughput.json"
    path.write_text(content.replace("%s", KEY.text()))
    cache = ThroughputCache(path)
    assert cache.get(KEY) is None
    cache.put(KEY, 10.0)
    assert cache.get(KEY) == 10.0


def test_an_unwritable_cache_only_costs_a_measurement(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = ThroughputCache(blocker / "throughput.json")  # its folder would have to be a file
    cache.put(KEY, 5.0)  # logged, not raised
    assert cache.get(KEY) is None


def test_measuring_a_real_span_gives_a_per_block_figure(tiny_model_path):
    path = tiny_model_path("llama", num_layers=4)
    model = SpanModel(load_span(path, Span(1, 3)))
    tokens_s = measure_span(model, model.config.hidden_size, rows=4, repeats=2)
    assert 0 < tokens_s < 1e9
    key = throughput_key(torch.device("cpu"), "float32", "ab" * 16)
    assert key.device.startswith("cpu:") and key.threads == torch.get_num_threads()


def test_network_statistics_are_rolling_medians():
    stats = NetworkStats(window=3)
    assert (stats.rtt_ms, stats.mbps) == (None, 0.0)  # not measured: what a schema 1.0 peer announced
    for rtt, mbps in ((0.010, 100.0), (0.030, None), (0.020, 300.0), (0.500, 200.0)):
        stats.add(rtt, mbps)
    assert stats.rtt_ms == 30.0  # median of the last three: 30, 20, 500 ms
    assert stats.mbps == 200.0  # median of 100, 300, 200
    assert stats.as_dict() == {"rtt_ms": 30.0, "mbps": 200.0, "samples": 3}


def test_bandwidth_from_a_plain_and_a_padded_round_trip():
    assert bandwidth_mbps(0.010, 0.011, pad_bytes=125_000) == pytest.approx(1000.0)  # 1 Mbit in 1 ms
    assert bandwidth_mbps(0.010, 0.0101) is None  # lost in noise (loopback)
    assert bandwidth_mbps(0.010, 0.009) is None
