"""Build a model's skeleton on the meta device and load only what a role needs, through transformers' own
checkpoint conversion (the renamings and expert fusions `from_pretrained` applies).

- `load_span(path, span)`: the decoder layers [start, end) and the rotary embedding, for a peer.
- `load_client_head(path)`: embeddings, final norm and LM head, for a client.

Everything else stays on the meta device and costs no memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from swarm.errors import ConfigError
from swarm.runtime import quant as q
from swarm.runtime.checkpoint import CheckpointReader, block_of_key
from swarm.spans import Span

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars for the duration; restore the caller's setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_config(path: str | Path, attn_implementation: str = "sdpa") -> PretrainedConfig:
    """The checkpoint's config, with the attention implementation we run set explicitly."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: no config.json there; --model must be a Hugging Face checkpoint folder")
    config = AutoConfig.from_pretrained(str(path))
    config._attn_implementation = attn_implementation
    return config


def config_hash(config: PretrainedConfig) -> str:
    """A stable hash of the architecture config, so a client never mixes two models that share a name."""
    text = config.to_json_string(use_diff=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of named tensors as loaded (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:32]


# transformers builds a model in `dtype` by setting torch's process-wide default dtype and restoring it
# after; two threads doing so at once (peers loading side by side in one process, a client beside them)
# can build one model's norms in the other's dtype, or leave the wrong default behind
_BUILD_LOCK = threading.Lock()


def _meta_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    with _BUILD_LOCK, torch.device("meta"):
        default = torch.get_default_dtype()
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        finally:
            torch.set_default_dtype(default)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__}: decoder layers not found; this architecture is not supported")
    return layers


