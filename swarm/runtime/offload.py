"""Weights of some blocks kept in host RAM and brought to the device just before each forward of them
(`--offload-blocks N`: the last N blocks of the span), so a small GPU serves more blocks than it holds.

The device holds two staging sets of one block's tensors. Before block b runs, its parameters and
buffers point at the staging set of its turn (b's rank among the offloaded blocks, mod 2), filled from
pinned host memory by an asynchronous copy on a side stream; while block b computes, the next offloaded
block's copy runs into the other set (after the compute that last read that set). With two offloaded
blocks or fewer, their weights simply stay in the staging sets. So each forward
moves every offloaded block's weights over PCIe once, overlapped with compute where there is compute to
hide it behind. On the CPU (tests) the copy is a plain one, with the same bookkeeping.

Weights in the span's dtype only (not with --quant: quantized tensors are subclasses whose device is
fixed when they are made). CUDA graphs are off for a span with offloaded blocks (swarm.runtime.span).

Thread use: the compute thread only (SpanModel's forwards).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _Leaf:
    """One tensor of an offloaded block: where it hangs (module, name) and its pinned host copy."""

    __slots__ = ("module", "name", "host", "is_param")

    def __init__(self, module: nn.Module, name: str, host: torch.Tensor, is_param: bool):
        self.module, self.name, self.host, self.is_param = module, name, host, is_param


class HostBlocks:
    """The offloaded blocks of a span: `fetch(block, next)` before running it."""

    def __init__(self, layers: dict[int, nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.order = sorted(layers)
        self._rank = {block: i for i, block in enumerate(self.order)}
        self._leaves = {block: self._pin(layer) for block, layer in layers.items()}
        self._staging: list[dict[tuple, torch.Tensor]] = [{}, {}]  # per set: (leaf, shape, dtype) -> tensor
        self._loaded: list[int | None] = [None, None]  # block whose tensors each set holds (or is getting)
        self._ready: list = [None, None]  # CUDA events: a set's copy finished
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copied_bytes = 0  # host -> device bytes moved so far (bench and info read it)

    @property
    def host_bytes(self) -> int:
        leaves = [leaf for block_leaves in self._leaves.values() for leaf in block_leaves]
        return sum(leaf.host.numel() * leaf.host.element_size() for leaf in leaves)

    @property
    def staging_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._staging for t in s.values())

    def __contains__(self, block: int) -> bool:
        return block in self._rank

    def _pin(self, layer: nn.Module) -> list[_Leaf]:
        leaves = []
        for module in layer.modules():
            for store, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in store.items():
                    if tensor is None:
                        continue
                    host = tensor.detach().to("cpu")
                    if self.cuda:
                        host = host.pin_memory()
                    leaves.append(_Leaf(module, name, host, is_param))
                    self._attach(leaves[-1], host)
        return leaves

    @staticmethod
    def _attach(leaf: _Leaf, tensor: torch.Tensor) -> None:
        if leaf.is_param:
            leaf.module._parameters[leaf.name].data = tensor
        else:
            leaf.module._buffers[leaf.name] = tensor

    def prefetch(self, block: int) -> None:
        """Start copying `block`'s tensors into its staging set (no-op if they are there or coming)."""
        if block not in self._rank:
            return
        slot = self._rank[block] % 2
        if self._loaded[slot] == block:
            return
        staging = self._staging[slot]
        keys = [(i, tuple(leaf.host.shape), leaf.host.dtype) for i, leaf in enumerate(self._leaves[block])]
        for key in keys:  # allocated on the compute stream, which reads them (they live as long as the span)
            if key not in staging:
                staging[key] = torch.empty(key[1], dtype=key[2], device=self.device)
        stream = self._stream
        if stream is not None:  # after the compute that last read this set, and what queued the host tensors
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for key, leaf in zip(keys, self._leaves[block], strict=True):
                staging[key].copy_(leaf.host, non_blocking=True)
                self.copied_bytes += leaf.host.numel() * leaf.host.element_size()
            if stream is not None:
                self._ready[slot] = torch.cuda.Event()
                self._ready[slot].record(stream)
        self._loaded[slot] = block

    def fetch(self, block: int, next_block: int | None = None) -> None:
        """Make `block`'s module read its staging set (copied first if no prefetch did), ordered after the
        copy on the current stream; then start copying `next_block` (the next offloaded block this forward
        runs, if any) into the other set: that copy waits for the compute queued so far (the last reader of
        that set), not for `block`'s, which it overlaps."""
        self.prefetch(block)
        slot = self._rank[block] % 2
        if self._ready[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        staging = self._staging[slot]
        for i, leaf in enumerate(self._leaves[block]):
            self._attach(leaf, staging[(i, tuple(leaf.host.shape), leaf.host.dtype)])
        if next_block is not None:
            self.prefetch(next_block)
