"""SpanModel: runs the model's own decoder layers [start, end) on hidden states, with a session's KV cache.

One step:  hidden [batch, new_tokens, hidden_size], position_ids [batch, new_tokens] (rotary positions,
0 at padding), valid [batch, new_tokens] (False at left padding)  ->  hidden of the same shape.

Masks are built here, the way transformers builds them for its own forward: causal over cache slots,
padding slots masked, a sliding window where the layer type asks for one.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from swarm.runtime.cache import KVCache
from swarm.runtime.loading import LoadedSpan


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


class SpanModel(nn.Module):
    """A loaded span, runnable step by step. Stateless between steps; state lives in the KVCache."""

    def __init__(self, loaded: LoadedSpan):
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
        self._eager = self.config._attn_implementation == "eager"
        first = next(self.layers.parameters())
        self.dtype, self.device = first.dtype, first.device

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache(self.span, batch_size, max_length)

    def _mask_or_none(self, cache: KVCache, new: int, window: int | None) -> torch.Tensor | None:
        """None where attention needs no mask (as transformers decides): a single new token, or a whole
        prompt from an empty cache, with no padding anywhere and no window cutting into the past."""
        total = cache.length + new
        no_window_effect = window is None or total <= window
        if (new == 1 or cache.length == 0) and no_window_effect and bool(cache.valid[:, :total].all()):
            return None
        return self._mask(cache.valid, cache.length, new, window)

    def _mask(self, valid: torch.Tensor, start: int, new: int, window: int | None) -> torch.Tensor:
        """[batch, 1, new, start + new] mask over cache slots; True/0.0 = attend."""
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

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,  # [batch, new, hidden_size]
        position_ids: torch.Tensor,  # [batch, new] int64
        valid: torch.Tensor,  # [batch, new] bool
        cache: KVCache,
        blocks: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Run blocks [blocks[0], blocks[1]) (default: the whole span) and commit the step into `cache`."""
        start_block, end_block = blocks or (self.span.start, self.span.end)
        hidden = hidden.to(self.device, self.dtype)
        position_ids = position_ids.to(self.device)
        new = hidden.shape[1]
        cache.begin(valid)
        try:
            position_embeddings = self.rotary_emb(hidden, position_ids)
            cache_position = torch.arange(cache.length, cache.length + new, device=self.device)
            masks: dict[int | None, torch.Tensor | None] = {}
            for block in range(start_block, end_block):
                i = block - self.span.start
                window = self.windows[i]
                if window not in masks:
                    masks[window] = self._mask_or_none(cache, new, window)
                out = self.layers[i](
                    hidden,
                    attention_mask=masks[window],
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                    use_cache=True,
                    cache_position=cache_position,
                    **{self._cache_arg: cache},
                )
                hidden = out[0] if isinstance(out, tuple) else out
        except BaseException:
            cache.rollback()
            raise
        cache.commit()
        return hidden
