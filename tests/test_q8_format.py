"""The 8-bit blockwise state format (``ferroptim._q8``) against bitsandbytes 0.50.2.

* the maps are bitsandbytes' ``create_dynamic_map(signed=...)`` bit for bit;
* codes and scales are bit for bit those of bitsandbytes' torch ("default") backend of
  ``quantize_blockwise`` (blocksize 256), dequantized values those of its native CPU
  ``dequantize_blockwise``: normal and heavy-tailed data, all-zero blocks, ragged
  lengths, the signed map on signed data and the unsigned map on non-negative data;
* bitsandbytes' native CPU ``quantize_blockwise`` uses another rule (a 65536-entry lookup
  table over [-1, 1], written out in :func:`bnb_native_cpu_codes`): it is checked to be
  exactly that rule, and ferroptim's code to be never farther from the value than its;
* properties (hypothesis): the code is the nearest map value, the round-trip error is
  within half the local gap of the map times the scale, map values times a scale are
  coded exactly, signs and zeros are kept, the packed layout and its edge cases.
"""

from __future__ import annotations

import importlib
import math
import struct
from functools import cache
from types import ModuleType

import pytest
import torch
from ferroptim import _q8
from hypothesis import given, settings
from hypothesis import strategies as st

LENGTHS = [1, 255, 256, 257, 4097, 70000]
KINDS = ["normal", "heavy", "zero_blocks"]


@cache
def bnb() -> ModuleType:
    """``bitsandbytes.functional``, imported on first use (the import takes seconds)."""
    return importlib.import_module("bitsandbytes.functional")


