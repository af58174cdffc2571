"""Lower precision on every element-wise ferroptim optimizer: ``state_dtype``,
``master_weights``, ``stochastic_rounding`` and their ``seed``.

A group with ``state_dtype=torch.bfloat16`` keeps every floating state buffer of its
float32 params (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ``square_avg``, …) in
bfloat16: 2 bytes per element instead of 4. Each step loads them into float32, computes
the update exactly as the float32 optimizer does (the same kernel, torch's order), and
stores them back with **stochastic rounding**: up to the next bfloat16 with probability
equal to the fraction of the gap the float32 value covers, so the rounding is unbiased
and small updates (``(1 - beta2) * grad**2`` against a large ``exp_avg_sq``) are not
rounded away. In Rust this happens inside the step's single pass (20 bytes per element
for AdamW instead of 28).

bfloat16 and float16 params: with ``master_weights=True`` each keeps a float32 copy in
``state["master_param"]`` that steps exactly as the float32 optimizer's param (its states
float32, or ``state_dtype``), and the param is written as the master rounded to nearest;
with ``stochastic_rounding=True`` the param and its states (in the param's dtype) are
stored stochastically rounded. On torch's path (other devices, ``set_backend("torch")``)
torch's float32 step runs on a stand-in (the master copy, or a float32 copy of the param:
:func:`stand_ins`) and the param is stored back from it (:func:`store_params`); with
``differentiable=True`` or on tensor subclasses (DTensor) a param of such a group raises.

The random bits are a pure function of (seed, the group's index and its step counter,
the param's index in its group, the buffer, the element's index in memory order): the
same for any thread count and SIMD level, on Rust's path and torch's (other devices,
``set_backend("torch")``) alike, and reproducible from the checkpoint. The seed defaults
to ``torch.initial_seed()`` (so ``torch.manual_seed`` fixes it; nothing is drawn from
torch's generator) or is given as ``seed=``.

``state_dtype="8bit"`` keeps the moment states (``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``, ``square_avg``, ``sum``, … : :data:`QUANTIZED_STATES`) of params of
at least ``min_8bit_size`` elements (a constructor keyword and param-group key, default
4096, as bitsandbytes)
8-bit blockwise quantized (:mod:`ferroptim._q8`: bitsandbytes' dynamic maps, one float32
scale per 256 elements), each a packed uint8 tensor in the state; the other states and
smaller params' states stay full precision (float32 for bfloat16/float16 params). The
Rust step dequantizes, updates and requantizes each block in its one pass.
``state_dict()`` holds the dequantized states (loadable by torch.optim and any
ferroptim optimizer); ``state_dict(compact=True)`` the packed ones. A sharded (FSDP2,
DTensor) param's states quantize per shard: each rank packs its local shard, and
``state_dict()`` gives them back as DTensors sharded like the param (what
``torch.distributed.checkpoint`` saves); a compact state_dict holds each rank's own
packed shards (save it per rank).

Param-group keys, each present only when set (so default groups keep torch's keys):
``state_dtype`` (with ``min_8bit_size`` for 8-bit states), ``master_weights``,
``stochastic_rounding``, and ``seed`` with
``rounding_step`` (the counter) where anything is rounded stochastically. In a
checkpoint the states keep torch's keys: ``torch.optim`` loads it (it casts states to the
param's dtype), and a ferroptim optimizer loads any checkpoint into its own settings
(the constructor's choice wins over the checkpoint's; float32 masters and states of
low-precision params are kept float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, TypeGuard

import torch
from torch import Tensor

from ferroptim import _q8
from ferroptim._layout import is_dense, is_lazy, laid_out_like
from ferroptim._torch_compat import is_dtensor, local

if TYPE_CHECKING:
    from ferroptim._spec import OptimizerSpec

__all__ = [
    "STATE_DTYPE_KEY",
    "LowPrecisionMixin",
    "quantized_keys",
    "round_new_states",
    "rounding_key",
    "state_dtype_for",
    "stochastic_round",
    "stream_index",
]

STATE_DTYPE_KEY = "state_dtype"
#: ``state_dtype`` of 8-bit blockwise states.
EIGHT_BIT = "8bit"
#: Params with fewer elements keep full-precision states under ``state_dtype="8bit"``.
MIN_8BIT_KEY = "min_8bit_size"
DEFAULT_MIN_8BIT_SIZE = 4096
#: The state buffers ``state_dtype="8bit"`` quantizes, by key: True for the signed map
#: (states of either sign: first moments, momentum), False for the unsigned one
#: (non-negative states: second moments, accumulators). Any other state (ASGD's ``ax``,
#: Rprop's ``prev`` and ``step_size``, Adan's ``previous_grad``, Schedule-Free's ``z``:
#: values like params or gradients, not moments) stays full precision.
QUANTIZED_STATES: dict[str, bool] = {
    "exp_avg": True,
    "exp_avg_slow": True,
    "exp_avg_diff": True,
    "momentum_buffer": True,
    "grad_avg": True,
    "exp_avg_sq": False,
    "max_exp_avg_sq": False,
    "exp_inf": False,
    "square_avg": False,
    "sum": False,
    "acc_delta": False,
}
ROUNDING_KEY = "stochastic_rounding"
MASTER_KEY = "master_weights"
#: The state key of a low-precision param's float32 master copy.
MASTER_STATE = "master_param"
SEED_KEY = "seed"
COUNTER_KEY = "rounding_step"
_SETTINGS = (STATE_DTYPE_KEY, MIN_8BIT_KEY, ROUNDING_KEY, MASTER_KEY)
#: Param dtypes whose steps ``stochastic_rounding`` and ``master_weights`` change.
LOW_PARAM_DTYPES = (torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.bfloat16,)
_MASK32 = 0xFFFF_FFFF
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_GOLDEN = 0x9E37_79B9_7F4A_7C15
#: The buffer number of a param's own store in the random streams (rust/engine/random.rs).
PARAM_STREAM = 15


def check_state_dtype(value: Any) -> torch.dtype | str | None:
    if value is None:
        return None
    if isinstance(value, str) and value == EIGHT_BIT:
        return EIGHT_BIT
    if value not in _STATE_DTYPES:
        raise ValueError(
            f"state_dtype must be None, torch.bfloat16 or '8bit', got {value!r} (float16 "
            "states are not supported)"
        )
    return torch.bfloat16


def _check_min_8bit_size(value: Any, dtype: torch.dtype | str | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"min_8bit_size must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"min_8bit_size must be >= 0, got {value}")
    if dtype != EIGHT_BIT and value != DEFAULT_MIN_8BIT_SIZE:
        raise ValueError("min_8bit_size applies to 8-bit states: give state_dtype='8bit' too")


def _check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {value!r}")
    return value & _MASK64


# -- the counter-based generator (mirrors rust/engine/random.rs bit for bit) ------------


def mix64(x: int) -> int:
    """splitmix64: one step of the generator, a bijective 64-bit mix."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _MASK64
    return z ^ (z >> 31)


