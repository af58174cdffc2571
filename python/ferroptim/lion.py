"""Lion: ``lion_pytorch.Lion`` (the ``lion-pytorch`` package) with the CPU step in Rust
(``rust/kernels/lion.rs``).

torch has no Lion: the class subclasses ``torch.optim.Optimizer`` directly and takes the
reference's constructor arguments, defaults and state key (``exp_avg``, no step counter),
so checkpoints interchange with ``lion_pytorch.Lion``. Its update, per element (the
reference's torch ops, in its order)::

    p = p * (1 - lr * wd)           (wd = weight_decay / init_lr with decoupled_weight_decay)
    p = p - lr * sign(beta1 * m + (1 - beta1) * g)
    m = beta2 * m + (1 - beta2) * g

The reference keeps ``decoupled_weight_decay`` and its constructor's ``lr`` (``init_lr``,
the divisor of the decoupled decay) as attributes; here they are param-group keys
(``decoupled_weight_decay``, ``init_lr``), so the Rust kernel reads them by name like every
other hyperparameter. A checkpoint of the reference (which lacks them) gets this
optimizer's constructor values, as the reference itself would use its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._hyper import flag
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim.adamax import tensor_betas

__all__ = ["Lion"]


# -- the Rust kernel call (hyperparameters read by name in the prepare phase) -----------


def lion_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now
    (a missing or non-numeric one raises KeyError/TypeError here)."""
    betas = group["betas"]
    if type(betas) is not tuple or len(betas) != 2:
        betas_unpacked(group)  # the reference's error for betas it cannot unpack
    return _core.Kernel("lion", group).step


def betas_unpacked(group: dict[str, Any]) -> tuple[Any, Any]:
    """``beta1, beta2`` unpacked as the reference's step unpacks them (one tuple of eight
    with ``*group['betas']`` in the middle), so that betas set to something else raise
    the reference's own error (``Value after * must be an iterable``, ``too many values
    to unpack (expected 8)``)."""
    betas: Iterable[Any] = group["betas"]
    values: tuple[Any, ...] = (None, None, None, *betas, None, None, None)
    _, _, _, beta1, beta2, _, _, _ = values
    return beta1, beta2


