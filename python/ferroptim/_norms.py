"""Gradient-norm arithmetic shared by the clipping functions and ``max_grad_norm``.

torch computes a total norm as the norm of the per-tensor norms (each a 0-d
tensor of its gradient's dtype), and the clip coefficient with tensor ops in
that dtype; these helpers reproduce exactly that from norms computed in Rust.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tensor_norm(tensor: Tensor, norm_type: float) -> Tensor:
    """torch's per-tensor norm (sparse gradients: the norm of their values)."""
    if tensor.is_sparse:
        tensor = tensor.coalesce()._values()
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


def nonfinite_error(norm_type: float) -> RuntimeError:
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )
