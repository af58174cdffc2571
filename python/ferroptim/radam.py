"""RAdam: torch.optim's class with the CPU step in Rust (``rust/kernels/radam.rs``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import radam as torch_radam
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._hyper import check_number, is_number
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import init_group
from ferroptim.adam import decay_first_aliased_grad
from ferroptim.adamax import betas_as_numbers, tensor_betas, usual_betas

__all__ = ["RAdam"]


# -- the Rust kernel call (hyperparameters read by name in the prepare phase) -----------


def radam_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises torch's KeyError/TypeError here)."""
    return _core.Kernel("radam", group).step


# -- the rest of the family ---------------------------------------------------------------

#: torch's names of the real dtypes a complex update cannot be cast to.
_REAL_NAMES = {torch.float32: "Float", torch.float64: "Double"}


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


def _gather(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Gathered:
    g = Gathered(keys=("exp_avg", "exp_avg_sq"))
    exp_avgs: list[Tensor] = []
    exp_avg_sqs: list[Tensor] = []
    g.has_complex = init_group(optimizer, group, g.params, g.grads, exp_avgs, exp_avg_sqs, g.steps)
    g.states = [exp_avgs, exp_avg_sqs]
    return g


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # Tensor betas: torch's tensor arithmetic (see tensor_betas). An eps that is not a
    # number: torch reads eps only on rectified steps (`rho_t > 5`), so it steps
    # with one until then; its for-loop gives exactly that (see _check_torch_path).
    return tensor_betas(group) or not is_number(group["eps"])


def _rectified(beta2: Any, step: float) -> bool:
    """Whether torch's for-loop takes the rectified (adaptive) update at ``step``."""
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * step * (beta2**step) / (1 - beta2**step) > 5.0


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    # torch's `exp_avg_sq.sqrt().add_(eps)` raises on the first rectified step with
    # an eps it cannot add, after earlier params were stepped: raised here first.
    if not is_number(group["eps"]):
        beta2 = group["betas"][1]
        if any(_rectified(beta2, float(s) + 1) for s in gathered.steps):
            check_number(group["eps"], "eps")


def _usual(group: dict[str, Any]) -> bool:
    return usual_betas(group["betas"])


def _check_step_scalars(group: dict[str, Any], gathered: Gathered) -> None:
    # torch's for-loop computes its per-step scalars in Python floats. Betas set outside
    # [0, 1) after construction can divide by zero (`2 / (1 - beta2)`), overflow
    # (`1.5 ** 2000`) or, once `rho_t > 5`, take the square root of a negative number: a
    # complex rectification that torch's `param.add_` then refuses to cast.
    beta1, beta2 = group["betas"]
    for param, step_t in zip(gathered.params, gathered.steps, strict=True):
        step = float(step_t) + 1
        _ = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        if not rho_t > 5.0:
            continue
        rect_squared = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = rect_squared**0.5
        if isinstance(rect, complex) or isinstance(bias_correction2**0.5, complex):
            real = torch.view_as_real(param).dtype if param.is_complex() else param.dtype
            name = _REAL_NAMES.get(real, str(real))
            raise RuntimeError(
                f"result type Complex{name} can't be cast to the desired output type {name}"
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
    torch_radam.radam(
        gathered.params,
        gathered.grads,
        gathered.states[0],
        gathered.states[1],
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
        eps=group["eps"],
    )


RADAM_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=radam_kernel,
    torch_step=_torch_step,
    gather=_gather,
    has_fused=False,
    # eps is read only on rectified steps: see _rust_unsupported.
    numbers=("lr", "weight_decay"),
    more_numbers=betas_as_numbers,
    rust_unsupported=_rust_unsupported,
    usual=_usual,
    check_step_scalars=_check_step_scalars,
    check_torch_path=_check_torch_path,
    aliased_grad=decay_first_aliased_grad,
    rounds_like_torch=True,
)


class RAdam(RustStepMixin, torch.optim.RAdam):
    """Drop-in :class:`torch.optim.RAdam` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``,
    ``exp_avg``, ``exp_avg_sq``); results match torch's for-loop implementation.
    ``decoupled_weight_decay=True`` is RAdamW. CPU float32/float64 (and complex) parameters
    step in Rust; parameters on other devices, in other dtypes (but bfloat16 and float16,
    which Rust steps rounding every op as torch's for-loop does), or with
    ``differentiable=True`` step through torch's own implementation (foreach where it can:
    torch has no fused RAdam).

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_spec = RADAM_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
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
