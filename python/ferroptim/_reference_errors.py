"""The exceptions of the reference implementations ferroptim's optimizers follow.

An optimizer taken from ``pytorch-optimizer`` (AdEMAMix) raises that package's own
exception classes (``NegativeLRError``, ``NoSparseGradientError``, ...) where the reference
raises them, so code written for the reference catches them unchanged. pytorch-optimizer
is not a dependency of ferroptim: the class is imported only when an error is raised, and
without the package the error is a built-in exception with the same message.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["check_constructor", "negative_lr", "no_complex_parameter", "no_sparse_gradient"]


def _reference(name: str, fallback: type[Exception], message: str, *args: object) -> Exception:
    try:
        module = importlib.import_module("pytorch_optimizer.base.exception")
    except ImportError:
        return fallback(message)
    error = getattr(module, name, None)
    if error is None:  # (a release without it)
        return fallback(message)
    return error(*args)


def negative_lr(lr: object) -> Exception:
    """pytorch-optimizer's ``NegativeLRError`` (without it: ValueError)."""
    return _reference(
        "NegativeLRError", ValueError, f"learning rate must be positive. ({lr} > 0)", lr
    )


def no_sparse_gradient(optimizer: str) -> Exception:
    """pytorch-optimizer's ``NoSparseGradientError`` (without it: RuntimeError)."""
    message = f"{optimizer} does not support sparse gradient."
    return _reference("NoSparseGradientError", RuntimeError, message, optimizer)


def no_complex_parameter(optimizer: str) -> Exception:
    """pytorch-optimizer's ``NoComplexParameterError`` (without it: RuntimeError)."""
    message = f"{optimizer} does not support complex parameter."
    return _reference("NoComplexParameterError", RuntimeError, message, optimizer)


def check_constructor(lr: Any, betas: Any, non_negative: dict[str, Any]) -> None:
    """pytorch-optimizer's constructor checks, in its order and with its messages:
    ``validate_learning_rate``, ``validate_betas`` (beta1 unless None and beta2 in
    [0, 1), beta3 if there is one in [0, 1]), then ``validate_non_negative`` for each of
    ``non_negative`` (None passes)."""
    if lr < 0.0:
        raise negative_lr(lr)
    limits = (("beta1", ")"), ("beta2", ")"), ("beta3", "]"))
    for (name, end), beta in zip(limits, betas, strict=False):
        if beta is None and name == "beta1":
            continue
        if not (0.0 <= beta < 1.0 if end == ")" else 0.0 <= beta <= 1.0):
            raise ValueError(f"{name} must be in the range [0.0, 1.0{end}")
    for name, value in non_negative.items():
        if value is not None and value < 0.0:
            raise ValueError(f"{name} must be non-negative")
