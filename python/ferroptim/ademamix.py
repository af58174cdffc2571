"""AdEMAMix: ``pytorch_optimizer.AdEMAMix`` (the ``pytorch-optimizer`` package) with the
CPU step in Rust (``rust/kernels/ademamix.rs``).

torch has no AdEMAMix: the class subclasses ``torch.optim.Optimizer`` directly and takes
the reference's constructor arguments, defaults, state keys (``exp_avg``, ``exp_avg_sq``,
``exp_avg_slow``) and its per-group step counter (``group['step']``, a Python int), so
checkpoints interchange with ``pytorch_optimizer.AdEMAMix``. Its update, per element (the
reference's torch ops, in its order)::

    g = g + wd * p                     (L2, weight_decay > 0 and not weight_decouple)
    p = p * (1 - wd * lr)              (weight_decouple; fixed_decay: 1 - wd)
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
    s = lerp(s, g, 1 - beta3_t)
    p = p - lr * (m / bc1 + alpha_t * s) / (sqrt(v) / sqrt(bc2) + eps)

with ``alpha_t`` and ``beta3_t`` warmed up over ``t_alpha_beta3`` steps when it is set.

One difference from the reference, none in the numbers: it negates (``maximize``) and
decays (L2) ``p.grad`` in place and leaves it so; ferroptim leaves gradients untouched, as
torch.optim does. Its errors are the reference's (its exception classes where
pytorch-optimizer is installed: see :mod:`ferroptim._reference_errors`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._hyper import flag
from ferroptim._optimizer import RustStepMixin
from ferroptim._reference_errors import check_constructor, no_sparse_gradient
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec

__all__ = ["AdEMAMix"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_slow")


def ademamix_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a group without a ``step`` entry has taken no step: the reference creates the entry
    on its first step, and the step driver does)."""
    return _core.Kernel("ademamix", group).step


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return _STATE_KEYS


