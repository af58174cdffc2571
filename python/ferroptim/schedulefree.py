"""Schedule-Free AdamW and SGD: ``schedulefree.AdamWScheduleFree`` and
``schedulefree.SGDScheduleFree`` (the ``schedulefree`` package, 1.4.1) with the CPU step in
Rust (``rust/kernels/schedulefree.rs``).

torch has no Schedule-Free optimizers: the classes subclass ``torch.optim.Optimizer``
directly and take the reference's constructor arguments, defaults, state keys (``z`` and,
for AdamW, ``exp_avg_sq``) and its per-group state (``k``, ``train_mode``, ``weight_sum``,
``lr_max``, ``scheduled_lr``), so checkpoints interchange with the reference's. The param
holds ``y`` in train mode and ``x`` in eval mode; ``optimizer.train()`` and
``optimizer.eval()`` swap them with the reference's own ``lerp_`` calls (torch ops, on any
device), and stepping in eval mode raises the reference's exception. Per step and group,
in the reference's Python::

    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr = lr * sched;  lr_max = max(lr, lr_max)
    weight = (k + 1)**r * lr_max**weight_lr_power;  weight_sum += weight
    ckp1 = weight / weight_sum   (0 where weight_sum is 0)

and per element (AdamW; SGD has no second moment and decays the gradient first)::

    v = beta2 * v + (1 - beta2) * g * g
    u = g / (sqrt(v / (1 - beta2**(k+1))) + eps) + weight_decay * y
    y = lerp(y, z, ckp1) + lr * (beta1 * (1 - ckp1) - 1) * u
    z = z - lr * u

The group scalars are computed here, from the values before the step, and handed to the
kernel by name; the step driver stores the new ones once the step has run (so a step that
raises or is skipped leaves the group as it was).

Differences from the reference: it overwrites ``p.grad`` with the normalised, decayed
gradient (ferroptim leaves gradients untouched, as torch.optim does); complex params step as
real views here, as torch.optim's algorithms step them (the reference computes in complex
arithmetic: AdamW's ``grad * grad`` is then not ``|grad|**2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ferroptim import _core, _step
from ferroptim._hyper import flag
from ferroptim._optimizer import RustStepMixin
from ferroptim._spec import Gathered, KernelCall, OptimizerSpec
from ferroptim._torch_compat import hooked_step

__all__ = ["ScheduleFreeAdamW", "ScheduleFreeSGD"]

#: The reference's exception (a plain ``Exception``) for a step in eval mode.
NOT_IN_TRAIN_MODE = (
    "Optimizer was not in train mode when step is called. "
    "Please insert .train() and .eval() calls on the "
    "optimizer. See documentation for details."
)

#: The reference's default for ``foreach``: its flavour on every device where torch has
#: foreach ops (ferroptim's CPU step is the same arithmetic either way).
_FOREACH_DEFAULT = hasattr(torch, "_foreach_mul_")


@dataclass(frozen=True)
class GroupScalars:
    """One step's group scalars, in the reference's Python arithmetic."""

    #: ``lr * sched`` (the reference's ``scheduled_lr``).
    lr: Any
    lr_max: Any
    weight_sum: Any
    ckp1: Any


def group_scalars(group: dict[str, Any]) -> GroupScalars:
    """This step's scalars from the group's values before it (the reference's code)."""
    k = group["k"]
    warmup_steps = group["warmup_steps"]
    sched = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr = group["lr"] * sched
    lr_max = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] + weight
    try:
        ckp1 = weight / weight_sum
    except ZeroDivisionError:
        ckp1 = 0
    return GroupScalars(lr, lr_max, weight_sum, ckp1)


def advance_group(group: dict[str, Any]) -> None:
    """What the reference's step leaves in the group: its new scalars and ``k + 1``."""
    scalars = group_scalars(group)
    group["scheduled_lr"] = scalars.lr
    group["lr_max"] = scalars.lr_max
    group["weight_sum"] = scalars.weight_sum
    group["k"] = group["k"] + 1


