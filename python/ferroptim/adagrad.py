"""Adagrad: torch.optim's class with the CPU step in Rust."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import adagrad as torch_adagrad
from torch.optim.optimizer import ParamsT

from ferroptim._optimizer import Gathered, RustStepMixin

__all__ = ["Adagrad"]


class Adagrad(RustStepMixin, torch.optim.Adagrad):
    """Drop-in :class:`torch.optim.Adagrad` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``
    and ``sum``, created at construction as torch does); results match torch's
    for-loop implementation. Sparse gradients step through torch's own
    implementation, as do parameters on other devices or dtypes.

    Extra keyword: ``max_grad_norm`` clips the global L2 norm of all gradients
    inside the step (see :mod:`ferroptim.clip`).
    """

    _ferro_sparse_to_torch = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group)

    def _ferro_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def _ferro_gather(self, group: dict[str, Any]) -> Gathered:
        g = Gathered(keys=("sum",))
        sums: list[Tensor] = []
        g.has_sparse_grad, g.has_complex = self._init_group(group, g.params, g.grads, sums, g.steps)
        g.states = [sums]
        return g

    _ferro_numbers = ("lr", "lr_decay", "weight_decay", "eps")

    _ferro_kernel_name = "adagrad"

    def _ferro_usual(self, group: dict[str, Any]) -> bool:
        # (a tensor lr_decay divides in tensor arithmetic: inf, no exception)
        lr_decay = group["lr_decay"]
        return type(lr_decay) not in (int, float) or lr_decay >= 0

    def _ferro_check_step_scalars(self, group: dict[str, Any], gathered: Gathered) -> None:
        # torch's `clr = lr / (1 + (step - 1) * lr_decay)`, in Python floats (a negative
        # lr_decay set after construction can make it divide by zero).
        lr, lr_decay = group["lr"], group["lr_decay"]
        if isinstance(lr, Tensor):
            return
        for step in {float(s) + 1 for s in gathered.steps}:
            _ = lr / (1 + (step - 1) * lr_decay)

    def _ferro_check_torch_path(self, gathered: Gathered, group: dict[str, Any]) -> None:
        if gathered.has_sparse_grad and group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")

    def _ferro_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, foreach: bool, fused: bool
    ) -> None:
        torch_adagrad.adagrad(
            gathered.params,
            gathered.grads,
            gathered.states[0],
            gathered.steps,
            fused=fused,
            grad_scale=gathered.grad_scale,
            found_inf=gathered.found_inf,
            has_sparse_grad=gathered.has_sparse_grad,
            foreach=foreach,
            differentiable=group["differentiable"],
            has_complex=gathered.has_complex,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )
