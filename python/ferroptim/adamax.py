"""Adamax: torch.optim's class with the CPU step in Rust (``rust/kernels/adamax.rs``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import adamax as torch_adamax
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["Adamax"]


# -- the Rust kernel call (hyperparameters read by name in the prepare phase) -----------


def adamax_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("adamax", group).step


# -- the rest of the family ---------------------------------------------------------------

_PLAIN = (float, int)


def tensor_betas(group: dict[str, Any]) -> bool:
    """Whether the group's betas hold a tensor: torch then computes ``1 - beta1``,
    ``beta1 ** step`` and what follows in the tensors' own (float32) arithmetic, which
    the kernels (float64 scalars, as from Python floats) do not reproduce: such groups
    take torch's for-loop, exactly torch's numbers."""
    betas = group["betas"]
    if type(betas) is not tuple and type(betas) is not list:
        return False
    if len(betas) == 2 and type(betas[0]) in _PLAIN and type(betas[1]) in _PLAIN:
        return False  # (every step asks: the common case without calls)
    return any(isinstance(b, Tensor) for b in betas)


def usual_betas(betas: Any) -> bool:
    """Whether ``betas`` is a pair of plain numbers in ``[0, 1)`` (what torch's constructor
    accepts): then the for-loop's per-step scalars cannot raise."""
    if (type(betas) is not tuple and type(betas) is not list) or len(betas) != 2:
        return False
    return all(type(b) in _PLAIN and 0.0 <= b < 1.0 for b in betas)


def betas_as_numbers(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """(name, value) of each beta: checked as numbers before anything is written."""
    beta1, beta2 = group["betas"]
    return (("beta1", beta1), ("beta2", beta2))


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("exp_avg", "exp_inf")


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=("exp_avg", "exp_inf"))
    exp_avgs: list[Tensor] = []
    exp_infs: list[Tensor] = []
    g.has_complex = init_group(optimizer, group, g.params, g.grads, exp_avgs, exp_infs, g.steps)
    g.states = [exp_avgs, exp_infs]
    return g


def _usual(group: dict[str, Any]) -> bool:
    return usual_betas(group["betas"])


def _check_step_scalars(group: dict[str, Any], gathered: Gathered) -> None:
    # torch's for-loop computes `lr / (1 - beta1 ** step)` in Python floats: beta1 = 1
    # set after construction divides by zero, `1.5 ** 2000` overflows.
    beta1 = group["betas"][0]
    lr = group["lr"]
    for step in {float(s) + 1 for s in gathered.steps}:
        bias_correction = 1 - beta1**step
        if not isinstance(lr, Tensor):
            _ = lr / bias_correction


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
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


ADAMAX_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=adamax_kernel,
    torch_step=_torch_step,
    gather=_gather,
    has_fused=False,
    numbers=("lr", "eps", "weight_decay"),
    more_numbers=betas_as_numbers,
    rust_unsupported=tensor_betas,
    usual=_usual,
    check_step_scalars=_check_step_scalars,
    rounds_like_torch=True,
)


class Adamax(RustStepMixin, torch.optim.Adamax):
    """Drop-in :class:`torch.optim.Adamax` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``,
    ``exp_avg``, ``exp_inf``); results match torch's for-loop implementation. CPU
    float32/float64 (and complex) parameters step in Rust; parameters on other devices, in
    other dtypes (but bfloat16 and float16, which Rust steps rounding every op as torch's
    for-loop does), or with ``differentiable=True`` step through torch's own implementation
    (foreach where it can: torch has no fused Adamax).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_spec = ADAMAX_SPEC

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
            betas,
            eps,
            weight_decay,
            foreach,
            maximize=maximize,
            differentiable=differentiable,
            capturable=capturable,
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
