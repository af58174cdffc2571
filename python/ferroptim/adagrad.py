"""Adagrad: torch.optim's class with the CPU step in Rust."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import adagrad as torch_adagrad
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._lowp import LOW_PARAM_DTYPES
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["Adagrad"]


# -- the Rust kernel call (hyperparameters converted and checked in the prepare phase) --


def adagrad_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("adagrad", group).step


# -- the rest of the family ---------------------------------------------------------------


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("sum",)


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=("sum",))
    sums: list[Tensor] = []
    g.has_sparse_grad, g.has_complex = init_group(
        optimizer, group, g.params, g.grads, sums, g.steps
    )
    g.states = [sums]
    return g


def _usual(group: dict[str, Any]) -> bool:
    # (a tensor lr_decay divides in tensor arithmetic: inf, no exception)
    lr_decay = group["lr_decay"]
    return type(lr_decay) not in (int, float) or lr_decay >= 0


def _check_step_scalars(group: dict[str, Any], gathered: Gathered) -> None:
    # torch's `clr = lr / (1 + (step - 1) * lr_decay)`, in Python floats (a negative
    # lr_decay set after construction can make it divide by zero).
    lr, lr_decay = group["lr"], group["lr_decay"]
    if isinstance(lr, Tensor):
        return
    for step in {float(s) + 1 for s in gathered.steps}:
        _ = lr / (1 + (step - 1) * lr_decay)


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    if gathered.has_sparse_grad and group["weight_decay"] != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
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


ADAGRAD_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=adagrad_kernel,
    torch_step=_torch_step,
    gather=_gather,
    sparse_to_torch=True,
    numbers=("lr", "lr_decay", "weight_decay", "eps"),
    usual=_usual,
    check_step_scalars=_check_step_scalars,
    check_torch_path=_check_torch_path,
    rounds_like_torch=True,
)


class Adagrad(RustStepMixin, torch.optim.Adagrad):
    """Drop-in :class:`torch.optim.Adagrad` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``
    and ``sum``, created at construction as torch does); results match torch's
    for-loop implementation. Sparse gradients step through torch's own
    implementation, as do parameters on other devices or dtypes (but bfloat16 and
    float16, which Rust steps rounding every op as torch's for-loop does).

    Extra keyword: ``max_grad_norm`` clips the global L2 norm of all gradients
    inside the step (see :mod:`ferroptim.clip`).
    """

    _ferro_spec = ADAGRAD_SPEC

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
            lr_decay,
            weight_decay,
            initial_accumulator_value,
            eps,
            foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
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
        if master_weights:
            # torch made each accumulator in its param's dtype; a param with a float32
            # master copy accumulates in float32, from the exact initial value
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p, {})
                    if p.dtype in LOW_PARAM_DTYPES and "sum" in state:
                        state["sum"] = torch.full_like(
                            p, group["initial_accumulator_value"], dtype=torch.float32
                        )
