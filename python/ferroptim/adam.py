"""Adam and AdamW: torch.optim's classes with the CPU step in Rust."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import adam as torch_adam
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._hyper import scalar
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group
from ferroptim.adamax import tensor_betas

__all__ = ["Adam", "AdamW"]


_PLAIN = (float, int)

#: torch's names of dtypes in its type-promotion errors.
_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}


# -- the Rust kernel call (hyperparameters converted and checked in the prepare phase) --


def adam_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("adam", group).step


# -- the rest of the family ---------------------------------------------------------------


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    if group["amsgrad"]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    return ("exp_avg", "exp_avg_sq")


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=_state_keys(group))
    exp_avgs: list[Tensor] = []
    exp_avg_sqs: list[Tensor] = []
    max_exp_avg_sqs: list[Tensor] = []
    g.has_complex = init_group(
        optimizer, group, g.params, g.grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, g.steps
    )
    g.states = [exp_avgs, exp_avg_sqs]
    if group["amsgrad"]:
        g.states.append(max_exp_avg_sqs)
    return g


def decay_first_aliased_grad(param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
    """What torch reads from a grad sharing the param's memory when the group decays the
    param (decoupled weight decay) before reading the grad: AdamW, NAdamW."""
    # torch's AdamW decays the param before reading the (un-negated) grad.
    decays_first = group["decoupled_weight_decay"] and group["weight_decay"] != 0
    if decays_first and not group["maximize"] and grad.data_ptr() == param.data_ptr():
        return grad.mul(1 - scalar(group["lr"]) * scalar(group["weight_decay"]))
    return grad.clone()


def _betas(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    beta1, beta2 = group["betas"]
    return (("beta1", beta1), ("beta2", beta2))


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # torch computes with tensor betas in their own (float32) tensor arithmetic:
    # `1 - beta2`, `1 - beta1 ** step`, `lr / bias_correction1` rounded to float32.
    # The kernels compute these scalars in float64, so such groups take torch's
    # for-loop (exactly torch's numbers).
    return tensor_betas(group)


def _usual(group: dict[str, Any]) -> bool:
    betas = group["betas"]
    if (type(betas) is not tuple and type(betas) is not list) or len(betas) != 2:
        return False
    beta1, beta2 = betas
    return (
        type(beta1) in _PLAIN
        and type(beta2) in _PLAIN
        and 0.0 <= beta1 < 1.0
        and 0.0 <= beta2 < 1.0
    )


def _check_step_scalars(group: dict[str, Any], gathered: Gathered) -> None:
    # torch's Python scalars, as its for-loop computes them (betas set outside [0, 1)
    # after construction): `1 - 1.0 ** step` is 0 (ZeroDivisionError), `1.5 ** 2000`
    # overflows, and `(1 - 1.5 ** step) ** 0.5` is complex, which the param cannot take.
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    for step, param in zip(gathered.steps, gathered.params, strict=True):
        step_value = float(step) + 1
        bias_correction1 = 1 - beta1**step_value
        bias_correction2 = 1 - beta2**step_value
        if not isinstance(lr, Tensor):
            _ = lr / bias_correction1
        if isinstance(bias_correction2**0.5, complex):
            real = torch.view_as_real(param).dtype if param.is_complex() else param.dtype
            raise RuntimeError(
                f"result type {_TYPE_NAMES[real.to_complex()]} can't be cast to the "
                f"desired output type {_TYPE_NAMES[real]}"
            )


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    beta1, beta2 = group["betas"]
    states = gathered.states
    torch_adam.adam(
        gathered.params,
        gathered.grads,
        states[0],
        states[1],
        states[2] if group["amsgrad"] else [],
        gathered.steps,
        foreach=foreach,
        capturable=group["capturable"],
        differentiable=group["differentiable"],
        fused=fused,
        grad_scale=gathered.grad_scale,
        found_inf=gathered.found_inf,
        has_complex=gathered.has_complex,
        decoupled_weight_decay=group["decoupled_weight_decay"],
        amsgrad=group["amsgrad"],
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
    )


#: Adam's and AdamW's family (AdamW is Adam with ``decoupled_weight_decay=True``).
ADAM_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=adam_kernel,
    torch_step=_torch_step,
    gather=_gather,
    numbers=("lr", "eps", "weight_decay"),
    more_numbers=_betas,
    rust_unsupported=_rust_unsupported,
    usual=_usual,
    check_step_scalars=_check_step_scalars,
    aliased_grad=decay_first_aliased_grad,
    rounds_like_torch=True,
)


class Adam(RustStepMixin, torch.optim.Adam):
    """Drop-in :class:`torch.optim.Adam` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format as
    ``torch.optim.Adam``; results match its for-loop implementation. CPU float32/float64
    (and complex) parameters step in Rust; parameters on other devices, in other dtypes (but
    bfloat16 and float16, which Rust steps rounding every op as torch's for-loop does), or
    with ``differentiable=True`` step through torch's own implementation (fused where torch
    has it). ``foreach``, ``fused`` and ``capturable`` are accepted and honoured on that
    path.

    Extra keyword: ``max_grad_norm`` clips the global L2 norm of all gradients
    inside the step (see :mod:`ferroptim.clip`).
    """

    _ferro_spec = ADAM_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
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


class AdamW(RustStepMixin, torch.optim.AdamW):
    """Drop-in :class:`torch.optim.AdamW` whose CPU step runs in Rust.

    See :class:`Adam`; the only difference is decoupled weight decay
    (``param *= 1 - lr * weight_decay``), default ``weight_decay=1e-2``.
    """

    _ferro_spec = ADAM_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
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
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
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
