"""SpanModel: runs the model's own decoder layers [start, end) on the steps of many sessions at once.

One step of one session (a `Segment`): hidden [rows, new, hidden_size], position_ids [rows, new]
(rotary positions, 0 at padding), valid [rows, new] (False at left padding), and the session's KVCache.
`run(segments)` packs every segment's tokens into one sequence [1, total_tokens, hidden_size], so the
projections, MLPs and experts of all sessions run as one batched forward (continuous batching), while
attention stays per segment: the layers call our attention function (registered in transformers'
`AttentionInterface` as "swarm_varlen"), which runs transformers' own SDPA (or eager) attention for
each segment over that session's cache, read in place. This is varlen attention: no padding to the
longest session, no copy of any cache.

Masks are built here, the way transformers builds them for its own forward: causal over cache slots,
padding slots masked, a sliding window where the layer type asks for one; None where none is needed.
"""

from __future__ import annotations

import inspect
import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from swarm.errors import ConfigError
from swarm.runtime.batch import Segment, Step
from swarm.runtime.cache import KVBudget, KVCache, KVPool, unlimited_budget
from swarm.runtime.graphs import DecodeGraphs
from swarm.runtime.loading import LoadedSpan
from swarm.runtime.offload import HostBlocks
from swarm.runtime.quant import check_kv_format, kv_bytes_per_block_token

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "swarm_varlen"


def _layer_windows(config, span) -> list[int | None]:
    """Sliding window (in tokens) of each block in the span, None for full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    out = []
    for block in range(span.start, span.end):
        if layer_types is not None:
            out.append(window if layer_types[block] == "sliding_attention" else None)
        else:  # older configs (Mistral/Mixtral style): one window for every layer when set
            out.append(window)
    return out


def _flash_attention(step: Step, block: int, window, query, scaling) -> torch.Tensor:
    """Every segment's attention in one varlen flash-attention call over the pool, read in place."""
    f, pool = step.flash, step.pool
    i = block - pool.span.start
    q = query[0].transpose(0, 1)  # [total, heads, head_dim]
    keys, values = pool.readable(i, query.dtype)  # fp8 pages: the block's pool converted into a scratch
    out = torch.ops.aten._flash_attention_forward(
        q, keys.transpose(0, 1), values.transpose(0, 1), f.cu_q, f.cu_k, f.max_q, f.max_k,
        0.0, True, False, scale=scaling, seqused_k=f.used,
        window_size_left=-1 if window is None else window - 1, window_size_right=-1 if window is None else 0,
    )[0]
    return out.unsqueeze(0)


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of every segment over its own cache; returns [1, total, heads, head_dim] like transformers'."""
    step: Step = kwargs["swarm_step"]
    model = step.model
    block = module.layer_idx
    window = model.windows[block - model.span.start]
    if step.flash is not None and model.flash:
        try:
            return _flash_attention(step, block, window, query, scaling), None
        except RuntimeError as e:  # this GPU or build has no flash kernel for it: per-segment SDPA from now on
            if not step.segments:  # a graph's static step: its caller falls back
                raise
            model.flash = False
            logger.warning("varlen flash attention off for this span (%s); attention runs per session", e)
    outs = []
    for s, q, (rows, new) in zip(step.segments, step.split(query), step.shapes, strict=True):
        if window not in s.masks:
            s.masks[window] = model.mask_or_none(s.cache, new, window)
        mask = s.masks[window]
        k, v = s.cache.layer(block)
        pool = s.cache.pool
        if pool.store_dtype != q.dtype or pool.device != q.device:  # fp8 pages, or pages in host RAM
            k, v = pool.decode(k, q.device), pool.decode(v, q.device)  # this session's only
        if mask is None and new == 1 and not model._eager:
            # the common decode step, on the shortest path: torch's fused SDPA, GQA without repeating K/V
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
            out = out.transpose(1, 2)
        else:
            out, _ = model.inner_attention(module, q, k, v, mask, dropout=0.0, scaling=scaling)
        outs.append(out.reshape(rows * new, *out.shape[2:]))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(0), None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


