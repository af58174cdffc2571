"""The exceptions of the reference implementations ferroptim's optimizers follow.

An optimizer taken from ``pytorch-optimizer`` (AdEMAMix) raises that package's own
exception classes (``NegativeLRError``, ``NoSparseGradientError``, ...) where the reference
raises them, so code written for the reference catches them unchanged. pytorch-optimizer
is not a dependency of ferroptim: the class is imported only when an error is raised, and
without the package the error is a built-in exception with the same message.
"""

from __future__ import annotations

import importlib

__all__ = ["negative_lr", "no_complex_parameter", "no_sparse_gradient"]


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
