"""ASGD: torch.optim's class with the CPU step in Rust (``rust/kernels/asgd.rs``).

Besides ``step``, each parameter's state keeps the per-tensor scalars ``eta`` and ``mu``
(0-d tensors in torch's scalar dtype: the kernel's second and third scalar slots, read
before the update and recomputed after it, as torch's for-loop does) and the averaged
parameter ``ax``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import asgd as torch_asgd
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["ASGD"]


# -- the Rust kernel call (hyperparameters read by name in the prepare phase) -----------


def asgd_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("asgd", group).step


# -- the rest of the family ---------------------------------------------------------------

_PLAIN = (float, int)


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("ax",)


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=("ax",))
    mus: list[Tensor] = []
    axs: list[Tensor] = []
    etas: list[Tensor] = []
    g.has_complex = init_group(optimizer, group, g.params, g.grads, mus, axs, etas, g.steps)
    g.states = [axs]
    g.scalars = {"eta": etas, "mu": mus}
    return g


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # A tensor `lambd`, `alpha` or `t0` (torch's tensor arithmetic), or `eta`'s base
    # `1 + lambd * lr * step` possibly negative (Python's `**` then returns a complex
    # number that torch copies into `eta`, dropping its imaginary part): torch's for-loop.
    lambd, lr = group["lambd"], group["lr"]
    if type(lambd) not in _PLAIN or not all(type(group[k]) in _PLAIN for k in ("alpha", "t0")):
        return True
    if type(lr) in _PLAIN:
        return lambd < 0 or lr < 0
    return not isinstance(lr, Tensor) or lambd * float(lr) < 0


def _usual(group: dict[str, Any]) -> bool:
    # `(1 + lambd * lr * step) ** alpha` cannot overflow (a base >= 1, alpha <= 1) nor
    # divide by zero: a cached plan may run without computing it in Python first.
    lr, lambd, alpha = group["lr"], group["lambd"], group["alpha"]
    return (
        type(lr) in _PLAIN
        and type(lambd) in _PLAIN
        and type(alpha) in _PLAIN
        and lr >= 0.0
        and lambd >= 0.0
        and 0.0 <= alpha <= 1.0
    )


def _check_step_scalars(group: dict[str, Any], gathered: Gathered) -> None:
    # torch's for-loop computes `eta` and `mu` in Python floats: `0.0 ** alpha` with a
    # negative alpha divides by zero, a huge `alpha` overflows.
    lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
    for step in {float(s) + 1 for s in gathered.steps}:
        if not isinstance(lr, Tensor):
            _ = lr / ((1 + lambd * lr * step) ** alpha)
        _ = 1 / max(1, step - t0)


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    torch_asgd.asgd(
        gathered.params,
        gathered.grads,
        gathered.states[0],
        gathered.scalars["mu"],
        gathered.scalars["eta"],
        gathered.steps,
        lambd=group["lambd"],
        lr=group["lr"],
        t0=group["t0"],
        alpha=group["alpha"],
        weight_decay=group["weight_decay"],
        foreach=foreach,
        maximize=group["maximize"],
        differentiable=group["differentiable"],
        capturable=group["capturable"],
        has_complex=gathered.has_complex,
    )


ASGD_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=asgd_kernel,
    torch_step=_torch_step,
    gather=_gather,
    scalar_keys=("eta", "mu"),
    step_must_be_tensor=False,
    scalar_dtype_kept=True,
    has_fused=False,
    numbers=("lr", "lambd", "alpha", "t0", "weight_decay"),
    rust_unsupported=_rust_unsupported,
    usual=_usual,
    check_step_scalars=_check_step_scalars,
    capturable_names="params, mus, etas, and state_steps",
    rounds_like_torch=True,
)


class ASGD(RustStepMixin, torch.optim.ASGD):
    """Drop-in :class:`torch.optim.ASGD` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``, ``eta``,
    ``mu``, ``ax``); results are bitwise those of torch's for-loop implementation. CPU
    float32/float64 (and complex) parameters step in Rust; parameters on other devices, in
    other dtypes (but bfloat16 and float16, which Rust steps rounding every op as torch's
    for-loop does), or with ``differentiable=True`` step through torch's own implementation
    (foreach where it can: torch has no fused ASGD).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_spec = ASGD_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        *,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
        ema_decay: float | None = None,
        state_dtype: torch.dtype | str | None = None,
        seed: int | None = None,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
        min_8bit_size: int = 4096,
    ) -> None:
        super().__init__(
            params,
            lr,
            lambd,
            alpha,
            t0,
            weight_decay,
            foreach,
            maximize,
            differentiable,
            capturable,
        )
        self._ferro_init(
            max_grad_norm,
            skip_nonfinite,
            nonfinite_group,
            ema_decay,
            state_dtype,
            seed,
            stochastic_rounding,
            master_weights,
            min_8bit_size,
        )