def _betas_as_numbers(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    beta1, beta2 = betas_unpacked(group)
    return (("beta1", beta1), ("beta2", beta2))


# -- the rest of the family ---------------------------------------------------------------

_STATE_KEYS = ("exp_avg",)


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return _STATE_KEYS


def _init_state(param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    # The reference: `state['exp_avg'] = torch.zeros_like(p)` on the first step.
    return {"exp_avg": torch.zeros_like(param)}


def _weight_decay(group: dict[str, Any]) -> Any:
    """The decay the reference multiplies ``lr`` by (a Python float or a tensor)."""
    weight_decay = group["weight_decay"]
    if flag(group["decoupled_weight_decay"]):
        weight_decay = weight_decay / group["init_lr"]  # the reference's `wd /= init_lr`
    return weight_decay


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # Tensor hyperparameters make the reference compute its scalars in tensor arithmetic
    # (float32): the kernel reproduces it for a tensor `lr` (`1 - lr * wd`, see
    # rust/kernels/lion.rs), the torch-op path below for the rest (tensor betas or weight
    # decay, and a tensor initial lr dividing the decoupled decay).
    return (
        tensor_betas(group)
        or isinstance(group["weight_decay"], Tensor)
        or (isinstance(group["init_lr"], Tensor) and flag(group["decoupled_weight_decay"]))
    )


def _single_tensor(
    gathered: Gathered, lr: Any, weight_decay: Any, beta1: Any, beta2: Any, maximize: bool
) -> None:
    for param, grad, exp_avg in zip(
        gathered.params, gathered.grads, gathered.states[0], strict=True
    ):
        if maximize:
            grad = -grad
        # The reference's update_fn, op for op (without `.data`, so that a
        # differentiable step records it).
        param.mul_(1.0 - lr * weight_decay)
        update = exp_avg.clone().mul_(beta1).add(grad, alpha=1.0 - beta1).sgn_()
        param.add_(update, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)


def _multi_tensor(
    gathered: Gathered, lr: Any, weight_decay: Any, beta1: Any, beta2: Any, maximize: bool
) -> None:
    # The same ops as the single-tensor code, each over the whole list (not lion-pytorch's
    # own foreach flavour, whose lerp rounds differently).
    params, exp_avgs = gathered.params, gathered.states[0]
    grads = torch._foreach_neg(gathered.grads) if maximize else gathered.grads
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    updates = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(updates, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(updates)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    """Lion in torch ops (other devices and dtypes, ``differentiable=True``, the backend
    forced to ``"torch"``): the reference's arithmetic exactly."""
    if not gathered.params:
        return
    beta1, beta2 = betas_unpacked(group)
    args = (gathered, group["lr"], _weight_decay(group), beta1, beta2, flag(group["maximize"]))
    if foreach and not any(g.is_sparse for g in gathered.grads) and not _any_tensor(group):
        _multi_tensor(*args)
    else:
        _single_tensor(*args)


def _any_tensor(group: dict[str, Any]) -> bool:
    # torch's foreach ops take Python scalars only for `alpha`.
    return tensor_betas(group) or any(
        isinstance(group[key], Tensor) for key in ("lr", "weight_decay", "init_lr")
    )


def _fits(param: Tensor, buffer: Any) -> bool:
    return (
        isinstance(buffer, Tensor)
        and buffer.shape == param.shape
        and buffer.dtype == param.dtype
        and buffer.device == param.device
    )


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    """Raises now what the reference's ops would raise mid-step (after stepping the
    params before) for a state buffer or grad that does not fit its param (a buffer
    replaced by a real view of a complex one, a tensor of another shape): the same ops on
    throwaway copies, so the error is the reference's own, message included, and nothing
    is written. (Only such misfits pay for the copies.)"""
    beta1, beta2 = betas_unpacked(group)
    lr, weight_decay, maximize = group["lr"], _weight_decay(group), flag(group["maximize"])
    for param, grad, exp_avg in zip(
        gathered.params, gathered.grads, gathered.states[0], strict=True
    ):
        if _fits(param, exp_avg) and (grad.is_sparse or _fits(param, grad)):
            continue
        if not isinstance(exp_avg, Tensor) or grad.is_sparse:
            continue  # (the step itself raises, or steps, as the reference's)
        with torch.no_grad():
            trial = Gathered(
                keys=_STATE_KEYS,
                params=[param.detach().clone()],
                grads=[grad.detach().clone()],
                states=[[exp_avg.detach().clone()]],
            )
            _single_tensor(trial, lr, weight_decay, beta1, beta2, maximize)


LION_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=lion_kernel,
    torch_step=_torch_step,
    init_state=_init_state,
    step_key=None,
    has_fused=False,
    # The reference steps sparse gradients (its dense ops take them): so do we, its way.
    sparse_to_torch=True,
    complex_as_real=False,
    # The reference reads the grad after decaying the param and again after updating it.
    own_grad_alias_to_torch=True,
    numbers=("lr", "weight_decay", "init_lr"),
    more_numbers=_betas_as_numbers,
    rust_unsupported=_rust_unsupported,
    check_torch_path=_check_torch_path,
    rounds_like_torch=True,
)


class Lion(RustStepMixin, torch.optim.Optimizer):
    """Drop-in ``lion_pytorch.Lion`` whose CPU step runs in Rust.

    The reference's signature and defaults (``lr=1e-4``, ``betas=(0.9, 0.99)``,
    ``weight_decay=0.0``, ``decoupled_weight_decay=False``: the decay divided by the
    constructor's ``lr``), its ``state_dict`` format (state ``exp_avg``) and its numbers:
    float32 results are bitwise the reference's (default, non-Triton flavour). CPU
    float32/float64 (and complex) parameters step in Rust, and bfloat16/float16 ones too,
    rounding every op as the reference's ops do on them; other devices and dtypes, and
    ``differentiable=True``, step through torch-op code computing exactly what the
    reference computes (``foreach`` ops where they apply).

    ``use_triton`` is accepted for the signature's sake; only ``False`` (the default).

    Extra keywords (torch's conventions, defaults keep the reference's behaviour):
    ``maximize`` ascends instead; ``foreach`` and ``differentiable`` as in torch.optim;
    ``max_grad_norm`` clips the global L2 norm of all gradients inside the step (see
    :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients hold an inf
    or nan; ``nonfinite_group``: the process group whose ranks agree on skipping.
    """

    _ferro_spec = LION_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
        # The reference's checks, with its exception type (AssertionError).
        if not lr > 0.0:
            raise AssertionError(f"Invalid learning rate: {lr} (lion_pytorch asserts lr > 0)")
        if not all(0.0 <= beta <= 1.0 for beta in betas):
            raise AssertionError(
                f"Invalid betas: {betas} (lion_pytorch asserts 0 <= beta <= 1 for each)"
            )
        if use_triton:
            raise ValueError(
                "ferroptim.Lion does not take use_triton=True: CPU tensors step in Rust and "
                "other devices through torch ops (lion_pytorch's Triton kernel is not used)"
            )
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "init_lr": lr,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
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
        # A checkpoint of lion_pytorch.Lion has only the reference's group keys: the rest
        # take this optimizer's constructor values (the reference reads its decoupling
        # and initial lr from its constructor too).
        for group in self.param_groups:
            for key in ("decoupled_weight_decay", "init_lr", "maximize", "foreach"):
                group.setdefault(key, self.defaults[key])
            group.setdefault("differentiable", False)
