"""The model-block runtime: the model's own transformers decoder layers for a span, run with our KV cache.

- `checkpoint.py`  reads only the tensors a role needs from a standard HF checkpoint folder
- `loading.py`     builds the model skeleton on the meta device and loads a span (or the client's head)
                   through transformers' own checkpoint conversion
- `cache.py`       the KV byte budget (pages), the KV pool of a block range shared by its sessions, and
                   the per-session KV cache (a region of the pool) that draws on both
- `span.py`        SpanModel: runs [start, end) on many sessions' steps as one batched forward, with
                   attention through transformers' attention interface (one varlen flash-attention call
                   per block over the pool on CUDA, per-session SDPA otherwise)
- `graphs.py`      CUDA graphs of batched decode steps, one per bucket of rows
"""

from swarm.runtime.cache import CacheFull, KVBudget, KVCache
from swarm.runtime.loading import ClientHead, load_client_head, load_span
from swarm.runtime.span import SpanModel

__all__ = ["CacheFull", "KVBudget", "KVCache", "SpanModel", "ClientHead", "load_span", "load_client_head"]