def bnb_default_quantize(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' torch backend of quantize_blockwise: (codes, absmax)."""
    # bitsandbytes dispatches quantize_blockwise on CPU tensors to its native kernel; its
    # torch implementation is the op's CompositeExplicitAutograd ("default") kernel.
    bnb()
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    default = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return op.redispatch(default, x, code, _q8.BLOCK)


def bnb_native_cpu_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The rule of bitsandbytes 0.50's native CPU kernel (csrc/cpu_ops.cpp,
    quantize_cpu_impl), in float32: a table of 65536 entries, entry i the count of
    midpoints ``0.5 * (code[j] + code[j + 1])`` below ``-1 + 2 * i / 65535``; an element
    takes entry ``trunc((clamp(x * (1 / absmax), -1, 1) + 1) * 0.5 * 65535 + 0.5)`` of it,
    and an all-zero block codes 0 (not the code of 0.0)."""
    mid = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    table = torch.searchsorted(mid, grid)
    n = x.numel()
    xb = torch.cat([x, x.new_zeros(-n % _q8.BLOCK)]).view(-1, _q8.BLOCK)
    absmax = xb.abs().amax(dim=1, keepdim=True)
    v = (xb * (1.0 / absmax)).clamp(-1.0, 1.0).nan_to_num(0.0)  # (zero blocks: 0 * inf)
    out = table[((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)]
    return torch.where(absmax == 0, 0, out).view(-1)[:n].to(torch.uint8)


def make_data(kind: str, n: int, signed: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "heavy":
        # Values spread over many decades inside one block: the small codes of the map.
        x = x * torch.randn(n, generator=g).exp() ** 3
    elif kind == "zero_blocks":
        x = x * 1e-3
        x[: min(n, 256)] = 0.0  # one all-zero (or all-zero ragged) block
        x[512:768] = 0.0
        x[1000:1100] = 0.0  # zeros inside a nonzero block
    return x if signed else x.square()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


# --- the maps -----------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes_dynamic_maps(signed: bool) -> None:
    ours = _q8.dynamic_map(signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(bits(ours), bits(bnb().create_dynamic_map(signed=signed)))
    assert bool((ours[1:] > ours[:-1]).all())  # sorted, 256 distinct values
    assert ours[-1].item() == 1.0 and 0.0 in ours.tolist()
    # float32(-0.99296875) = -0.992968738…: the mean of 0.9859375 and 1 (in float32).
    assert ours[0].item() == (torch.tensor(-0.99296875).item() if signed else 0.0)
    assert _q8.dynamic_map(signed) is ours  # cached
    mid = _q8.midpoints(signed)
    assert torch.equal(mid, (ours[:-1] + ours[1:]) / 2)


# --- against bitsandbytes -----------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", LENGTHS)
def test_codes_and_scales_match_bitsandbytes(n: int, kind: str, signed: bool) -> None:
    x = make_data(kind, n, signed, seed=n)
    code = _q8.dynamic_map(signed)
    packed = _q8.quantize(x, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (_q8.packed_len(n),)
    codes, scales = _q8.codes_and_scales(packed, n)

    ref_codes, ref_absmax = bnb_default_quantize(x, code)
    assert torch.equal(codes, ref_codes)
    # (bitsandbytes' torch backend stores a ragged last block's absmax floored at 1e-38:
    # 1e-38 for an all-zero one; it divides that block by it, where it multiplies the
    # others by 1 / absmax: the codes agree all the same.)
    if n % _q8.BLOCK:
        ref_absmax[-1] = scales[-1] if ref_absmax[-1] == torch.tensor(1e-38) else ref_absmax[-1]
    assert torch.equal(bits(scales), bits(ref_absmax))

    # The public, native CPU path: the same absmax, its own (table) rule for the codes.
    nat_codes, state = bnb().quantize_blockwise(x, code=code.clone(), blocksize=_q8.BLOCK)
    assert torch.equal(bits(scales), bits(state.absmax))
    assert torch.equal(nat_codes, bnb_native_cpu_codes(x, code))
    # Ours is the nearest code: never farther from x / absmax than the table's (up to
    # the float32 rounding of the midpoints, 6e-8 relative).
    v = (x.double() / scales.double().repeat_interleave(_q8.BLOCK)[:n]).nan_to_num(0.0)
    ours_err = (code.double()[codes.long()] - v).abs()
    nat_err = (code.double()[nat_codes.long()] - v).abs()
    assert bool((ours_err <= nat_err + 1e-7 * v.abs()).all())

    # Dequantized: bit for bit bitsandbytes' native dequantize_blockwise of our codes.
    ours = _q8.dequantize(packed, n, signed)
    ref = bnb().dequantize_blockwise(
        codes.clone(), absmax=scales.clone(), code=code.clone(), blocksize=_q8.BLOCK
    )
    assert ours.dtype == torch.float32 and ours.shape == (n,)
    assert torch.equal(bits(ours), bits(ref))


def _blocks_with_absmax(absmax: float, values: torch.Tensor) -> torch.Tensor:
    """Whole blocks of ``values`` (each at most ``absmax`` in size), each led by ``absmax``."""
    body = values.split(_q8.BLOCK - 1)
    x = torch.cat([torch.cat([torch.tensor([absmax]), b]) for b in body])
    return torch.cat([x, x.new_zeros(-x.numel() % _q8.BLOCK)])


@pytest.mark.parametrize("signed", [True, False])
def test_ties_and_the_float32_inverse_as_bitsandbytes(signed: bool) -> None:
    """The rounding rule at its edges, bit for bit bitsandbytes' torch backend (whole
    blocks): a value on a midpoint takes the lower code, v is x times the float32
    1 / absmax (not x / absmax: they differ in the last bit, and that moves codes next
    to a midpoint), the comparison is with the float32 midpoint."""
    code = _q8.dynamic_map(signed)
    mid = _q8.midpoints(signed)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    near = torch.cat([mid, torch.nextafter(mid, down), torch.nextafter(mid, up), code])
    x = _blocks_with_absmax(1.0, near)
    codes, _ = _q8.codes_and_scales(_q8.quantize(x, signed), x.numel())
    assert torch.equal(codes, bnb_default_quantize(x, code)[0])
    on_mid = torch.isin(x, mid)
    assert bool(on_mid.any())
    lower = torch.searchsorted(code, x, right=True) - 1  # the map value below a midpoint
    assert torch.equal(codes[on_mid].long(), lower[on_mid])

    moved = 0
    for absmax in (3.0, 5.0, 7.0, 0.1, 1e-3, 123.456):
        a = torch.tensor(absmax)
        inv = 1.0 / a
        # Values whose x * (1 / a) and x / a lie on either side of a midpoint.
        cand = torch.cat([torch.nextafter(mid * a, up), mid * a, torch.nextafter(mid * a, down)])
        cand = cand[torch.searchsorted(mid, cand * inv) != torch.searchsorted(mid, cand / a)]
        moved += cand.numel()
        x = _blocks_with_absmax(absmax, cand)
        codes, scales = _q8.codes_and_scales(_q8.quantize(x, signed), x.numel())
        ref_codes, ref_absmax = bnb_default_quantize(x, code)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_absmax)
    assert moved > 50  # the two ways of scaling do differ on these values


def test_bitsandbytes_native_table_differs_from_nearest() -> None:
    """What the native CPU rule costs (why ferroptim does not follow it): the codes
    differ, zeros in a nonzero block come back nonzero, small values lose their codes."""
    x = make_data("heavy", 70000, True, seed=3)
    x[5] = 0.0
    code = _q8.dynamic_map(True)
    nat_codes, state = bnb().quantize_blockwise(x, code=code.clone(), blocksize=_q8.BLOCK)
    packed = _q8.quantize(x, True)
    codes, _ = _q8.codes_and_scales(packed, x.numel())
    assert (codes != nat_codes).sum().item() > 1000
    assert bnb().dequantize_blockwise(nat_codes, state)[5].item() != 0.0
    assert _q8.dequantize(packed, x.numel(), True)[5].item() == 0.0


# --- properties ---------------------------------------------------------------------

# Values times 2**±100 stay finite in float32; subnormal values (and blocks) do occur.
finite_f32 = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


def _blocks_of(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return scales.repeat_interleave(_q8.BLOCK)[: x.numel()]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite_f32, min_size=1, max_size=700),
    scale_exp=st.integers(min_value=-100, max_value=100),
    signed=st.booleans(),
)
def test_nearest_code_and_round_trip_error(
    values: list[float], scale_exp: int, signed: bool
) -> None:
    x = torch.tensor(values, dtype=torch.float32) * 2.0**scale_exp
    x = x if signed else x.abs()
    n = x.numel()
    packed = _q8.quantize(x, signed)
    codes, scales = _q8.codes_and_scales(packed, n)
    code = _q8.dynamic_map(signed).double()
    scale = _blocks_of(x, scales).double()
    assert torch.equal(
        scales,
        x.view(-1)
        .abs()
        .new_tensor([x[i : i + _q8.BLOCK].abs().max().item() for i in range(0, n, _q8.BLOCK)]),
    )

    # The code is the nearest map value to v = x / absmax (within the midpoints' rounding).
    normal = scale >= _q8.FLT_MIN
    v = torch.where(normal, x.double() / scale, 0.0)
    dist = (code[None, :] - v[:, None]).abs()
    err = dist.gather(1, codes.long()[:, None]).squeeze(1)
    assert bool((err <= dist.min(dim=1).values + 1e-7 * v.abs() + 1e-300).all())

    # Round trip: within half the map's local gap times the scale (v outside the map's
    # range, below -0.99296875, within its distance to the end), plus float32 rounding.
    lo = (torch.searchsorted(code, v, right=True) - 1).clamp(0, 254)
    half_gap = torch.maximum((code[lo + 1] - code[lo]) / 2, code[0] - v)
    out = _q8.dequantize(packed, n, signed).double()
    bound = half_gap * scale + 4 * 2.0**-24 * x.double().abs() + 2.0**-149
    assert bool(((out - x.double()).abs() <= torch.where(normal, bound, scale)).all())
    # Signs kept (or rounded to zero), zeros and block maxima exact.
    assert bool((out * x.double() >= 0).all())
    assert bool((out[x == 0] == 0).all())
    top = (x == scale.float()) & normal
    assert torch.equal(out[top], x.double()[top])


@settings(max_examples=60, deadline=None)
@given(
    picks=st.lists(st.integers(min_value=0, max_value=254), min_size=1, max_size=600),
    scale=st.floats(min_value=2.0**-100, max_value=2.0**100, width=32),
    signed=st.booleans(),
)
def test_map_values_times_scale_are_exact(picks: list[int], scale: float, signed: bool) -> None:
    """x = map[k] * s (with map[255] = 1.0 in every block so absmax = s) codes as k and
    dequantizes to x exactly, for any normal scale."""
    n = len(picks)
    k = torch.tensor(picks, dtype=torch.int64)
    k[:: _q8.BLOCK] = 255
    code = _q8.dynamic_map(signed)
    x = code[k] * torch.tensor(scale, dtype=torch.float32)
    packed = _q8.quantize(x, signed)
    codes, scales = _q8.codes_and_scales(packed, n)
    assert torch.equal(scales, torch.full_like(scales, scale))
    assert torch.equal(codes.long(), k)
    assert torch.equal(bits(_q8.dequantize(packed, n, signed)), bits(x))


@pytest.mark.parametrize("signed", [True, False])
def test_block_maxima_and_unsigned_negatives(signed: bool) -> None:
    x = torch.tensor([3.0, -1.5, 0.0, 1e-9] * 64 + [-7.0, 2.0])
    packed = _q8.quantize(x, signed)
    codes, scales = _q8.codes_and_scales(packed, x.numel())
    assert scales.tolist() == [3.0, 7.0]
    out = _q8.dequantize(packed, x.numel(), signed)
    assert out[0].item() == 3.0 and codes[0].item() == 255
    if signed:
        lowest = _q8.dynamic_map(True)[0]
        assert codes[256].item() == 0 and out[256].item() == (lowest * 7.0).item()
        assert out[1].item() < 0
    else:
        # The unsigned map has no negative values: a negative value is coded as 0.0.
        assert codes[1].item() == 0 and out[1].item() == 0.0 and out[256].item() == 0.0


def test_packed_layout() -> None:
    for n, length in [
        (0, 0),
        (1, 8),
        (3, 8),
        (4, 8),
        (255, 260),
        (256, 260),
        (257, 268),
        (1024, 1040),
        (70000, 70000 + 4 * 274),
    ]:
        assert _q8.packed_len(n) == length, n
        assert _q8.n_blocks(n) == math.ceil(n / 256)
    x = torch.linspace(-2.0, 5.0, 257)
    packed = _q8.quantize(x, True)
    assert packed.numel() == 268
    assert packed[257:260].tolist() == [0, 0, 0]  # padding bytes are zeros
    # The scales: float32, little-endian, right after the padding.
    expected = struct.pack("<2f", x[:256].abs().max().item(), 5.0)
    assert packed[260:].numpy().tobytes() == expected
    codes, scales = _q8.codes_and_scales(packed, 257)
    assert codes.data_ptr() == packed.data_ptr() and codes.shape == (257,)
    scales[1] = 2.0  # views: writing them writes the packed state
    assert packed[264:].view(torch.float32).item() == 2.0
    with pytest.raises(ValueError):
        _q8.codes_and_scales(packed[:-4], 257)
    with pytest.raises(TypeError):
        _q8.codes_and_scales(packed.view(torch.int32), 67)
    with pytest.raises(TypeError):
        _q8.quantize(torch.arange(5), True)


def test_empty_and_shapes_and_dtypes() -> None:
    empty = _q8.quantize(torch.empty(0), True)
    assert empty.dtype == torch.uint8 and empty.numel() == 0
    assert _q8.dequantize(empty, 0, True).shape == (0,)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 40, generator=g)
    flat = _q8.quantize(x.reshape(-1), True)
    assert torch.equal(_q8.quantize(x, True), flat)  # any shape: flat memory order
    assert torch.equal(_q8.quantize(x.double(), True), _q8.quantize(x.double().float(), True))
    xb = x.bfloat16()
    assert torch.equal(_q8.quantize(xb, True), _q8.quantize(xb.float(), True))
    # A non-contiguous tensor quantizes in its row-major (reshape(-1)) order.
    assert torch.equal(_q8.quantize(x.t(), True), _q8.quantize(x.t().contiguous(), True))


@pytest.mark.parametrize("signed", [True, False])
def test_slices_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch, signed: bool) -> None:
    x = make_data("heavy", 5000, signed, seed=11)
    whole = _q8.quantize(x, signed)
    monkeypatch.setattr(_q8, "_SLICE", 3 * _q8.BLOCK)  # ragged tails cross slices
    assert torch.equal(_q8.quantize(x, signed), whole)
    assert torch.equal(
        _q8.dequantize(whole, 5000, signed), _q8.dequantize(whole.clone(), 5000, signed)
    )
    monkeypatch.undo()
    assert torch.equal(_q8.dequantize(whole, 5000, signed), _q8.dequantize(whole, 5000, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_non_finite_and_tiny_blocks(signed: bool) -> None:
    x = torch.full((1280,), 0.5)
    x[3] = float("nan")  # block 0: NaN scale, every code 0, dequantized NaN
    x[256:512] = torch.linspace(0.0, 1e-39, 256)  # block 1: subnormal absmax -> zeros
    x[600] = float("inf")  # block 2: infinite scale; finite values code as 0.0
    packed = _q8.quantize(x, signed)
    codes, scales = _q8.codes_and_scales(packed, 1280)
    zero = _q8.dynamic_map(signed).tolist().index(0.0)
    assert math.isnan(scales[0].item()) and bool((codes[:256] == 0).all())
    assert scales[1].item() == x[511].item() and bool((codes[256:512] == zero).all())
    assert scales[2].item() == math.inf and codes[600].item() == 0
    assert bool((codes[512:768][torch.arange(256) != 88] == zero).all())
    out = _q8.dequantize(packed, 1280, signed)
    assert bool(out[:256].isnan().all())
    assert bool((out[256:512] == 0).all())
    # The other blocks are untouched by their neighbours.
    assert torch.equal(out[768:], _q8.dequantize(_q8.quantize(x[768:], signed), 512, signed))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("signed", [True, False])
def test_cuda_matches_cpu(signed: bool) -> None:
    x = make_data("heavy", 70001, signed, seed=5)
    x[:256] = 0.0
    x[300] = float("nan")
    cpu = _q8.quantize(x, signed)
    gpu = _q8.quantize(x.cuda(), signed)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    out = _q8.dequantize(gpu, 70001, signed)
    assert out.device.type == "cuda"
    assert torch.equal(bits(out.cpu()), bits(_q8.dequantize(cpu, 70001, signed)))