class SpanModel(nn.Module):
    """A loaded span, runnable step by step. Stateless between steps; state lives in the KVCaches."""

    def __init__(self, loaded: LoadedSpan, cuda_graphs: bool = False, flash: bool = True,
                 kv_dtype: str | None = None, kv_offload: bool = False):
        """`kv_dtype` "fp8": KV pages stored as float8 (swarm.runtime.quant); `kv_offload`: the KV pool lives
        in host RAM (pinned) and each session's K/V go to the device for its attention, block by block."""
        super().__init__()
        self.config = loaded.config
        self.span = loaded.span
        self.layers = loaded.layers
        self.rotary_emb = loaded.rotary_emb
        self.block_hashes = loaded.block_hashes
        self.windows = _layer_windows(self.config, self.span)
        params = inspect.signature(self.layers[0].forward).parameters
        # transformers 5.24 renamed the layers' `past_key_values` argument to `cache`; 5.17 knows only the old name
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        impl = self.config._attn_implementation
        if impl not in ("sdpa", "eager", VARLEN_ATTENTION):
            raise ConfigError(f"attention implementation {impl!r} is not supported here; use 'sdpa' or 'eager'")
        if impl != VARLEN_ATTENTION:
            self._eager = impl == "eager"
            attention_module = sys.modules[type(self.layers[0].self_attn).__module__]
            self.inner_attention = attention_module.eager_attention_forward if self._eager else sdpa_attention_forward
            self.config._attn_implementation = VARLEN_ATTENTION  # every layer of this span now calls ours
        self.dtype, self.device = loaded.dtype, loaded.device
        self.quant = loaded.quant
        self.kv_format = check_kv_format(kv_dtype)
        self.kv_device = torch.device("cpu") if kv_offload else self.device
        self.host_blocks = HostBlocks(loaded.host_blocks, self.device) if loaded.host_blocks else None
        c = self.config
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.bytes_per_block_token = kv_bytes_per_block_token(c.num_key_value_heads, self.head_dim, self.dtype,
                                                              self.kv_format)
        self._pools: dict[tuple[int, int], KVPool] = {}  # block range -> the K/V storage of its sessions
        # one varlen flash-attention kernel per block for a whole batch (CUDA, half precision, Ampere or later)
        self.flash = (flash and self.device.type == "cuda" and not self._eager and self.head_dim <= 256
                      and self.kv_device == self.device
                      and self.dtype in (torch.float16, torch.bfloat16)
                      and torch.cuda.get_device_capability(self.device)[0] >= 8)
        self.flash_forwards = 0  # eager forwards that took the flash path (tests and `info` read it)
        # batched decode steps replay CUDA graphs (swarm.runtime.graphs): on the flash path only
        self.graphs = DecodeGraphs(self) if cuda_graphs and self.flash and self.host_blocks is None else None

    def new_cache(self, rows: int, max_length: int, budget: KVBudget | None = None,
                  blocks: tuple[int, int] | None = None) -> KVCache:
        span = self.span if blocks is None else type(self.span)(*blocks)
        return KVCache(span, rows, max_length, self.bytes_per_block_token, budget or unlimited_budget(),
                       self.pool(span))

    def pool(self, span) -> KVPool:
        """The K/V storage shared by the sessions on blocks `span` (one per block range)."""
        key = (span.start, span.end)
        if key not in self._pools:
            self._pools[key] = KVPool(span, self.config.num_key_value_heads, self.head_dim, self.dtype,
                                      self.kv_device, pin=self.kv_device != self.device, kv_format=self.kv_format)
        return self._pools[key]

    def mask_or_none(self, cache: KVCache, new: int, window: int | None) -> torch.Tensor | None:
        """None where attention needs no mask (as transformers decides): a single new token, or a whole
        prompt from an empty cache (SDPA only: it turns a missing mask into is_causal, while eager
        attention without a mask attends to every token), with no padding anywhere and no window cutting
        into the past."""
        total = cache.length + new
        no_window_effect = window is None or total <= window
        if (new == 1 or (cache.length == 0 and not self._eager)) and no_window_effect and not cache.padded:
            return None
        return self._mask(cache.valid, cache.length, new, window)

    def _mask(self, valid: torch.Tensor, start: int, new: int, window: int | None) -> torch.Tensor:
        """[rows, 1, new, start + new] mask over cache slots; True/0.0 = attend."""
        total = start + new
        q = torch.arange(start, total, device=self.device).view(1, 1, new, 1)
        k = torch.arange(total, device=self.device).view(1, 1, 1, total)
        allowed = (k <= q) & valid[:, :total].to(self.device).view(-1, 1, 1, total)
        if window is not None:
            allowed &= q - k < window
        # A padding query row would attend to nothing (softmax of -inf everywhere = NaN); let it see itself.
        allowed |= k == q
        if not self._eager:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min
        )

    def run(self, segments: list[Segment]) -> list[torch.Tensor]:
        """`run_packed`, as each segment's output hidden states [rows, new, hidden_size] (views)."""
        packed = self.run_packed(segments)
        return [packed[s.offset : s.end].view(s.rows, s.new, -1) for s in segments]

    @torch.inference_mode()
    def run_packed(self, segments: list[Segment]) -> torch.Tensor:
        """One batched forward over every segment's blocks (all segments' caches cover the same blocks, which
        must lie in this span); commits each step into its cache, or rolls every one back on error.
        Returns the output hidden states of every segment's token rows, packed in segment order
        ([sum of rows x new, hidden_size], segment s at [s.offset, s.end)) on this model's device.
        A batch of decode steps replays a CUDA graph when graphs are on (swarm.runtime.graphs)."""
        blocks = segments[0].cache.span
        if any(s.cache.span != blocks for s in segments) or not (self.span.start <= blocks.start < blocks.end <= self.span.end):
            raise ValueError(f"segments of one forward must share blocks within {self.span}")
        hidden_size = self.config.hidden_size
        offset = 0
        for s in segments:
            s.offset, s.masks = offset, {}
            offset = s.end
        if self.graphs is not None:
            packed = self.graphs.run(segments)
            if packed is not None:
                return packed
        hidden = torch.cat([s.hidden.reshape(-1, hidden_size) for s in segments]).to(self.device, self.dtype)[None]
        position_ids = torch.cat([s.position_ids.reshape(-1) for s in segments]).to(self.device)[None]
        for s in segments:
            s.cache.begin(s.valid)
        try:
            hidden = self._layers(hidden, position_ids, Step.of(self, segments), blocks)
        except BaseException:
            for s in segments:
                s.cache.rollback()
            raise
        for s in segments:
            s.cache.commit()
        return hidden[0]

    def _layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, step: Step, blocks) -> torch.Tensor:
        """The packed tokens [1, total, hidden_size] through blocks [blocks.start, blocks.end)."""
        position_embeddings = self.rotary_emb(hidden, position_ids)
        host = self.host_blocks
        offloaded = [b for b in range(blocks.start, blocks.end) if host is not None and b in host]
        if offloaded:
            host.prefetch(offloaded[0])  # its copy overlaps the blocks before it
        for block in range(blocks.start, blocks.end):
            if offloaded and block == offloaded[0]:
                offloaded.pop(0)
                host.fetch(block, offloaded[0] if offloaded else None)
            out = self.layers[block - self.span.start](
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                use_cache=True,
                swarm_step=step,
                **{self._cache_arg: step},
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def forward(self, hidden, position_ids, valid, cache: KVCache) -> torch.Tensor:
        """One session's step (reserving its pages first): [rows, new, hidden] -> the same shape."""
        cache.reserve(cache.length + hidden.shape[1])
        return self.run([Segment(cache, hidden, position_ids, valid)])[0]