def step_key(seed: int, group_index: int, counter: int) -> int:
    """The per-step key of a group's random streams."""
    return mix64(mix64(mix64(seed) ^ group_index) ^ counter)


def block_key(key: int, stream: int, buffer: int, high: int) -> int:
    """The 32-bit key of one buffer's elements ``high << 32 ..`` of tensor ``stream``."""
    return mix64(mix64(key ^ mix64(stream)) ^ ((high << 4) | buffer)) & _MASK32


def _mul32(x: Tensor, constant: int) -> Tensor:
    # x * constant mod 2^32 without int64 overflow: 16-bit halves of the constant.
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB_352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846C_A68B)
    return x ^ (x >> 16)


def random_bits(index: Tensor, key: int, stream: int, buffer: int) -> Tensor:
    """The random bits (int64 tensor; the low 16 are what a bfloat16 store uses) of the
    elements whose index in their tensor is ``index``, for state buffer ``buffer`` (or
    :data:`PARAM_STREAM`) in the step keyed ``key``: one 32-bit word per pair of state
    buffers, its low half for the even buffer, its high half for the odd one."""
    highs = index >> 32
    top = int(highs.max()) if index.numel() else 0
    word_number = PARAM_STREAM if buffer == PARAM_STREAM else buffer // 2
    shift = 16 if buffer != PARAM_STREAM and buffer % 2 else 0
    bits = torch.empty_like(index)
    for high in range(top + 1):
        word = block_key(key, stream, word_number, high)
        values = _mix32((index & _MASK32) ^ word) >> shift
        bits = values if top == 0 else torch.where(highs == high, values, bits)
    return bits


