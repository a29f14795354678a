"""Lower-precision weights and KV cache for a span: what each scheme is, what it costs in bytes, and how a
loaded decoder layer is converted.

Weight schemes (`--quant`), all through torchao (the `quant` extra: `pip install 'swarm-llm[quant]'`):

- none: the span's dtype.
- int8: int8 weights, symmetric, one fp32 scale per output row; dequantized to the activations' dtype
  for the matmul.
- fp8: float8 e4m3 weights, one fp32 scale per output row; on CUDA sm >= 8.9 the activations are
  quantized per row to fp8 too and the matmul runs on fp8 tensor cores (`_scaled_mm`); elsewhere the
  weights are dequantized for the matmul.
- nf4: 4-bit NormalFloat (QLoRA's) in blocks of 64 weights, the blocks' scales int8 in blocks of 256
  (double quantization); dequantized for the matmul.

Norms, biases, rotary tables and fused mixture-of-experts weights (transformers 5 holds experts as 3-D
parameters, not nn.Linear) stay in the span's dtype. A layer is converted on the device right after its
tensors land there, one block at a time (swarm.runtime.loading), so the span is never held in full
precision on the device.

KV cache (`--kv-dtype fp8`): each head's key or value vector of each token is stored as float8 e4m3 codes
(one byte each) and its own fp32 scale (its absolute maximum / 448), so any magnitude keeps float8's
relative precision (3 mantissa bits: about 2^-4 per element); it is read back into the compute dtype
for attention. (head_dim + 4) bytes a vector: 0.52x of bf16 at head_dim 128.

Why torchao: one small package (an abi3 wheel of 3 MB with no required dependencies) from the PyTorch
project, integrated in transformers (TorchAoConfig), that covers int8, fp8 and nf4 with the same tensor
subclass machinery, runs on the CPU here and on CUDA, and needs no kernels of its own for these paths.
bitsandbytes has no fp8, and on CPUs with AVX512-BF16 reaches for a kernel on the Hugging Face Hub when
imported.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

NF4_BLOCK = 64  # weights per 4-bit block (one scale each)
NF4_SCALER_BLOCKS = (256, 128, 64, 32, 16, 8)  # scales per int8 block of scales; the first that divides
FP8_MAX = 448.0  # largest finite float8 e4m3fn


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int  # nominal bits per quantized weight (scales not counted); 0 = the dtype's own


WEIGHT_SCHEMES = {s.name: s for s in (Scheme("none", 0), Scheme("int8", 8), Scheme("fp8", 8),
                                       Scheme("nf4", 4))}
KV_FORMATS = ("auto", "fp8")  # auto: the compute dtype


def scheme(name: str) -> Scheme:
    try:
        return WEIGHT_SCHEMES[name]
    except KeyError:
        choices = ", ".join(WEIGHT_SCHEMES)
        raise ConfigError(f"quantization {name!r} is not supported; use one of {choices}") from None


def check_kv_format(name: str | None) -> str:
    name = name or "auto"
    if name not in KV_FORMATS:
        raise ConfigError(f"KV cache dtype {name!r} is not supported; use one of {', '.join(KV_FORMATS)}")
    return name


def kv_storage(head_dim: int, dtype: torch.dtype, kv_format: str) -> tuple[torch.dtype, int]:
    """(storage dtype, last-dimension width) of one head's K or V of one token in the pool: fp8 is stored as
    bytes, head_dim float8 codes followed by the fp32 scale of that vector (4 bytes)."""
    if check_kv_format(kv_format) == "fp8":
        if head_dim % 4:
            raise ConfigError(f"an fp8 KV cache needs head_dim divisible by 4, got {head_dim}")
        return torch.uint8, head_dim + 4
    return dtype, head_dim


def kv_bytes_per_block_token(kv_heads: int, head_dim: int, dtype: torch.dtype, kv_format: str) -> int:
    """K and V bytes of one token of one block."""
    store, width = kv_storage(head_dim, dtype, kv_format)
    return 2 * kv_heads * width * store.itemsize


def encode_kv(x: torch.Tensor, kv_format: str) -> torch.Tensor:
    """K or V [..., head_dim] as stored: as they are, or fp8 codes and a per-vector scale ([..., head_dim + 4]
    bytes; the vector's absolute maximum maps to 448, the largest float8 e4m3)."""
    if kv_format != "fp8":
        return x
    scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-30)
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8)], dim=-1)


