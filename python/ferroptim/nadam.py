"""NAdam: torch.optim's class with the CPU step in Rust (``rust/kernels/nadam.rs``).

Besides ``step``, each parameter's state keeps a per-tensor scalar ``mu_product`` (a
0-d tensor, the running product of the momentum schedule): the kernel's second scalar
slot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import nadam as torch_nadam
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._hyper import scalar
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group
from ferroptim.adam import decay_first_aliased_grad
from ferroptim.adamax import betas_as_numbers, tensor_betas, usual_betas

__all__ = ["NAdam"]


# -- the Rust kernel call (hyperparameters read by name in the prepare phase) -----------


def nadam_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("nadam", group).step


# -- the rest of the family ---------------------------------------------------------------

#: torch's names of integer dtypes in its casting errors.
_INTEGER_NAMES = {
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
}


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=("exp_avg", "exp_avg_sq"))
    exp_avgs: list[Tensor] = []
    exp_avg_sqs: list[Tensor] = []
    mu_products: list[Tensor] = []
    g.has_complex = init_group(
        optimizer, group, g.params, g.grads, exp_avgs, exp_avg_sqs, mu_products, g.steps
    )
    g.states = [exp_avgs, exp_avg_sqs]
    g.scalars = {"mu_product": mu_products}
    for mu_product in mu_products:
        if isinstance(mu_product, Tensor) and mu_product.dtype in _INTEGER_NAMES:
            # torch's `mu_product *= mu` (a Python float) cannot write it: its error,
            # before anything is written.
            raise RuntimeError(
                "result type Float can't be cast to the desired output type "
                + _INTEGER_NAMES[mu_product.dtype]
            )
    return g


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # Tensor betas or momentum_decay: torch's tensor arithmetic (see tensor_betas).
    return tensor_betas(group) or isinstance(group["momentum_decay"], Tensor)


def _usual(group: dict[str, Any]) -> bool:
    momentum_decay = group["momentum_decay"]
    return (
        usual_betas(group["betas"]) and type(momentum_decay) in (int, float) and momentum_decay >= 0
    )


def _check_step_scalars(group: dict[str, Any], gathered: Gathered) -> None:
    # torch's for-loop computes its per-step scalars in Python floats, from
    # `mu_product` as its float32 tensor product leaves it: hyperparameters set
    # outside the constructor's ranges can overflow (`1.5 ** 2000`) or divide by zero
    # (`1 - mu_product == 0`).
    beta1, beta2 = group["betas"]
    lr, momentum_decay = group["lr"], group["momentum_decay"]
    for step_t, mu_product in zip(gathered.steps, gathered.scalars["mu_product"], strict=True):
        step = float(step_t) + 1
        _ = 1 - beta2**step
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        product = scalar(mu_product * mu)
        if not isinstance(lr, Tensor):
            _ = -lr * (1.0 - mu) / (1.0 - product)
            _ = (-lr * mu_next) / (1.0 - product * mu_next)


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    beta1, beta2 = group["betas"]
    torch_nadam.nadam(
        gathered.params,
        gathered.grads,
        gathered.states[0],
        gathered.states[1],
        gathered.scalars["mu_product"],
        gathered.steps,
        decoupled_weight_decay=group["decoupled_weight_decay"],
        foreach=foreach,
        capturable=group["capturable"],
        differentiable=group["differentiable"],
        has_complex=gathered.has_complex,
        maximize=group["maximize"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        momentum_decay=group["momentum_decay"],
        eps=group["eps"],
    )


NADAM_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=nadam_kernel,
    torch_step=_torch_step,
    gather=_gather,
    scalar_keys=("mu_product",),
    has_fused=False,
    numbers=("lr", "eps", "weight_decay", "momentum_decay"),
    more_numbers=betas_as_numbers,
    rust_unsupported=_rust_unsupported,
    usual=_usual,
    check_step_scalars=_check_step_scalars,
    aliased_grad=decay_first_aliased_grad,
    rounds_like_torch=True,
)


class NAdam(RustStepMixin, torch.optim.NAdam):
    """Drop-in :class:`torch.optim.NAdam` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``,
    ``mu_product``, ``exp_avg``, ``exp_avg_sq``); results match torch's for-loop
    implementation. ``decoupled_weight_decay=True`` is NAdamW. CPU float32/float64 (and
    complex) parameters step in Rust; parameters on other devices, in other dtypes (but
    bfloat16 and float16, which Rust steps rounding every op as torch's for-loop does), or
    with ``differentiable=True`` step through torch's own implementation (foreach where it
    can: torch has no fused NAdam).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_spec = NADAM_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
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
            betas,
            eps,
            weight_decay,
            momentum_decay,
            decoupled_weight_decay,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
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