def memory_index(t: Tensor) -> Tensor:
    """Each element's index in the memory order of ``t`` (dense, non-overlapping), as
    the Rust kernel walks it: int64, shaped like ``t``."""
    n = t.numel()
    index = torch.arange(n, dtype=torch.int64, device=t.device)
    if t.is_contiguous() or t.dim() == 0:
        return index.view(t.shape)
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda d: (-strides[d], -d))
    inverse = [order.index(d) for d in range(t.dim())]
    return index.view([t.shape[d] for d in order]).permute(inverse)


def stream_index(param: Tensor) -> Tensor:
    """The index each element of ``param`` (and so of its states, whatever their own
    layout) has in its random stream: its place in the memory the Rust kernel walks (a
    dense param in place, in memory order; any other in a row-major staged copy)."""
    if param.is_contiguous() or not is_dense(param) or is_lazy(param):
        return torch.arange(param.numel(), dtype=torch.int64, device=param.device).view(param.shape)
    return memory_index(param)


def stochastic_round(x: Tensor, dtype: torch.dtype, bits: Tensor) -> Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` (bfloat16 or float16) with the
    low 16 of ``bits`` (rust's ``Storage::store_stochastic``): up to the next value with
    probability equal to the fraction of the gap ``x`` covers."""
    if x.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"stochastic rounding of {x.dtype} to {dtype} is not supported")
    if dtype == torch.float16:
        return _round_float16(x, bits)
    # bfloat16: the random bits added to the float32 bit pattern, the low 16 dropped
    raw = x.view(torch.int32).to(torch.int64) & _MASK32
    raised = ((raw + (bits & 0xFFFF)) >> 16) & 0xFFFF
    out = _as_16_bit(raised, torch.bfloat16)
    return torch.where(torch.isnan(x), torch.full_like(out, float("nan")), out)


def _as_16_bit(pattern: Tensor, dtype: torch.dtype) -> Tensor:
    """int64 tensor of 16-bit patterns viewed as ``dtype``."""
    signed = pattern - ((pattern >> 15) << 16)  # as int16's two's complement
    return signed.to(torch.int16).view(dtype)


def _round_float16(x: Tensor, bits: Tensor) -> Tensor:
    """float16: between the two values around ``x`` (a power-of-two gap, so the fraction
    is exact), up when ``(bits & 0xFFFF) / 2^16`` is below the fraction; past the largest
    finite value to the finite side; NaN and infinities to nearest."""
    nearest = x.to(torch.float16)
    pattern = nearest.view(torch.int16).to(torch.int64) & 0xFFFF
    toward = torch.where(nearest.float().abs() > x.abs(), pattern - 1, pattern)
    low, high = _as_16_bit(toward, torch.float16), _as_16_bit(toward + 1, torch.float16)
    low_magnitude, high_magnitude = low.float().abs(), high.float().abs()
    fraction = (x.abs() - low_magnitude) / (high_magnitude - low_magnitude)
    threshold = (bits & 0xFFFF).to(torch.float32) * (1.0 / 65536.0)
    out = torch.where((threshold < fraction) & ~torch.isinf(high), high, low)
    keep = ~torch.isfinite(x) | (torch.isinf(nearest) & (x.abs() >= 65520.0))
    return torch.where(keep, nearest, out)


# -- the optimizer's side ---------------------------------------------------------------


def has_master(group: dict[str, Any], param: Tensor) -> bool:
    """Whether the group keeps a float32 master copy of ``param``."""
    return bool(group.get(MASTER_KEY)) and param.dtype in LOW_PARAM_DTYPES


def rounds_param(group: dict[str, Any], param: Tensor) -> bool:
    """Whether the group stores ``param``'s update stochastically rounded."""
    return bool(group.get(ROUNDING_KEY)) and param.dtype in LOW_PARAM_DTYPES


def low_params(group: dict[str, Any]) -> bool:
    """Whether the group steps bfloat16 params its own way (master copies or
    stochastic rounding) rather than as torch's for-loop does."""
    return bool(group.get(MASTER_KEY) or group.get(ROUNDING_KEY))


def quantizes(group: dict[str, Any], param: Tensor) -> bool:
    """Whether the group keeps ``param``'s moment states 8-bit (``state_dtype="8bit"``,
    a param of at least ``min_8bit_size`` elements: float32, bfloat16, or float16 with a
    master copy). A DTensor param (FSDP2) counts its global elements, so every rank
    decides alike, and quantizes its local shard: see :func:`pack`."""
    return (
        group.get(STATE_DTYPE_KEY) == EIGHT_BIT
        and (param.dtype in (torch.float32, torch.bfloat16) or has_master(group, param))
        and param.numel() >= int(group.get(MIN_8BIT_KEY, DEFAULT_MIN_8BIT_SIZE))
    )


def quantized_keys(keys: tuple[str, ...], group: dict[str, Any], param: Tensor) -> dict[str, bool]:
    """The state keys among ``keys`` the group keeps 8-bit for ``param``, each with its
    map (True: signed)."""
    if not quantizes(group, param):
        return {}
    return {key: QUANTIZED_STATES[key] for key in keys if key in QUANTIZED_STATES}


def memory_order(values: Tensor, like: Tensor) -> Tensor:
    """``values`` (shaped like ``like``) as a flat vector in the order the Rust kernel
    walks ``like``'s elements: its memory order where it is dense and not lazy (stepped
    in place), row-major otherwise (stepped in a contiguous staged copy)."""
    if like.is_contiguous() or not is_dense(like) or is_lazy(like):
        return values.reshape(-1)
    laid = laid_out_like(values, like)
    return laid.as_strided((laid.numel(),), (1,), laid.storage_offset())


def from_memory_order(flat: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`memory_order`: a tensor of ``dtype`` laid out like ``like``
    holding ``flat``'s values."""
    if like.is_contiguous() or not is_dense(like) or is_lazy(like):
        return flat.to(dtype).reshape(like.shape).clone()
    out = torch.empty_like(like, dtype=dtype)
    out.as_strided((out.numel(),), (1,), out.storage_offset()).copy_(flat)
    return out


def pack(values: Tensor, like: Tensor, signed: bool) -> Tensor:
    """A state shaped like ``like`` quantized to a packed 8-bit state. A DTensor's
    (FSDP2's sharded param's) state packs its local shard, blocks counted from the
    shard's first element, into a plain tensor of the rank's own."""
    shard, values = local(like), local(values)
    if values.shape != shard.shape:
        raise ValueError(
            f"a state of shape {tuple(values.shape)} for the shard of shape "
            f"{tuple(shard.shape)} of a sharded parameter: give it as a DTensor sharded "
            "like the parameter"
        )
    return _q8.quantize(memory_order(values, shard), signed)


def unpack(packed: Tensor, like: Tensor, signed: bool, dtype: torch.dtype) -> Tensor:
    """A packed 8-bit state of ``like``'s elements dequantized (to ``dtype``, laid out like
    ``like``; a DTensor sharded like ``like`` where it is one)."""
    shard = local(like)
    values = from_memory_order(_q8.dequantize(packed, shard.numel(), signed), shard, dtype)
    if not is_dtensor(like):
        return values
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        values,
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def is_packed(value: Any, param: Tensor) -> bool:
    """Whether ``value`` is a packed 8-bit state of ``param``'s elements (of its local
    shard, for a DTensor)."""
    return (
        isinstance(value, Tensor)
        and not is_dtensor(value)
        and value.dtype == torch.uint8
        and value.dim() == 1
        and value.numel() == _q8.packed_len(local(param).numel())
    )


def state_dtype_for(group: dict[str, Any], param: Tensor) -> torch.dtype:
    """The dtype the group keeps ``param``'s floating state buffers in: ``state_dtype``,
    else the dtype the update computes in (float32 for a param with a master copy, the
    param's own otherwise). Under ``state_dtype="8bit"``: that of the states left full
    precision (float32 beside 8-bit states of a param that steps in Rust)."""
    base = torch.float32 if has_master(group, param) else param.dtype
    dtype = group.get(STATE_DTYPE_KEY)
    if dtype == EIGHT_BIT:
        in_rust = base == torch.float32 or rounds_param(group, param)
        return torch.float32 if quantizes(group, param) and in_rust else base
    if dtype is None or base == dtype:
        return base
    if base != torch.float32:
        raise ValueError(
            f"state_dtype={dtype} keeps the states of float32 parameters; a parameter of "
            f"dtype {param.dtype} is in its group (give it a group with state_dtype=None)"
        )
    return dtype


def rounding_key(groups: list[dict[str, Any]], group: dict[str, Any]) -> int | None:
    """The group's per-step key of stochastic rounding, or None where nothing is
    rounded stochastically."""
    if SEED_KEY not in group:
        return None
    index = next(i for i, g in enumerate(groups) if g is group)
    return step_key(int(group[SEED_KEY]), index, int(group[COUNTER_KEY]))


def advance_rounding(groups: list[dict[str, Any]]) -> None:
    """After a step ran: every rounding group's counter moves on."""
    for group in groups:
        if SEED_KEY in group:
            group[COUNTER_KEY] = int(group[COUNTER_KEY]) + 1


def compute_dtype(group: dict[str, Any], param: Tensor) -> torch.dtype:
    """The dtype ``param``'s update computes in: float32 for a bfloat16/float16 param
    with a master copy or stochastic rounding, the param's own otherwise."""
    if param.dtype in LOW_PARAM_DTYPES and low_params(group):
        return torch.float32
    return param.dtype


def _narrower_states(
    optimizer: Any, spec: OptimizerSpec, group: dict[str, Any], params: list[Tensor]
) -> Iterator[tuple[Tensor, dict[str, Any], int, str, Tensor]]:
    """(param, its state, buffer number, key, tensor) for each state tensor of the params
    whose group keeps their states otherwise than in the dtype their update computes in
    (torch's path): narrower (``state_dtype``, or a bfloat16 param's own dtype under
    ``stochastic_rounding``), 8-bit, or float32 beside 8-bit ones."""
    if group.get(STATE_DTYPE_KEY) is None and not low_params(group):
        return
    keys = spec.state_keys(group)
    for p in params:
        state = optimizer.state.get(p)
        if not state or (
            state_dtype_for(group, p) == compute_dtype(group, p) and not quantizes(group, p)
        ):
            continue
        for k, name in enumerate(keys):
            value = state.get(name)
            if isinstance(value, Tensor):
                yield p, state, k, name, value


def widen_states(
    optimizer: Any, spec: OptimizerSpec, group: dict[str, Any], params: list[Tensor]
) -> dict[tuple[int, str], Tensor]:
    """Before torch's step: the group's narrow (or 8-bit) state buffers replaced in the
    state by copies in the dtype the update computes in (:func:`compute_dtype`: the
    param's, or float32 for a bfloat16 param's master copy or stand-in); returns the
    originals, which :func:`narrow_states` writes back into."""
    saved: dict[tuple[int, str], Tensor] = {}
    eight_bit = group.get(STATE_DTYPE_KEY) == EIGHT_BIT
    for p, state, _, name, narrow in _narrower_states(optimizer, spec, group, params):
        wide = compute_dtype(group, p)
        if is_packed(narrow, p) and name in QUANTIZED_STATES:
            saved[(id(p), name)] = narrow
            state[name] = unpack(narrow, p.detach(), QUANTIZED_STATES[name], wide)
        elif narrow.dtype != wide and (narrow.dtype == state_dtype_for(group, p) or eight_bit):
            saved[(id(p), name)] = narrow
            state[name] = narrow.to(wide)
    return saved


def round_new_states(
    optimizer: Any,
    spec: OptimizerSpec,
    group: dict[str, Any],
    params: list[Tensor],
    widened: dict[tuple[int, str], Tensor],
) -> None:
    """Before torch's step: state buffers just made in the param's dtype (by torch's
    ``_init_group``: zeros, Adagrad's initial accumulator, Rprop's step sizes,
    Schedule-Free's ``z``) take the values they have in ``state_dtype`` (rounded to
    nearest, or quantized and dequantized, in place), as the Rust path stores them
    before its first update."""
    dtype = group.get(STATE_DTYPE_KEY)
    for p, _, _, name, value in _narrower_states(optimizer, spec, group, params):
        if value.dtype != compute_dtype(group, p) or (id(p), name) in widened:
            continue
        with torch.no_grad():
            if dtype != EIGHT_BIT:
                value.copy_(value.to(state_dtype_for(group, p)))
                continue
            signed = quantized_keys((name,), group, p).get(name)
            if signed is not None:
                like = p.detach()
                value.copy_(unpack(pack(value, like, signed), like, signed, p.dtype))
            else:
                value.copy_(value.to(state_dtype_for(group, p)))


def narrow_states(
    optimizer: Any,
    spec: OptimizerSpec,
    group: dict[str, Any],
    params: list[Tensor],
    saved: dict[tuple[int, str], Tensor],
) -> None:
    """After torch's step (which ran on states widened to the dtype the update computes
    in, see :func:`widen_states`): each state buffer of the group stored back as the
    group keeps it (quantized to 8 bits, or stochastically rounded to bfloat16/float16),
    into the buffer it was widened from where there is one."""
    eight_bit = group.get(STATE_DTYPE_KEY) == EIGHT_BIT
    key = rounding_key(optimizer.param_groups, group)
    position = {id(p): i for i, p in enumerate(group["params"])}
    for p, state, k, name, wide in list(_narrower_states(optimizer, spec, group, params)):
        if not wide.is_floating_point() or wide.dtype != compute_dtype(group, p):
            continue
        signed = quantized_keys((name,), group, p).get(name) if eight_bit else None
        kept = state_dtype_for(group, p)
        with torch.no_grad():
            if signed is not None:
                narrow = pack(wide, p.detach(), signed)
            elif kept in LOW_PARAM_DTYPES and key is not None and wide.dtype == torch.float32:
                bits = random_bits(stream_index(p.detach()), key, position[id(p)], k)
                narrow = stochastic_round(wide, kept, bits)
            else:
                narrow = wide.to(kept)
        state[name] = _into_original(saved.get((id(p), name)), narrow, wide)


def check_low_grads(group: dict[str, Any], params: list[Tensor]) -> None:
    """Before anything of a step is made or written on torch's path: a bfloat16/float16
    param that steps as a float32 stand-in (:func:`stand_ins`) has a grad like itself, as
    torch's in-place step would insist (``p.grad.data = ...`` skips torch's checks)."""
    for p in params:
        grad = p.grad
        if grad is None or compute_dtype(group, p) == p.dtype:
            continue
        if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
            raise RuntimeError(
                f"a gradient of shape {tuple(grad.shape)}, dtype {grad.dtype} on "
                f"{grad.device} does not match its parameter (shape {tuple(p.shape)}, "
                f"dtype {p.dtype} on {p.device})"
            )


def stand_ins(
    optimizer: Any, group: dict[str, Any], params: list[Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """torch's path for the bfloat16/float16 params of a group with master copies or
    stochastic rounding (grads checked by :func:`check_low_grads`, masters made): (param,
    float32 stand-in) for each such param with a grad. The stand-in is what torch's
    float32 step updates in the param's place: the master copy itself, or a float32 copy
    of the param (rounded back by :func:`store_params`); its grad is the param's, upcast."""
    pairs = []
    for p in params:
        grad = p.grad
        if grad is None or compute_dtype(group, p) == p.dtype:
            continue
        if has_master(group, p):
            stand_in = _master_of(optimizer.state[p], p)
        else:
            stand_in = torch.empty_like(p, dtype=torch.float32, requires_grad=False)
            with torch.no_grad():
                stand_in.copy_(p)
        stand_in.grad = grad.float()
        pairs.append((p, stand_in))
    return pairs


def fits_as_master(master: Any, p: Tensor) -> TypeGuard[Tensor]:
    """Whether ``master`` can be ``p``'s float32 master copy (else one is made from the
    param: the master is only ever more exact than its param)."""
    return (
        isinstance(master, Tensor)
        and master.dtype == torch.float32
        and master.shape == p.shape
        and master.device == p.device
    )


def _master_of(state: dict[str, Any], p: Tensor) -> Tensor:
    """The param's float32 master copy in ``state``: made from the param where there is
    none (an optimizer whose state predates the first step: Adagrad's; a checkpoint
    without one) or it is odd (another dtype, shape or device, a lazily negated or
    conjugated view), as the Rust path makes it."""
    master = state.get(MASTER_STATE)
    if not (fits_as_master(master, p) and not is_lazy(master)):
        master = torch.empty_like(p, dtype=torch.float32, requires_grad=False)
        with torch.no_grad():
            master.copy_(p)
        state[MASTER_STATE] = master
    return master


@contextmanager
def states_of_stand_ins(optimizer: Any, pairs: list[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """While torch's step runs on the stand-ins: each stand-in keyed in the optimizer's
    state to its param's state dict (the same dict, so what the step makes or replaces
    lands in the param's state); the keys are gone afterwards, whatever happens."""
    for p, stand_in in pairs:
        optimizer.state[stand_in] = optimizer.state[p]
    try:
        yield
    finally:
        for _, stand_in in pairs:
            optimizer.state.pop(stand_in, None)


def store_params(optimizer: Any, group: dict[str, Any], pairs: list[tuple[Tensor, Tensor]]) -> None:
    """After torch's step on the stand-ins: each param stored from its stand-in, rounded
    to nearest from a master copy, else stochastically with the param's random stream
    (the Rust kernel's bits); the stand-ins' upcast grads dropped."""
    key = rounding_key(optimizer.param_groups, group)
    position = {id(p): i for i, p in enumerate(group["params"])}
    with torch.no_grad():
        for p, stand_in in pairs:
            stand_in.grad = None
            if has_master(group, p) or key is None:
                p.copy_(stand_in)
                continue
            bits = random_bits(stream_index(p.detach()), key, position[id(p)], PARAM_STREAM)
            p.copy_(stochastic_round(stand_in, p.dtype, bits))


def _into_original(original: Tensor | None, narrow: Tensor, wide: Tensor) -> Tensor:
    """The state buffer to keep after torch's step: ``narrow`` written into the buffer
    the state was widened from where it fits (so references to it stay valid), else
    ``narrow`` itself."""
    if (
        original is None
        or original is wide
        or (original.shape, original.dtype) != (narrow.shape, narrow.dtype)
    ):
        return narrow
    with torch.no_grad():
        original.copy_(narrow)
    return original


class LowPrecisionMixin:
    """``state_dtype`` and ``seed`` for an optimizer class (see module docs)."""

    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]
    _ferro_spec: ClassVar[OptimizerSpec]

    def _lowp_init(
        self,
        state_dtype: Any,
        seed: Any,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
        min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
    ) -> None:
        """Call at the end of ``__init__``: the settings become param-group defaults
        (each left out when off, so default groups keep torch's keys)."""
        dtype = check_state_dtype(state_dtype)
        _check_min_8bit_size(min_8bit_size, dtype)
        if stochastic_rounding not in (False, True) or master_weights not in (False, True):
            raise TypeError("stochastic_rounding and master_weights must be True or False")
        if stochastic_rounding and master_weights:
            raise ValueError(
                "stochastic_rounding and master_weights are two answers to the same "
                "problem: a param with a float32 master copy is its rounding; choose one"
            )
        random = dtype == torch.bfloat16 or stochastic_rounding
        if not random and seed is not None:
            raise ValueError(
                "seed seeds stochastic rounding: give state_dtype or stochastic_rounding too"
            )
        if (dtype is not None or stochastic_rounding or master_weights) and not (
            self._ferro_spec.keeps_state_dtype
        ):
            raise ValueError(
                f"{type(self).__name__} does not support state_dtype, stochastic_rounding "
                "or master_weights"
            )
        settings: dict[str, Any] = {}
        if dtype is not None:
            settings[STATE_DTYPE_KEY] = dtype
        if dtype == EIGHT_BIT:
            settings[MIN_8BIT_KEY] = min_8bit_size
        if stochastic_rounding:
            settings[ROUNDING_KEY] = True
        if master_weights:
            settings[MASTER_KEY] = True
        if random:
            settings[SEED_KEY] = (
                torch.initial_seed() & _MASK64 if seed is None else _check_seed(seed)
            )
            settings[COUNTER_KEY] = 0
        self.defaults.update(settings)
        for group in self.param_groups:
            for name, value in settings.items():
                group.setdefault(name, value)

    def _lowp_dequantize(self, state_dict: dict[str, Any]) -> None:
        """A fresh ``state_dict``'s packed 8-bit states replaced by their float32 values
        shaped like their params (in new per-param dicts: torch's ``state_dict`` shares
        the live ones)."""
        if not any(g.get(STATE_DTYPE_KEY) == EIGHT_BIT for g in self.param_groups):
            return
        states = state_dict["state"]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, state in list(states.items()):
            if not isinstance(index, int) or not 0 <= index < len(params):
                continue
            p = params[index].detach()
            unpacked = {
                key: unpack(value, p, QUANTIZED_STATES[key], torch.float32)
                for key, value in state.items()
                if key in QUANTIZED_STATES and is_packed(value, p)
            }
            if unpacked:
                states[index] = {**state, **unpacked}

    def _lowp_before_load(self, state_dict: dict[str, Any]) -> Any:
        """The groups' settings, and the checkpoint's floating and packed 8-bit state
        tensors (torch's ``load_state_dict`` casts each to its param's dtype, which would
        round a bfloat16 param's float32 master copy and states, and turn codes into
        numbers)."""
        settings = [{k: g[k] for k in _SETTINGS if k in g} for g in self.param_groups]
        tensors = {
            (index, key): value
            for index, state in state_dict.get("state", {}).items()
            for key, value in state.items()
            if isinstance(value, Tensor)
            and (value.is_floating_point() or value.dtype == torch.uint8)
            and key != "step"
        }
        return settings, tensors

    def _lowp_after_load(self, saved: Any) -> None:
        """After torch's ``load_state_dict``: each group keeps the settings it had (the
        constructor's choice wins over the checkpoint's; its seed and counter are
        taken where it has them, so a resumed run draws the same bits), and each
        param's states are converted to the dtype the group keeps them in (to nearest;
        a missing master copy is made on the next step)."""
        settings, tensors = saved
        index = 0
        for group, own in zip(self.param_groups, settings, strict=True):
            for name in _SETTINGS:
                group.pop(name, None)
            group.update(own)
            if own.get(STATE_DTYPE_KEY) == torch.bfloat16 or own.get(ROUNDING_KEY):
                group.setdefault(SEED_KEY, self.defaults.get(SEED_KEY, torch.initial_seed()))
                group.setdefault(COUNTER_KEY, 0)
            else:
                group.pop(SEED_KEY, None)
                group.pop(COUNTER_KEY, None)
            keys = self._ferro_spec.state_keys(group) if self._ferro_spec.keeps_state_dtype else ()
            for p in group["params"]:
                self._lowp_convert(group, p, index, keys, tensors)
                index += 1

    def _lowp_convert(
        self,
        group: dict[str, Any],
        p: Tensor,
        index: int,
        keys: tuple[str, ...],
        tensors: dict[tuple[Any, str], Tensor],
    ) -> None:
        state = self.state.get(p)
        if not state:
            return
        dtype = state_dtype_for(group, p)
        quantized = quantized_keys(keys, group, p)
        like = p.detach()
        for name in keys:
            value = tensors.get((index, name), state.get(name))
            if not isinstance(value, Tensor):
                continue
            if is_packed(value, p) and name in QUANTIZED_STATES:
                if name in quantized:  # kept as it is (a compact checkpoint)
                    state[name] = value.to(device=p.device).contiguous()
                    continue
                value = unpack(value.to(p.device), like, QUANTIZED_STATES[name], torch.float32)
            if not value.is_floating_point():
                continue
            if name in quantized:
                state[name] = pack(value.to(p.device), like, quantized[name])
            else:
                state[name] = value.to(device=p.device, dtype=dtype)
        master = tensors.get((index, MASTER_STATE))
        if has_master(group, p) and master is not None:
            state[MASTER_STATE] = master.to(device=p.device, dtype=torch.float32)
        elif not has_master(group, p):
            state.pop(MASTER_STATE, None)
