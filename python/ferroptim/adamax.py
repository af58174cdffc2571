"""Adamax: torch.optim's class with the CPU step in Rust (``rust/kernels/adamax.rs``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import adamax as torch_adamax
from torch.optim.optimizer import ParamsT

from ferroptim._optimizer import Gathered, RustStepMixin, check_number

__all__ = ["Adamax"]

_PLAIN = (float, int)


def tensor_betas(group: dict[str, Any]) -> bool:
    """Whether the group's betas hold a tensor: torch then computes ``1 - beta1``,
    ``beta1 ** step`` and what follows in the tensors' own (float32) arithmetic, which
    the kernels (float64 scalars, as from Python floats) do not reproduce: such groups
    take torch's for-loop, exactly torch's numbers."""
    betas = group["betas"]
    if type(betas) is not tuple and type(betas) is not list:
        return False
    return any(isinstance(b, Tensor) for b in betas)


def usual_betas(betas: Any) -> bool:
    """Whether ``betas`` is a pair of plain numbers in ``[0, 1)`` (what torch's constructor
    accepts): then the for-loop's per-step scalars cannot raise."""
    if (type(betas) is not tuple and type(betas) is not list) or len(betas) != 2:
        return False
    return all(type(b) in _PLAIN and 0.0 <= b < 1.0 for b in betas)


class Adamax(RustStepMixin, torch.optim.Adamax):
    """Drop-in :class:`torch.optim.Adamax` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``,
    ``exp_avg``, ``exp_inf``); results match torch's for-loop implementation. CPU
    float32/float64 (and complex) parameters step in Rust; parameters on other devices,
    in other dtypes, or with ``differentiable=True`` step through torch's own
    implementation (foreach where it can: torch has no fused Adamax).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_has_fused = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            foreach,
            maximize=maximize,
            differentiable=differentiable,
            capturable=capturable,
        )
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group)

    def _ferro_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def _ferro_gather(self, group: dict[str, Any]) -> Gathered:
        g = Gathered(keys=("exp_avg", "exp_inf"))
        exp_avgs: list[Tensor] = []
        exp_infs: list[Tensor] = []
        g.has_complex = self._init_group(group, g.params, g.grads, exp_avgs, exp_infs, g.steps)
        g.states = [exp_avgs, exp_infs]
        return g

    _ferro_numbers = ("lr", "eps", "weight_decay")

    _ferro_kernel_name = "adamax"

    def _ferro_check_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._ferro_check_hyperparameters(group)
        beta1, beta2 = group["betas"]
        check_number(beta1, "beta1")
        check_number(beta2, "beta2")

    def _ferro_rust_unsupported(self, group: dict[str, Any]) -> bool:
        return tensor_betas(group)

    def _ferro_usual(self, group: dict[str, Any]) -> bool:
        return usual_betas(group["betas"])

    def _ferro_check_step_scalars(self, group: dict[str, Any], gathered: Gathered) -> None:
        # torch's for-loop computes `lr / (1 - beta1 ** step)` in Python floats: beta1 = 1
        # set after construction divides by zero, `1.5 ** 2000` overflows.
        beta1 = group["betas"][0]
        lr = group["lr"]
        for step in {float(s) + 1 for s in gathered.steps}:
            bias_correction = 1 - beta1**step
            if not isinstance(lr, Tensor):
                _ = lr / bias_correction

    def _ferro_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, foreach: bool, fused: bool
    ) -> None:
        beta1, beta2 = group["betas"]
        torch_adamax.adamax(
            gathered.params,
            gathered.grads,
            gathered.states[0],
            gathered.states[1],
            gathered.steps,
            foreach=foreach,
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=gathered.has_complex,
            eps=group["eps"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
        )
