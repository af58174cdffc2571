"""Gradient-norm arithmetic shared by the clipping functions and ``max_grad_norm``,
and GradScaler's inverse scale.

torch computes a total norm as the norm of the per-tensor norms (each a 0-d
tensor of its gradient's dtype), and the clip coefficient with tensor ops in
that dtype; these helpers reproduce exactly that from norms computed in Rust.
"""

from __future__ import annotations

import ctypes
import math

import torch
from torch import Tensor

from ferroptim._torch_compat import sparse_values


def tensor_norm(tensor: Tensor, norm_type: float) -> Tensor:
    """torch's per-tensor norm (sparse gradients: the norm of their values)."""
    if tensor.is_sparse:
        tensor = sparse_values(tensor)
    return torch.linalg.vector_norm(tensor, norm_type)


def total_norm(
    values: list[float], has_float64: bool, others: list[Tensor], norm_type: float
) -> Tensor:
    """The norm of per-tensor norms: ``values`` from Rust (already rounded to their
    dtype; float64 if ``has_float64``), ``others`` computed by torch."""
    if not values and not others:
        return torch.tensor(0.0)
    norms: list[Tensor] = []
    if values:
        dtype = torch.float64 if has_float64 else torch.float32
        norms.append(torch.tensor(values, dtype=dtype))
    if others:
        device = others[0].device if not values else torch.device("cpu")
        norms.append(torch.stack([n.to(device) for n in others]))
    stacked = norms[0] if len(norms) == 1 else torch.cat(norms)
    return torch.linalg.vector_norm(stacked, norm_type)


def clip_coefficient(max_norm: float, norm: Tensor) -> Tensor:
    """``min(max_norm / (norm + 1e-6), 1)`` with torch's tensor arithmetic."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def _to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (overflowing to inf, as a cast does)."""
    return ctypes.c_float(value).value


def clip_coefficient_value(max_norm: float, norm: Tensor) -> float:
    """``float(clip_coefficient(max_norm, norm))`` without torch's per-op overhead
    (three tensor ops, ~10 µs: most of a small model's step).

    The same operations in the norm's dtype, rounded where torch rounds: the
    Python scalars become tensors of that dtype, ``max_norm / t`` is
    ``t.reciprocal() * max_norm`` (``Tensor.__rdiv__``), and one float32 operation
    on float32 values equals the float64 one rounded to float32."""
    if norm.dtype == torch.float64:
        value = float(norm)
        coefficient = max_norm * (1.0 / (value + 1e-6))
    elif norm.dtype == torch.float32:
        value = float(norm)
        shifted = _to_float32(value + _to_float32(1e-6))
        coefficient = _to_float32(_to_float32(1.0 / shifted) * _to_float32(max_norm))
    else:
        return float(clip_coefficient(max_norm, norm))
    return 1.0 if coefficient > 1.0 else coefficient  # clamp: nan stays nan


def inverse_scale_value(scale: Tensor) -> float:
    """GradScaler's ``float(scale.double().reciprocal().float())`` without the three
    tensor ops: a float64 reciprocal (Python's division, with torch's 1/0 = inf),
    then rounded to float32."""
    if scale.dtype != torch.float32:
        return float(scale.double().reciprocal().float())
    value = float(scale)
    inverse = math.copysign(math.inf, value) if value == 0.0 else 1.0 / value
    return _to_float32(inverse)


def is_finite(norm: Tensor) -> bool:
    """``bool(torch.isfinite(norm))`` for a 0-d tensor, without a tensor op."""
    return math.isfinite(float(norm))


def nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )
