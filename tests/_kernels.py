"""Counting (or intercepting) calls into ferroptim's Rust step kernels.

Parity with torch proves nothing about *where* a step ran if ferroptim quietly
handed it to torch. Every Rust step goes through ``_core.Kernel(name, group).step``
or Adafactor's ``_core.AdafactorKernel(group, eps1, eps2).step`` or LAMB's
``_core.LambKernel(group, step_size).step`` (the optimizer modules
look them up at call time), so replacing both with factories of proxies sees every
step: :func:`intercept_steps`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from ferroptim import _core
from optim_db import FAMILIES

#: Every Rust kernel the registry names, as ``kernel_calls`` keys them (``"adam_step"``).
KERNELS = tuple(dict.fromkeys(family.kernel for family in FAMILIES.values()))

#: ``on_step(kernel, plan, *args, **kwargs)``: called instead of ``kernel.step``.
OnStep = Callable[..., Any]


class _Proxy:
    """A kernel whose ``step`` goes through ``on_step``."""

    def __init__(self, kernel: Any, on_step: OnStep) -> None:
        self._kernel = kernel
        self._on_step = on_step

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)

    def step(self, plan: Any, *args: Any, **kwargs: Any) -> Any:
        return self._on_step(self._kernel, plan, *args, **kwargs)


@contextlib.contextmanager
def intercept_steps(on_step: OnStep) -> Iterator[None]:
    """Routes every Rust kernel step through ``on_step`` while the block runs."""
    real = _core.Kernel
    real_adafactor = _core.AdafactorKernel  # (Adafactor's own entry point: moments beside the plan)
    real_lamb = _core.LambKernel  # (LAMB's own two-pass entry point)

    def factory(name: str, group: Any) -> _Proxy:
        return _Proxy(real(name, group), on_step)

    def adafactor_factory(group: Any, eps1: float, eps2: float) -> _Proxy:
        return _Proxy(real_adafactor(group, eps1, eps2), on_step)

    def lamb_factory(group: Any, step_size: float) -> _Proxy:
        return _Proxy(real_lamb(group, step_size), on_step)

    _core.Kernel = factory  # type: ignore[misc,assignment]
    _core.AdafactorKernel = adafactor_factory  # type: ignore[misc,assignment]
    _core.LambKernel = lamb_factory  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        _core.Kernel = real  # type: ignore[misc]
        _core.AdafactorKernel = real_adafactor  # type: ignore[misc]
        _core.LambKernel = real_lamb  # type: ignore[misc]


@contextlib.contextmanager
def kernel_calls() -> Iterator[Counter[str]]:
    """Counts steps of each Rust kernel (keyed ``"<name>_step"``, e.g. ``"adam_step"``)
    while the block runs."""
    counts: Counter[str] = Counter()

    def count(kernel: Any, plan: Any, *args: Any, **kwargs: Any) -> Any:
        counts[f"{kernel.name}_step"] += 1
        return kernel.step(plan, *args, **kwargs)

    with intercept_steps(count):
        yield counts