def decode_kv(stored: torch.Tensor, dtype: torch.dtype, kv_format: str, out: torch.Tensor | None = None):
    """Stored K or V back in `dtype` ([..., head_dim]), into `out` when given."""
    if kv_format != "fp8":
        return stored if out is None else out.copy_(stored)
    head_dim = stored.shape[-1] - 4
    scale = stored[..., head_dim:]
    try:
        scale = scale.view(torch.float32)
    except RuntimeError:  # a view whose strides do not allow a 4-byte reading
        scale = scale.contiguous().view(torch.float32)
    codes = stored[..., :head_dim].view(torch.float8_e4m3fn).to(dtype)
    return torch.mul(codes, scale.to(dtype), out=out)


def weight_bits(name: str, dtype: torch.dtype) -> int:
    """Bits per weight of the span's linear layers under scheme `name` (the dtype's own for "none")."""
    return scheme(name).bits or torch.empty((), dtype=dtype).element_size() * 8


def require_torchao() -> None:
    """Import torchao once (quietly: it logs about optional kernels it cannot load), or say how to get it."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import torchao  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--quant needs torchao ({e}); install it: pip install 'swarm-llm[quant]'") from e


def _nf4_scaler_block(numel: int) -> int | None:
    if numel % NF4_BLOCK:
        return None
    blocks = numel // NF4_BLOCK
    return next((s for s in NF4_SCALER_BLOCKS if blocks % s == 0), None)


def linear_weight_bytes(out_features: int, in_features: int, name: str, dtype: torch.dtype) -> int:
    """Device bytes of one nn.Linear weight [out, in] under scheme `name` (what `quantize_layer` makes)."""
    numel = out_features * in_features
    itemsize = torch.empty((), dtype=dtype).element_size()
    if name == "none":
        return numel * itemsize
    if name == "int8":
        return numel + 5 * out_features  # one byte a weight; an fp32 scale and an int8 zero point a row
    if name == "fp8":
        return numel + 4 * out_features  # one byte a weight, an fp32 scale a row
    scaler_block = _nf4_scaler_block(numel)
    if scaler_block is None:  # left in the dtype (see quantize_layer)
        return numel * itemsize
    blocks = numel // NF4_BLOCK
    # 4-bit codes, int8 block scales; in the dtype: a factor per scaler block, the 16-entry table, the
    # scalers' mean
    return numel // 2 + blocks + itemsize * (blocks // scaler_block + 16 + 1)


def module_weight_bytes(module: nn.Module, name: str, dtype: torch.dtype) -> int:
    """Device bytes of `module`'s parameters and buffers once converted by `quantize_layer` (it may live on
    the meta device: only shapes are read)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    linear_weights = set()
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            linear_weights.add(id(sub.weight))
            total += linear_weight_bytes(sub.out_features, sub.in_features, name, dtype)
    for p in module.parameters():
        if id(p) not in linear_weights:
            total += p.numel() * itemsize
    return total


def _fp8_config(device: torch.device):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
    )

    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Float8WeightOnlyConfig()


def quantize_layer(layer: nn.Module, name: str, device: torch.device) -> int:
    """Convert every nn.Linear weight of `layer` (already on `device`) to scheme `name`, in place; returns
    how many weights were converted. nf4 leaves a weight whose size does not divide into its blocks as it
    is (tiny test models), which `linear_weight_bytes` counts the same way."""
    if name == "none":
        return 0
    require_torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_, to_nf4

    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    if name in ("int8", "fp8"):
        config = Int8WeightOnlyConfig() if name == "int8" else _fp8_config(device)
        quantize_(layer, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear))
        return len(linears)
    converted = 0
    for linear in linears:
        weight = linear.weight.data
        scaler_block = _nf4_scaler_block(weight.numel())
        if scaler_block is None:
            continue
        linear.weight = nn.Parameter(to_nf4(weight, NF4_BLOCK, scaler_block), requires_grad=False)
        converted += 1
    return converted


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized, tensor-subclass) tensor holds: the sum over its inner plain tensors."""
    return sum(x.numel() * x.element_size() for x in inner_tensors(t))


def inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor subclass's data (torchao's quantized tensors), or [t]."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names for x in inner_tensors(getattr(t, n))]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float32 (how hidden states diverge from a reference)."""
    a, b = a.float(), b.float()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 and math.isfinite(scale) else math.inf