def _init_state(param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    # The reference's init_group: three `torch.zeros_like(p)`.
    return {key: torch.zeros_like(param) for key in _STATE_KEYS}


def _betas_and_warmup(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    beta1, beta2, beta3 = group["betas"]  # the reference's unpacking (and its errors)
    numbers: tuple[tuple[str, Any], ...] = (("beta1", beta1), ("beta2", beta2), ("beta3", beta3))
    if group["t_alpha_beta3"] is not None:
        numbers += (("t_alpha_beta3", group["t_alpha_beta3"]),)
    return numbers


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # A tensor hyperparameter makes the reference compute its scalars in tensor
    # arithmetic: the kernel reproduces it for `lr` (see rust/kernels/ademamix.rs), the
    # torch ops below for the rest; and they alone do the reference's `cautious` and
    # `stable_adamw` options.
    others = ("weight_decay", "alpha", "t_alpha_beta3", "eps")
    _betas_and_warmup(group)  # (betas that do not unpack: the reference's error, first)
    return (
        any(isinstance(v, Tensor) for v in (*group["betas"], *(group[k] for k in others)))
        or bool(group.get("cautious"))
        or bool(group.get("stable_adamw"))
    )


def schedule_alpha(t_alpha_beta3: float | None, step: int, alpha: float) -> float:
    """The reference's ``AdEMAMix.schedule_alpha``."""
    return alpha if t_alpha_beta3 is None else min(step * alpha / t_alpha_beta3, alpha)


def schedule_beta3(t_alpha_beta3: float | None, step: int, beta1: float, beta3: float) -> float:
    """The reference's ``AdEMAMix.schedule_beta3``."""
    if t_alpha_beta3 is None:
        return beta3
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    return min(
        math.exp(
            log_beta1
            * log_beta3
            / ((1.0 - step / t_alpha_beta3) * log_beta3 + (step / t_alpha_beta3) * log_beta1)
        ),
        beta3,
    )


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    """AdEMAMix in torch ops (other devices and dtypes, ``differentiable=True``, tensor
    hyperparameters, the backend forced to ``"torch"``): the reference's per-parameter
    loop, op for op (its foreach flavour runs the same ops)."""
    if not gathered.params:
        return
    step = group.get("step", 0) + 1
    beta1, beta2, beta3 = group["betas"]
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    bias_correction1 = 1.0 - math.pow(beta1, step)
    bias_correction2_sq = math.sqrt(1.0 - math.pow(beta2, step))
    alpha_t = schedule_alpha(group["t_alpha_beta3"], step, group["alpha"])
    beta3_t = schedule_beta3(group["t_alpha_beta3"], step, beta1, beta3)
    maximize = flag(group["maximize"])
    for tensors in zip(gathered.params, gathered.grads, *gathered.states, strict=True):
        # (complex params step as real views, as torch.optim's algorithms step them)
        p, grad, exp_avg, exp_avg_sq, exp_avg_slow = (
            torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors
        )
        if maximize:
            grad = -grad
        if weight_decay != 0.0:
            if group["weight_decouple"]:
                p.mul_(1.0 - weight_decay * (1.0 if group["fixed_decay"] else lr))
            elif weight_decay > 0.0:
                grad = grad.add(p, alpha=weight_decay)
        exp_avg.lerp_(grad, weight=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        exp_avg_slow.lerp_(grad, weight=1.0 - beta3_t)
        de_nom = exp_avg_sq.sqrt().div_(bias_correction2_sq).add_(eps)
        if group.get("cautious"):
            update = exp_avg.clone()
            _apply_cautious(update, grad)
            update.div_(bias_correction1)
        else:
            update = exp_avg.div(bias_correction1)
        update.add_(exp_avg_slow, alpha=alpha_t)
        if group.get("stable_adamw") or p.dtype in (torch.float16, torch.bfloat16):
            update.div_(de_nom)
            if group.get("stable_adamw"):
                update.div_(_stable_adamw_rms(grad, exp_avg_sq))
            p.add_(update, alpha=-lr)
        else:
            p.addcdiv_(update, de_nom, value=-lr)


def _apply_cautious(update: Tensor, grad: Tensor) -> None:
    """The reference's ``BaseOptimizer.apply_cautious``: drop the update where it
    disagrees with the gradient's sign, rescaled by the kept fraction."""
    mask = (update * grad > 0).to(grad.dtype)
    mask.mul_(mask.numel() / (mask.sum() + 1))
    update.mul_(mask)


def _stable_adamw_rms(grad: Tensor, exp_avg_sq: Tensor, eps: float = 1e-16) -> Tensor:
    """The reference's ``BaseOptimizer.get_stable_adamw_rms``."""
    if grad.dtype in (torch.float16, torch.bfloat16):
        grad, exp_avg_sq = grad.float(), exp_avg_sq.float()
    return grad.pow(2).div_(exp_avg_sq.clip(min=eps)).mean().sqrt_().clip_(min=1.0)


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    """The reference's error for a sparse gradient, raised before anything is written (it
    raises it from ``init_group``, before its update too)."""
    if any(grad.is_sparse for grad in gathered.grads):
        raise no_sparse_gradient("AdEMAMix")


ADEMAMIX_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=ademamix_kernel,
    torch_step=_torch_step,
    init_state=_init_state,
    step_key=None,
    group_step_key="step",
    has_fused=False,
    sparse_to_torch=True,
    numbers=("lr", "weight_decay", "alpha", "eps"),
    more_numbers=_betas_and_warmup,
    rust_unsupported=_rust_unsupported,
    check_torch_path=_check_torch_path,
    rounds_like_torch=True,
)


class AdEMAMix(RustStepMixin, torch.optim.Optimizer):
    """Drop-in ``pytorch_optimizer.AdEMAMix`` whose CPU step runs in Rust.

    The reference's signature and defaults (``lr=1e-3``, ``betas=(0.9, 0.999, 0.9999)``,
    ``weight_decay=0.0``, ``weight_decouple=False``, ``fixed_decay=False``,
    ``alpha=5.0``, ``t_alpha_beta3=None``, ``eps=1e-8``, ``maximize=False``), its
    ``state_dict`` format (state ``exp_avg``, ``exp_avg_sq``, ``exp_avg_slow``; the step
    counter in each param group) and its numbers: float32 results are bitwise the
    reference's, except where torch's vectorised ``sqrt`` is one ulp off (about 0.7% of
    values on some CPUs; ours is correctly rounded). CPU float32/float64 parameters step
    in Rust, and bfloat16/float16 ones too, rounding every op as the reference's
    per-parameter loop does on them (its 16-bit branch: divide, then add); other devices
    and dtypes, complex params and ``differentiable=True`` step
    through torch ops computing what the reference computes, as do groups with the
    reference's ``cautious`` or ``stable_adamw`` options (like the reference, any other
    keyword is kept in the param groups as it is). Complex params step as real views, as
    torch.optim's algorithms step them (the reference refuses them).

    Extra keywords (torch's conventions): ``differentiable`` as in torch.optim;
    ``max_grad_norm`` clips the global L2 norm of all gradients inside the
    step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients hold
    an inf or nan; ``nonfinite_group``: the process group whose ranks agree on skipping.
    """

    _ferro_spec = ADEMAMIX_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        fixed_decay: bool = False,
        alpha: float = 5.0,
        t_alpha_beta3: float | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        foreach: bool | None = None,
        *,
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
        **kwargs: Any,
    ) -> None:
        # The reference's checks, with its messages.
        non_negative = {"alpha": alpha, "t_alpha_beta3": t_alpha_beta3}
        check_constructor(lr, betas, {**non_negative, "weight_decay": weight_decay, "eps": eps})
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "fixed_decay": fixed_decay,
            "alpha": alpha,
            "t_alpha_beta3": t_alpha_beta3,
            "eps": eps,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            **kwargs,
        }
        super().__init__(params, defaults)
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A checkpoint of the reference has no `maximize`/`differentiable` group keys
        # (it keeps `maximize` on the optimizer): this optimizer's values fill them.
        for group in self.param_groups:
            group.setdefault("maximize", self.defaults["maximize"])
            group.setdefault("differentiable", False)
