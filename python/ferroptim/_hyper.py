"""Reading hyperparameters from a param group the way torch's step reads them."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_number", "flag", "is_number", "lr_is_f32", "scalar"]

_PLAIN_NUMBERS = (float, int, bool)


def is_number(value: Any) -> bool:
    """Whether torch's step arithmetic can compute with ``value`` (a real number or a
    tensor)."""
    # (the common types first: an ABC check costs a microsecond per call)
    return (
        type(value) in _PLAIN_NUMBERS
        or isinstance(value, Tensor)
        or (isinstance(value, numbers.Real) and not isinstance(value, (str, bytes)))
    )


def check_number(value: Any, name: str) -> None:
    """Raises the TypeError torch's arithmetic raises mid-step for a hyperparameter that
    is not a number (``lr=None``, ``lr="0.1"``): a real number or a tensor passes."""
    if not is_number(value):
        raise TypeError(
            f"hyperparameter {name!r} must be a real number or a 1-element tensor, "
            f"got {type(value).__name__}: {value!r}"
        )


def scalar(value: Any, name: str = "hyperparameter") -> float:
    """A hyperparameter as a Python float (tensors are read once per step); raises
    TypeError for what torch's step cannot compute with (``None``, a string)."""
    if type(value) is float:
        return value
    if type(value) is not int:
        check_number(value, name)
    return float(value)


def flag(value: Any) -> bool:
    """A boolean hyperparameter (``maximize``, ``nesterov``, ...) as torch reads it:
    ``if maximize:`` (so ``maximize=1`` is True, as in torch)."""
    return value if type(value) is bool else bool(value)


def lr_is_f32(lr: float | Tensor) -> bool:
    """Whether ``lr`` is a float32 tensor: torch then derives per-step scalars from it
    (``lr / bias_correction1``, ...) in float32 tensor arithmetic."""
    return isinstance(lr, Tensor) and lr.dtype == torch.float32
