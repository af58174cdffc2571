"""Gradient clipping with ``torch.nn.utils`` semantics, computed in Rust.

``clip_grad_norm_`` reads every gradient once in parallel to get the norm (a
deterministic reduction, accumulated in float64), then scales them in a second
pass. CPU float32/float64 gradients go through Rust; anything else (other
devices, dtypes, sparse gradients, the backend forced to ``torch``, the same
gradient listed twice) goes through ``torch.nn.utils`` itself.

When to use which: call :func:`clip_grad_norm_` when you need the clipped
gradients themselves (logging, a custom step) or clip with a non-ferroptim
optimizer. Pass ``max_grad_norm=`` to a ferroptim optimizer instead when the
clip only feeds the step: the coefficient is applied as the kernel reads each
gradient, saving a read and a write of every gradient. ``p.grad`` then keeps
the unclipped values; the norm is in ``optimizer.last_grad_norm``.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from ferroptim import _config, _core
from ferroptim._norms import (
    clip_coefficient,
    clip_coefficient_value,
    is_finite,
    nonfinite_error,
    tensor_norm,
    total_norm,
)
from ferroptim._optimizer import _is_dtensor

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm"]

TensorOrTensors = Tensor | Iterable[Tensor]


def _split(grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(Rust-able, other): CPU float32/float64, dense, each gradient once.

    DTensor gradients (FSDP2) take torch's path for the whole call: their norm is
    reduced across ranks by torch's DTensor machinery.
    """
    if _config.get_backend() == "torch" or any(_is_dtensor(g) for g in grads):
        return [], grads
    rust: list[Tensor] = []
    other: list[Tensor] = []
    seen: set[int] = set()
    for g in grads:
        if (
            g.device.type == "cpu"
            and g.dtype in (torch.float32, torch.float64)
            and not g.is_sparse
            and g.is_contiguous()
            and id(g) not in seen
        ):
            rust.append(g)
            seen.add(id(g))
        else:
            other.append(g)
    return rust, other


def _rust_plan(grads: list[Tensor]) -> _core.GroupPlan | None:
    try:
        return _core.GroupPlan.from_grads(grads)
    except ValueError:
        return None  # gradients sharing memory: torch's semantics scale them twice


def _norm(
    plan: _core.GroupPlan | None, rust: list[Tensor], other: list[Tensor], norm_type: float
) -> Tensor:
    values, float64 = _core.grad_norms([plan], norm_type) if plan else ([], False)
    others = [tensor_norm(g, norm_type) for g in (other if plan else rust + other)]
    return total_norm(values, float64, others, norm_type)


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Norm of the tensors viewed as one vector, as ``torch.nn.utils.get_total_norm``."""
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    norm_type = float(norm_type)
    rust, other = _split(tensors)
    if not rust:
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    plan = _rust_plan(rust)
    norm = _norm(plan, rust, other, norm_type)
    if plan is not None:
        plan.release()
    if error_if_nonfinite and not is_finite(norm):
        raise nonfinite_error(norm_type)
    return norm


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Clips the gradient norm of parameters in place, as ``torch.nn.utils.clip_grad_norm_``.

    The norm is computed over all gradients together, as if concatenated into one
    vector; gradients are multiplied by ``min(max_norm / (total_norm + 1e-6), 1)``.

    Args:
        parameters: tensors (or one tensor) whose ``.grad`` to clip.
        max_norm: largest allowed norm.
        norm_type: order of the norm: any float, ``inf`` or ``-inf``.
        error_if_nonfinite: raise ``RuntimeError`` if the total norm is nan or inf.
        foreach: accepted for compatibility; used only for gradients torch handles.

    Returns:
        The total norm of the gradients (before clipping), as a 0-d tensor.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    max_norm = float(max_norm)
    rust, other = _split(grads)
    plan = _rust_plan(rust) if rust else None
    if plan is None:
        return torch.nn.utils.clip_grad_norm_(
            parameters, max_norm, norm_type, error_if_nonfinite, foreach
        )
    try:
        norm = _norm(plan, rust, other, norm_type)
        if error_if_nonfinite and not is_finite(norm):
            raise nonfinite_error(norm_type)
        if other:  # torch's grads are multiplied by the coefficient as a tensor
            coefficient = clip_coefficient(max_norm, norm)
            value = float(coefficient)
        else:
            value = clip_coefficient_value(max_norm, norm)
    except BaseException:
        plan.release()
        raise
    _core.scale_grads(plan, value)
    for g in other:
        g.mul_(coefficient.to(g.device))
    return norm


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    """Clamps every gradient to ``[-clip_value, clip_value]`` in place, as
    ``torch.nn.utils.clip_grad_value_``."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    params = [p for p in params if p.grad is not None]
    clip_value = float(clip_value)
    rust, other = _split([p.grad for p in params if p.grad is not None])
    plan = _rust_plan(rust) if rust else None
    if plan is None:
        torch.nn.utils.clip_grad_value_(params, clip_value, foreach)
        return
    _core.clamp_grads(plan, clip_value)
    other_grads = {id(g) for g in other}
    others = [p for p in params if id(p.grad) in other_grads]
    if others:
        torch.nn.utils.clip_grad_value_(others, clip_value, foreach)