def _adamw_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel with this step's scalars (see the module docs)."""
    beta1, beta2 = group["betas"]  # (the reference's unpacking, and its error, first)
    s = group_scalars(group)
    # (float(): where `lr` is a tensor these are 0-d tensors, whose values the reference's
    # ops read as Python scalars)
    hyper = {
        **group,
        "scheduled_lr": float(s.lr),
        "ckp1": float(s.ckp1),
        "y_lr": float(s.lr * (beta1 * (1 - s.ckp1) - 1)),
        "bias_correction2": 1 - beta2 ** (group["k"] + 1),
    }
    return _core.Kernel("schedulefree_adamw", hyper).step


def _sgd_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel with this step's scalars (see the module docs)."""
    s = group_scalars(group)
    hyper = {
        **group,
        "scheduled_lr": float(s.lr),
        "ckp1": float(s.ckp1),
        "y_lr": float(s.lr * (group["momentum"] * (1 - s.ckp1) - 1)),
    }
    return _core.Kernel("schedulefree_sgd", hyper).step


def _adamw_state(param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    # The reference's lazy state: `z` a copy of the param (y), `exp_avg_sq` zeros.
    return {
        "z": torch.clone(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def _sgd_state(param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    return {"z": torch.clone(param, memory_format=torch.preserve_format)}


def _adamw_numbers(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    beta1, beta2 = group["betas"]
    return (("beta1", beta1), ("beta2", beta2))


def _tensor_hyper(group: dict[str, Any], names: tuple[str, ...]) -> bool:
    # A tensor hyperparameter the ops read (eps, weight decay, betas, momentum) makes the
    # reference compute in tensor arithmetic: its torch ops below reproduce that, the
    # kernels do not. A tensor `lr` (torch's recipe for a compiled step with a scheduler)
    # only makes the group scalars tensors, computed here by the reference's expressions
    # and handed to the kernel as the numbers the reference's ops then read.
    return any(isinstance(group[name], Tensor) for name in names)


def _adamw_rust_unsupported(group: dict[str, Any]) -> bool:
    beta1, beta2 = group["betas"]  # (the reference's unpacking, and its error, first)
    names = ("eps", "weight_decay", "r", "weight_lr_power")
    return _tensor_hyper(group, names) or isinstance(beta1, Tensor) or isinstance(beta2, Tensor)


def _sgd_rust_unsupported(group: dict[str, Any]) -> bool:
    return _tensor_hyper(group, ("momentum", "weight_decay", "r", "weight_lr_power"))


def _real(tensors: list[Tensor]) -> list[Tensor]:
    # (complex params step as real views, as torch.optim's algorithms step them)
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def _grads(gathered: Gathered, group: dict[str, Any]) -> list[Tensor]:
    # (new tensors: the reference's in-place gradient updates would show in p.grad)
    if flag(group["maximize"]):
        return _real([torch.neg(g) for g in gathered.grads])
    return _real([g.clone() for g in gathered.grads])


def _adamw_torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    """Schedule-Free AdamW in torch ops (other devices and dtypes, tensor
    hyperparameters, the backend forced to ``"torch"``): the reference's ops in its order
    (its foreach flavour, or its per-parameter loop), on copies of the gradients."""
    if not gathered.params:
        return
    beta1, beta2 = group["betas"]
    eps, decay = group["eps"], group["weight_decay"]
    s = group_scalars(group)
    bias_correction2 = 1 - beta2 ** (group["k"] + 1)
    y, z, exp_avg_sq = (_real(t) for t in (gathered.params, *gathered.states))
    grad = _grads(gathered, group)
    if foreach:
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=1 - beta2)
        denom = torch._foreach_div(exp_avg_sq, bias_correction2)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(grad, denom)
        if decay != 0:
            torch._foreach_add_(grad, y, alpha=decay)
        torch._foreach_lerp_(y, z, weight=s.ckp1)
        torch._foreach_add_(y, grad, alpha=s.lr * (beta1 * (1 - s.ckp1) - 1))
        torch._foreach_sub_(z, grad, alpha=s.lr)
        return
    for p, g, z_p, v in zip(y, grad, z, exp_avg_sq, strict=True):
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        g.div_(v.div(bias_correction2).sqrt_().add_(eps))
        if decay != 0:
            g.add_(p, alpha=decay)
        p.lerp_(end=z_p, weight=s.ckp1)
        p.add_(g, alpha=s.lr * (beta1 * (1 - s.ckp1) - 1))
        z_p.sub_(g, alpha=s.lr)


def _sgd_torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    """Schedule-Free SGD in torch ops (see :func:`_adamw_torch_step`)."""
    if not gathered.params:
        return
    momentum, weight_decay = group["momentum"], group["weight_decay"]
    s = group_scalars(group)
    y, z = _real(gathered.params), _real(gathered.states[0])
    grad = _grads(gathered, group)
    if foreach:
        if weight_decay != 0:
            torch._foreach_add_(grad, y, alpha=weight_decay)
        torch._foreach_lerp_(y, z, weight=s.ckp1)
        torch._foreach_add_(y, grad, alpha=s.lr * (momentum * (1 - s.ckp1) - 1))
        torch._foreach_sub_(z, grad, alpha=s.lr)
        return
    for p, g, z_p in zip(y, grad, z, strict=True):
        if weight_decay != 0:
            g.add_(p, alpha=weight_decay)
        p.lerp_(end=z_p, weight=s.ckp1)
        p.add_(g, alpha=s.lr * (momentum * (1 - s.ckp1) - 1))
        z_p.sub_(g, alpha=s.lr)


def _adamw_check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    """The reference's error for a sparse gradient (its ``addcmul_`` has no sparse kernel:
    torch's NotImplementedError), raised before anything is written: the same op on a
    scratch tensor raises it."""
    for grad in gathered.grads:
        if grad.is_sparse:
            torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device).addcmul_(grad, grad)


_COMMON_SPEC: dict[str, Any] = {
    "step_key": None,
    # Sparse gradients take the torch-op code: SGD's steps them as the reference does (its
    # ops take them), AdamW's raises the reference's error first.
    "sparse_to_torch": True,
    "advance_group": advance_group,
    "has_fused": False,
    "init_key": "z",
    # bfloat16/float16 params step in Rust with the reference's per-op rounding.
    "rounds_like_torch": True,
}

SCHEDULEFREE_ADAMW_SPEC = OptimizerSpec(
    state_keys=lambda group: ("z", "exp_avg_sq"),
    kernel=_adamw_kernel,
    torch_step=_adamw_torch_step,
    init_state=_adamw_state,
    numbers=("lr", "eps", "weight_decay"),
    more_numbers=_adamw_numbers,
    rust_unsupported=_adamw_rust_unsupported,
    check_torch_path=_adamw_check_torch_path,
    **_COMMON_SPEC,
)

SCHEDULEFREE_SGD_SPEC = OptimizerSpec(
    state_keys=lambda group: ("z",),
    kernel=_sgd_kernel,
    torch_step=_sgd_torch_step,
    init_state=_sgd_state,
    numbers=("lr", "momentum", "weight_decay"),
    rust_unsupported=_sgd_rust_unsupported,
    **_COMMON_SPEC,
)


class _ScheduleFree(RustStepMixin, torch.optim.Optimizer):
    """What both Schedule-Free optimizers share: ``train()``/``eval()`` and the check
    that a step runs in train mode."""

    def _swap_weight(self, group: dict[str, Any], to_train: bool) -> float:
        raise NotImplementedError

    @torch.no_grad()
    def eval(self) -> None:
        """Sets the params to ``x`` (the average, what to evaluate and checkpoint)."""
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:
                        weight = self._swap_weight(group, to_train=False)
                        p.lerp_(end=state["z"].to(device=p.device, dtype=p.dtype), weight=weight)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Sets the params to ``y`` (where gradients are taken and steps are made)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:
                        weight = self._swap_weight(group, to_train=True)
                        p.lerp_(end=state["z"].to(device=p.device, dtype=p.dtype), weight=weight)
                group["train_mode"] = True

    def step(self, closure: Any = None) -> Any:
        """Performs a single optimization step (in train mode, as the reference requires).

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        if not self.param_groups[0]["train_mode"]:
            raise Exception(NOT_IN_TRAIN_MODE)
        return _step.step(self, closure)

    step = hooked_step(step)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # A checkpoint of the reference has no `maximize` group key: this optimizer's
        # value fills it.
        for group in self.param_groups:
            group.setdefault("maximize", self.defaults["maximize"])


class ScheduleFreeAdamW(_ScheduleFree):
    """Drop-in ``schedulefree.AdamWScheduleFree`` whose CPU step runs in Rust.

    The reference's signature and defaults (``lr=0.0025``, ``betas=(0.9, 0.999)``,
    ``eps=1e-8``, ``weight_decay=0``, ``warmup_steps=0``, ``r=0.0``,
    ``weight_lr_power=2.0``, ``foreach`` True where torch has foreach ops), its
    ``state_dict`` format (state ``z``, ``exp_avg_sq``; ``k``, ``train_mode``,
    ``weight_sum``, ``lr_max``, ``scheduled_lr`` in each param group), its
    ``train()``/``eval()`` and its numbers: float32 results are bitwise the reference's,
    except where torch's vectorised ``sqrt`` is one ulp off (ours is correctly rounded).
    Call ``optimizer.train()`` before training and ``optimizer.eval()`` before evaluating
    or saving, as with the reference. CPU float32/float64 params step in Rust, and
    bfloat16/float16 ones too, every op rounded as the reference's ops round it on them
    (its foreach and per-parameter flavours alike); other devices and dtypes, complex
    params and tensor hyperparameters step through the reference's torch ops (tensor
    ``betas``/``eps``/``weight_decay``). Complex params step as real views, as
    torch.optim's algorithms step them (the reference's complex arithmetic squares
    ``grad`` as a complex number).

    Extra keywords (torch's conventions): ``maximize``; ``max_grad_norm`` clips the global
    L2 norm of all gradients inside the step (see :mod:`ferroptim.clip`);
    ``skip_nonfinite`` skips steps whose gradients hold an inf or nan; ``nonfinite_group``:
    the process group whose ranks agree on skipping; ``ema_decay`` keeps a moving average
    of the params as the step leaves them (``y``, in train mode; see :mod:`ferroptim._ema`).
    """

    _ferro_spec = SCHEDULEFREE_ADAMW_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = _FOREACH_DEFAULT,
        *,
        maximize: bool = False,
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
        # The reference's defaults, in its order (it checks no argument).
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "r": r,
            "k": 0,
            "warmup_steps": warmup_steps,
            "train_mode": False,
            "weight_sum": 0.0,
            "lr_max": -1.0,
            "scheduled_lr": 0.0,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
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

    def _swap_weight(self, group: dict[str, Any], to_train: bool) -> float:
        beta1, _ = group["betas"]
        return 1 - beta1 if to_train else 1 - 1 / beta1


class ScheduleFreeSGD(_ScheduleFree):
    """Drop-in ``schedulefree.SGDScheduleFree`` whose CPU step runs in Rust.

    The reference's signature, defaults and checks (``lr=1.0``, ``momentum=0.9``,
    ``weight_decay=0``, ``warmup_steps=0``, ``r=0.0``, ``weight_lr_power=2``, ``foreach``
    True where torch has foreach ops), its ``state_dict`` format (state ``z``; ``k``,
    ``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr`` in each param group), its
    ``train()``/``eval()`` and its numbers, bitwise. Extra keywords as for
    :class:`ScheduleFreeAdamW`.
    """

    _ferro_spec = SCHEDULEFREE_SGD_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = _FOREACH_DEFAULT,
        *,
        maximize: bool = False,
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
        # The reference's checks, with its messages.
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if momentum <= 0 or momentum >= 1:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "r": r,
            "k": 0,
            "warmup_steps": warmup_steps,
            "train_mode": False,
            "weight_sum": 0.0,
            "lr_max": -1.0,
            "scheduled_lr": 0.0,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
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

    def _swap_weight(self, group: dict[str, Any], to_train: bool) -> float:
        momentum = group["momentum"]
        return 1 - momentum if to_train else 1 - 1 / momentum
