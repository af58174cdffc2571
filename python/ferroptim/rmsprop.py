"""RMSprop: torch.optim's class with the CPU step in Rust."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import rmsprop as torch_rmsprop
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group

__all__ = ["RMSprop"]


# -- the Rust kernel call (hyperparameters converted and checked in the prepare phase) --


def rmsprop_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("rmsprop", group).step


# -- the rest of the family ---------------------------------------------------------------


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    keys: tuple[str, ...] = ("square_avg",)
    if group["momentum"] > 0:
        keys += ("momentum_buffer",)
    if group["centered"]:
        keys += ("grad_avg",)
    return keys


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=_state_keys(group))
    square_avgs: list[Tensor] = []
    buffers: list[Tensor] = []
    grad_avgs: list[Tensor] = []
    g.has_complex = init_group(
        optimizer, group, g.params, g.grads, square_avgs, buffers, grad_avgs, g.steps
    )
    g.states = [square_avgs]
    if group["momentum"] > 0:
        g.states.append(buffers)
    if group["centered"]:
        g.states.append(grad_avgs)
    return g


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    by_key = dict(zip(gathered.keys, gathered.states, strict=True))
    torch_rmsprop.rmsprop(
        gathered.params,
        gathered.grads,
        by_key["square_avg"],
        by_key.get("grad_avg", []),
        by_key.get("momentum_buffer", []),
        gathered.steps,
        foreach=foreach,
        maximize=group["maximize"],
        differentiable=group["differentiable"],
        capturable=group["capturable"],
        has_complex=gathered.has_complex,
        lr=group["lr"],
        alpha=group["alpha"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        centered=group["centered"],
    )


RMSPROP_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=rmsprop_kernel,
    torch_step=_torch_step,
    gather=_gather,
    # torch's RMSprop only increments the step counter.
    reads_step=False,
    # torch has no fused RMSprop: other devices use its foreach implementation.
    has_fused=False,
    numbers=("lr", "alpha", "eps", "weight_decay", "momentum"),
    rounds_like_torch=True,
)


class RMSprop(RustStepMixin, torch.optim.RMSprop):
    """Drop-in :class:`torch.optim.RMSprop` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format
    (``step``, ``square_avg``, ``momentum_buffer``, ``grad_avg``); results match
    torch's for-loop implementation, centered and momentum variants included
    (bfloat16 and float16 parameters too: Rust rounds every op as the for-loop does).
    torch has no fused RMSprop: other devices use its foreach implementation.

    Extra keyword: ``max_grad_norm`` clips the global L2 norm of all gradients
    inside the step (see :mod:`ferroptim.clip`).
    """

    _ferro_spec = RMSPROP_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
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
            alpha,
            eps,
            weight_decay,
            momentum,
            centered,
            capturable,
            foreach,
            maximize,
            differentiable,
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
