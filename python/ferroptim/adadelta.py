"""Adadelta: torch.optim's class with the CPU step in Rust (``rust/kernels/adadelta.rs``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import adadelta as torch_adadelta
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["Adadelta"]


# -- the Rust kernel call (hyperparameters read by name in the prepare phase) -----------


def adadelta_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("adadelta", group).step


# -- the rest of the family ---------------------------------------------------------------


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("square_avg", "acc_delta")


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=("square_avg", "acc_delta"))
    square_avgs: list[Tensor] = []
    acc_deltas: list[Tensor] = []
    g.has_complex = init_group(
        optimizer, group, g.params, g.grads, square_avgs, acc_deltas, g.steps
    )
    g.states = [square_avgs, acc_deltas]
    return g


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    torch_adadelta.adadelta(
        gathered.params,
        gathered.grads,
        gathered.states[0],
        gathered.states[1],
        gathered.steps,
        capturable=group["capturable"],
        foreach=foreach,
        differentiable=group["differentiable"],
        has_complex=gathered.has_complex,
        lr=group["lr"],
        rho=group["rho"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        maximize=group["maximize"],
    )


ADADELTA_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=adadelta_kernel,
    torch_step=_torch_step,
    gather=_gather,
    # torch's Adadelta only increments the step counter.
    reads_step=False,
    capturable_xla=False,
    has_fused=False,
    numbers=("lr", "rho", "eps", "weight_decay"),
    rounds_like_torch=True,
)


class Adadelta(RustStepMixin, torch.optim.Adadelta):
    """Drop-in :class:`torch.optim.Adadelta` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``,
    ``square_avg``, ``acc_delta``); results match torch's for-loop implementation. CPU
    float32/float64 (and complex) parameters step in Rust; parameters on other devices, in
    other dtypes (but bfloat16 and float16, which Rust steps rounding every op as torch's
    for-loop does), or with ``differentiable=True`` step through torch's own implementation
    (foreach where it can: torch has no fused Adadelta).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_spec = ADADELTA_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
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
            rho,
            eps,
            weight_decay,
            foreach,
            capturable=capturable,
            maximize=maximize,
            differentiable=differentiable,
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
