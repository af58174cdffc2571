"""Tensor layout helpers: what the Rust kernels can walk as one run of memory, and the
copies that make a tensor so."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "is_dense",
    "is_lazy",
    "is_plain",
    "laid_out_like",
    "real",
    "resolved",
    "same_layout",
    "staged",
    "storage_key",
]


def same_layout(tensor: Tensor, like: Tensor) -> bool:
    """Whether ``tensor``'s elements lie in memory in ``like``'s order."""
    return tensor.is_contiguous() if like.is_contiguous() else tensor.stride() == like.stride()


def is_dense(tensor: Tensor) -> bool:
    """Whether the tensor's elements fill ``numel`` consecutive slots (any dim order)."""
    if tensor.is_contiguous():
        return True
    expected = 1
    dims = ((s, st) for s, st in zip(tensor.shape, tensor.stride(), strict=True) if s != 1)
    for size, stride in sorted(dims, key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def is_lazy(tensor: Tensor) -> bool:
    """Whether torch reads ``tensor`` negated or conjugated (``torch._neg_view``,
    ``z.conj()``, ``z.conj().imag``): its memory holds other values than it has."""
    return tensor.is_neg() or tensor.is_conj()


def resolved(tensor: Tensor) -> Tensor:
    """``tensor``'s values in memory of their own when it is a lazy view."""
    return tensor.resolve_conj().resolve_neg() if is_lazy(tensor) else tensor


def storage_key(tensor: Tensor) -> int | None:
    """The address of the storage behind ``tensor``, or None when it has no elements
    (a zero-size tensor's storage address is 0 and shares nothing)."""
    return tensor.untyped_storage().data_ptr() if tensor.numel() else None


def laid_out_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor``'s values in ``like``'s memory layout (a copy unless already so)."""
    if same_layout(tensor, like):
        return tensor
    return torch.empty_like(like).copy_(tensor)


def staged(tensor: Tensor) -> Tensor:
    """A contiguous copy of ``tensor``'s values (negation and conjugation resolved)."""
    return torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)


def is_plain(tensor: Tensor) -> bool:
    """Whether the tensor is a plain ``Tensor`` or ``Parameter`` (or a ``Parameter``
    subclass that overrides neither ``__torch_function__`` nor ``__torch_dispatch__``):
    its memory is what it holds. Anything else (wrapper subclasses, subclasses that
    redefine ops) steps through torch, as torch steps it."""
    cls = type(tensor)
    if cls is Tensor or cls is torch.nn.Parameter:
        return True
    return (
        issubclass(cls, torch.nn.Parameter)
        and cls.__torch_function__ is torch.nn.Parameter.__torch_function__
        and cls.__torch_dispatch__ is Tensor.__torch_dispatch__
    )


def real(tensors: list[Tensor]) -> list[Tensor]:
    """Complex tensors as real views (the kernels step real and imaginary parts alike)."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
