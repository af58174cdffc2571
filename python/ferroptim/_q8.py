"""8-bit blockwise optimizer states: the storage format, written with torch ops.

This module is the reference of the format (the Rust kernels follow it bit for bit) and
the implementation the torch path (other devices, ``set_backend("torch")``) steps with.

**Maps.** bitsandbytes' dynamic quantization maps (``create_dynamic_map``, 8 bits, 7
exponent bits): 256 sorted float32 values, signed (``-0.99296875 … 1.0``, holding 0.0)
for states of either sign (first moments) and unsigned (``0.0 … 1.0``) for non-negative
states (second moments). A code means ``map[code] * scale``, as in bitsandbytes.

**Blocks.** A state of ``n`` float32 elements is cut into blocks of ``BLOCK`` = 256
elements in memory order (the last one ragged); each block stores one float32 scale, its
absmax.

**Quantizing a block** ``x`` (float32 arithmetic throughout)::

    absmax = max(|x|)                       # NaN propagates (torch.amax)
    inv    = absmax < 2**-126 ? 0 : 1 / absmax      # NaN < ... is false: inv = NaN
    v      = x * inv
    mid[j] = (map[j] + map[j + 1]) / 2      # j = 0 … 254: float32 sum, then halved
    code   = count(j : mid[j] < v)          # the nearest map value, a tie to the lower
                                            # code; a NaN v counts 0
    scale  = absmax

For every block whose absmax is a normal float32 this is bit for bit bitsandbytes' torch
("default") backend of ``quantize_blockwise``: the nearest code by midpoints, ties to the
lower, an all-zero block coded as the map's 0.0. (Its native CPU kernel instead looks
``v`` up in a 65536-entry table over [-1, 1]; the table cannot resolve the map's values
below about 3e-5 and codes 0.0 in a nonzero block as about 2e-5 times the scale, so
ferroptim keeps the exact nearest code; tests/test_q8_format.py states and checks both
rules.) A block whose absmax is below the smallest normal float32 (zero or subnormal)
codes every element as 0.0, so it dequantizes to zeros: ``1 / absmax`` would overflow to
inf there (and ``0 * inf`` is NaN), and such states are far below any optimizer's
epsilon. A block holding a NaN gets a NaN scale (it dequantizes to NaN); one holding an
infinity gets an infinite scale.

**Dequantizing**: ``map[code] * scale`` in float32.

**Packed layout** of one state (a 1-D ``torch.uint8`` tensor of ``packed_len(n)`` bytes):
the ``n`` codes, zero bytes up to a multiple of 4, then ``ceil(n / 256)`` float32 scales
in native byte order (little-endian on every platform ferroptim builds for).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "FLT_MIN",
    "codes_and_scales",
    "dequantize",
    "dynamic_map",
    "midpoints",
    "n_blocks",
    "packed_len",
    "quantize",
]

BLOCK = 256
"""Elements per block: one float32 scale per ``BLOCK`` codes."""

FLT_MIN = 2.0**-126
"""The smallest normal float32: a block of a smaller absmax is coded as zeros."""

# Elements per slice of quantize/dequantize: whole blocks, so the temporaries (a few
# bytes per element: the float32 copy, v, int32 codes) stay a constant size however big
# the state is.
_SLICE = BLOCK * 16384


@lru_cache(maxsize=2)
def _map_cpu(signed: bool) -> Tensor:
    # The formula of bitsandbytes' functional.create_dynamic_map(signed, max_exponent_bits=7,
    # total_bits=8) (bitsandbytes, MIT licence, © Tim Dettmers and contributors), with the
    # same float32 torch ops, so the values match it bit for bit. Exponent i covers the
    # decade 10**(-6 + i) with 2**i (signed: mirrored) or 2**(i + 1) (unsigned) values:
    # the midpoints of a linspace over [0.1, 1]. The 8-bit case has no extra items.
    data: list[float] = []
    for i in range(7):
        fraction_items = 2**i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    out = torch.tensor(data, dtype=torch.float32)
    assert out.numel() == 256
    return out


@lru_cache(maxsize=16)
def _cached(signed: bool, device: torch.device, what: str) -> Tensor:
    m = _map_cpu(signed)
    if what == "mid":
        m = (m[:-1] + m[1:]) / 2
    return m.to(device)


def dynamic_map(signed: bool, device: torch.device | str | None = None) -> Tensor:
    """The 256 sorted float32 values codes stand for (bitsandbytes' dynamic map).

    Cached per sign and device: the tensor is shared, do not modify it.
    """
    return _cached(signed, torch.device(device if device is not None else "cpu"), "map")


def midpoints(signed: bool, device: torch.device | str | None = None) -> Tensor:
    """The 255 float32 midpoints ``(map[j] + map[j + 1]) / 2`` codes are chosen by (cached)."""
    return _cached(signed, torch.device(device if device is not None else "cpu"), "mid")


def n_blocks(n: int) -> int:
    """Blocks (scales) of a state of ``n`` elements."""
    return -(-n // BLOCK)


def _codes_len(n: int) -> int:
    return -(-n // 4) * 4


def packed_len(n: int) -> int:
    """Bytes of a packed state of ``n`` elements: codes, padding to 4, float32 scales."""
    if n < 0:
        raise ValueError(f"a state has n >= 0 elements, got {n}")
    return _codes_len(n) + 4 * n_blocks(n)


def codes_and_scales(packed: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Views into ``packed``: the uint8 codes ``[n]`` and the float32 scales ``[n_blocks(n)]``.

    Writing through them writes ``packed``.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(
            f"a packed state is a 1-D torch.uint8 tensor, got {packed.dtype} "
            f"of shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_len(n):
        raise ValueError(
            f"a packed state of {n} elements has {packed_len(n)} bytes, got {packed.numel()}"
        )
    if not packed.is_contiguous():
        raise ValueError("a packed state must be contiguous")
    start = _codes_len(n)
    # The scales start at a multiple of 4 bytes from the tensor's start; viewing them as
    # float32 also needs the tensor itself to start 4-aligned in its storage.
    if packed.storage_offset() % 4:
        raise ValueError("a packed state must start at a multiple of 4 bytes in its storage")
    return packed[:n], packed[start:].view(torch.float32)


def _quantize_slice(x: Tensor, mid: Tensor, codes: Tensor, scales: Tensor) -> None:
    """Quantize the float32 slice ``x`` (a whole number of blocks but for a ragged last one)."""
    m = x.numel()
    full = m // BLOCK * BLOCK
    if full < m:
        # Pad the ragged block with zeros: they change neither its absmax nor its codes.
        x = torch.cat([x, x.new_zeros(BLOCK - (m - full))])
    xb = x.view(-1, BLOCK)
    absmax = xb.abs().amax(dim=1)
    # 1 / absmax for a normal absmax (finite: at most 2**126); 0 below (zero, subnormal).
    inv = torch.where(absmax < FLT_MIN, 0.0, 1.0 / absmax)
    v = xb * inv[:, None]
    code = torch.searchsorted(mid, v.view(-1), out_int32=True)  # count(mid < v)
    # searchsorted puts NaN past the end; the contract's count of mid < NaN is 0.
    code = code.masked_fill_(torch.isnan(v.view(-1)), 0)
    codes.copy_(code[:m])
    scales.copy_(absmax)


def quantize(values: Tensor, signed: bool) -> Tensor:
    """Quantize ``values`` to a packed 8-bit blockwise state (1-D uint8, same device).

    ``values`` is any floating tensor; it is converted to float32 and quantized in the
    order of ``values.reshape(-1)`` (row-major), which is its memory order when it is
    contiguous (the order the Rust kernels use). ``signed`` picks the signed map (states
    of either sign) or the unsigned one (non-negative states: a negative value is coded
    as 0.0).
    """
    if not values.is_floating_point():
        raise TypeError(f"8-bit states quantize floating tensors, got {values.dtype}")
    flat = values.reshape(-1)
    n = flat.numel()
    packed = torch.empty(packed_len(n), dtype=torch.uint8, device=values.device)
    codes, scales = codes_and_scales(packed, n)
    packed[n : _codes_len(n)] = 0
    mid = midpoints(signed, values.device)
    for start in range(0, n, _SLICE):
        stop = min(start + _SLICE, n)
        x = flat[start:stop].to(torch.float32)
        _quantize_slice(x, mid, codes[start:stop], scales[start // BLOCK : n_blocks(stop)])
    return packed


def dequantize(packed: Tensor, n: int, signed: bool) -> Tensor:
    """The float32 values (1-D, ``n`` elements, ``packed``'s device) of a packed state."""
    codes, scales = codes_and_scales(packed, n)
    table = dynamic_map(signed, packed.device)
    out = torch.empty(n, dtype=torch.float32, device=packed.device)
    for start in range(0, n, _SLICE):
        stop = min(start + _SLICE, n)
        vals = table[codes[start:stop].to(torch.int64)]
        scale = scales[start // BLOCK : n_blocks(stop)].repeat_interleave(BLOCK)[: stop - start]
        torch.mul(vals, scale, out=out[start:stop])
    return out