def _convert_and_load(model: PreTrainedModel, tensors: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Load checkpoint tensors into a meta model exactly as `from_pretrained` would (renames, expert fusion)."""
    from transformers import core_model_loading
    from transformers.conversion_mapping import get_model_conversion_mapping

    mapping = get_model_conversion_mapping(model)
    load = core_model_loading.convert_and_load_state_dict_in_model
    params = inspect.signature(load).parameters
    device_map = {"": str(device)}
    if "load_config" in params:  # transformers >= 5.2x
        from transformers.modeling_utils import LoadStateDictConfig

        load(model, tensors, LoadStateDictConfig(device_map=device_map, dtype=dtype, weight_mapping=mapping))
    else:  # earlier 5.x: keyword arguments
        kwargs = dict(weight_mapping=mapping, tp_plan=None, hf_quantizer=None, dtype=dtype, device_map=device_map)
        load(model, tensors, **{k: v for k, v in kwargs.items() if k in params})


def _check_loaded(module: nn.Module, what: str) -> None:
    missing = [name for name, p in module.named_parameters() if p.is_meta]
    if missing:
        raise ConfigError(f"{what}: the checkpoint lacks tensors for {missing[:5]} (and {max(0, len(missing) - 5)} more)")


@dataclass
class LoadedSpan:
    config: PretrainedConfig
    span: Span
    layers: nn.ModuleList  # global block i is layers[i - span.start]
    rotary_emb: nn.Module
    block_hashes: list[str]  # of the checkpoint's tensors, whatever the quantization
    keys_read: list[str]
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # of activations, norms and unquantized weights
    quant: str = "none"  # weight scheme (swarm.runtime.quant)
    host_blocks: dict[int, nn.Module] | None = None  # blocks whose weights stay in host RAM (offload)


@dataclass(frozen=True)
class SpanMemory:
    """What serving a span will take, known before anything is loaded."""

    weights_bytes: int  # on the device (offloaded blocks' weights excluded, their staging included)
    kv_bytes_per_token: int  # one cached token (one row) across the whole span
    host_bytes: int = 0  # offloaded blocks' weights, in host RAM

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv_bytes_per_token


def block_weight_bytes(path: str | Path, dtype: torch.dtype, quant: str = "none") -> list[int]:
    """Each block's weights on the device in `dtype` under weight scheme `quant`: from the checkpoint's
    headers for "none" (no tensor is read), from the model's modules on the meta device otherwise."""
    config = load_config(path)
    if quant == "none":
        reader = CheckpointReader(path)
        by_block: dict[int, list[str]] = {}
        for key in reader.keys(lambda k: block_of_key(k) is not None):
            by_block.setdefault(block_of_key(key), []).append(key)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return [reader.numel(by_block.get(block, [])) * itemsize for block in range(config.num_hidden_layers)]
    q.scheme(quant)
    layers = decoder_layers(_meta_model(config, dtype))
    return [q.module_weight_bytes(layer, quant, dtype) for layer in layers]


def span_memory(path: str | Path, span: Span, dtype: torch.dtype, quant: str = "none",
                kv_dtype: str | None = None, offload_blocks: int = 0) -> SpanMemory:
    """Weights of the span in `dtype` under `quant` (the last `offload_blocks` blocks in host RAM, two
    blocks' staging on the device) and KV cache bytes per cached token (stored as `kv_dtype`: "fp8" or
    the dtype's own)."""
    config = load_config(path)
    if span.end > config.num_hidden_layers:
        raise ConfigError(f"span {span}: the model has only {config.num_hidden_layers} blocks")
    blocks = block_weight_bytes(path, dtype, quant)[span.start : span.end]
    offload = max(0, min(offload_blocks, span.length))
    on_device, on_host = blocks[: span.length - offload], blocks[span.length - offload :]
    staging = sum(sorted(on_host, reverse=True)[:2])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = q.kv_bytes_per_block_token(kv_heads, head_dim, dtype, kv_dtype or "auto") * span.length
    return SpanMemory(sum(on_device) + staging, per_token, sum(on_host))


def load_span(
    path: str | Path,
    span: Span,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    progress: bool = False,
    quant: str = "none",
    offload_blocks: int = 0,
) -> LoadedSpan:
    """Load blocks [span.start, span.end) of a checkpoint; reads no other block's tensors.

    `quant` (swarm.runtime.quant): the blocks are converted in host memory first, then each goes to the
    device and is quantized there before the next one moves, so the device never holds more than one
    block in full precision. `offload_blocks`: the last N blocks stay in host RAM (swarm.runtime.offload)."""
    device = torch.device(device)
    q.scheme(quant)
    offload = _check_offload(offload_blocks, span, quant)
    config = load_config(path, attn_implementation)
    if span.end > config.num_hidden_layers:
        raise ConfigError(f"span {span}: the model has only {config.num_hidden_layers} blocks")
    reader = CheckpointReader(path)
    keys = reader.keys(lambda k: block_of_key(k) in span)
    raw = reader.read(keys, progress=progress)
    hashes = [tensors_hash({k: v for k, v in raw.items() if block_of_key(k) == b}) for b in range(span.start, span.end)]
    model = _meta_model(config, dtype)
    staged = quant != "none" or offload > 0
    _convert_and_load(model, raw, dtype, torch.device("cpu") if staged else device)
    del raw
    all_layers = decoder_layers(model)
    layers = nn.ModuleList(all_layers[span.start : span.end])
    _check_loaded(layers, f"blocks {span}")
    host_blocks = {}
    if staged:
        for i, layer in enumerate(layers):
            block = span.start + i
            if block >= span.end - offload:
                host_blocks[block] = layer  # stays in host RAM, in the dtype (HostBlocks pins it)
                continue
            layer.to(device)
            q.quantize_layer(layer, quant, device)
    rotary_cls = type(model.get_decoder().rotary_emb)
    rotary = rotary_cls(config=config).to(device)
    layers.eval()
    rotary.eval()
    return LoadedSpan(config, span, layers, rotary, hashes, list(reader.keys_read), device, dtype, quant,
                      host_blocks or None)


def _check_offload(offload_blocks: int, span: Span, quant: str) -> int:
    if type(offload_blocks) is not int or not 0 <= offload_blocks <= span.length:
        raise ConfigError(f"--offload-blocks {offload_blocks!r}: expected 0..{span.length} (the span's blocks)")
    if offload_blocks and quant != "none":
        raise ConfigError("--offload-blocks keeps blocks in the span's dtype; it does not combine with --quant")
    return offload_blocks


@dataclass
class ClientHead:
    """What a client holds locally: embeddings, final norm, LM head (all real), plus the config."""

    config: PretrainedConfig
    embed_tokens: nn.Module
    norm: nn.Module
    lm_head: nn.Module
    config_hash: str
    keys_read: list[str]


def load_client_head(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu") -> ClientHead:
    """Load embeddings, final norm and LM head; reads no decoder block's tensors."""
    device = torch.device(device)
    config = load_config(path)
    reader = CheckpointReader(path)
    raw = reader.read(reader.keys(lambda k: block_of_key(k) is None))
    model = _meta_model(config, dtype)
    _convert_and_load(model, raw, dtype, device)
    if config.tie_word_embeddings:
        model.tie_weights()
    decoder = model.get_decoder()
    head = ClientHead(
        config, decoder.embed_tokens, decoder.norm, model.get_output_embeddings(), config_hash(config), reader.keys_read
    )
    for module, what in ((head.embed_tokens, "embeddings"), (head.norm, "final norm"), (head.lm_head, "LM head")):
        _check_loaded(module, what)
        module.eval()
    return head
