"""Adan: ``pytorch_optimizer.Adan`` (the ``pytorch-optimizer`` package) with the CPU step
in Rust (``rust/kernels/adan.rs``).

torch has no Adan: the class subclasses ``torch.optim.Optimizer`` directly and takes the
reference's constructor arguments, defaults, state keys (``exp_avg``, ``exp_avg_sq``,
``exp_avg_diff``, ``previous_grad``: the negated previous gradient) and its per-group step
counter (``group['step']``), so checkpoints interchange with ``pytorch_optimizer.Adan``.

``max_grad_norm`` is the reference's: when above 0, every gradient is scaled by
``min(max_grad_norm / (sqrt(sum of squared gradient norms) + eps), 1)`` first, computed
over all groups as the reference computes it (float32 tensor arithmetic). Such steps run
through torch ops of ours (the reference's arithmetic, op for op); without it (the
default) CPU float32/float64 params step in Rust (bfloat16/float16 ones too, every op
rounded as the reference rounds it).

Differences from the reference, none in the numbers: it negates (``maximize``), clips and
finally negates ``p.grad`` in place and leaves it so; ferroptim leaves gradients as backward
wrote them, as torch.optim does. Its ``use_gc`` and ``adanorm`` options are not available
(the constructor says so). Its errors are its own (its exception classes where
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

__all__ = ["Adan"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad")


def adan_kernel(group: dict[str, Any]) -> KernelCall:
    """The group's Rust kernel, its hyperparameters read by name from the group now (a
    group without a ``step`` entry has taken no step)."""
    return _core.Kernel("adan", group).step


def _state_keys(group: dict[str, Any]) -> tuple[str, ...]:
    return _STATE_KEYS


def _init_state(param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    # The reference's init_group: three `torch.zeros_like(p)` and `previous_grad` from
    # the gradient; that one is made by the step itself (None until then: the Rust
    # kernel writes it on the param's first step, the torch ops below clone it).
    state: dict[str, Any] = {key: torch.zeros_like(param) for key in _STATE_KEYS[:3]}
    state["previous_grad"] = None
    return state


def _betas(group: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    beta1, beta2, beta3 = group["betas"]  # the reference's unpacking (and its errors)
    return (("beta1", beta1), ("beta2", beta2), ("beta3", beta3))


def _clips(group: dict[str, Any]) -> bool:
    max_grad_norm = group["max_grad_norm"]
    return isinstance(max_grad_norm, Tensor) or max_grad_norm != 0.0


def _rust_unsupported(group: dict[str, Any]) -> bool:
    # Clipping needs the reference's global norm in its own float32 arithmetic, and a
    # tensor hyperparameter other than `lr` (which the kernel reproduces) its tensor
    # arithmetic: the torch ops below do both.
    _betas(group)  # (betas that do not unpack: the reference's error, first)
    values = (*group["betas"], group["weight_decay"], group["eps"])
    return _clips(group) or any(isinstance(v, Tensor) for v in values)


def _clip_coefficient(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Any:
    """The reference's ``get_global_gradient_norm`` clip: 1.0, or a float32 tensor."""
    max_grad_norm = group["max_grad_norm"]
    if not _clips(group):
        return 1.0
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        total = torch.zeros(1, dtype=torch.float32)
    else:
        device = grads[0].device
        half = (torch.float16, torch.bfloat16)
        if grads[0].dtype not in half and all(
            g.device == device and g.dtype == grads[0].dtype and not g.is_sparse for g in grads
        ):
            norms = list(torch._foreach_norm(grads))
        else:
            norms = [(g.float() if g.dtype in half else g).norm() for g in grads]
        squared = torch.stack([n.to(device) for n in norms]).float().square_()
        total = squared.sum().reshape(1)
    total.sqrt_().add_(group["eps"])
    return torch.clamp(max_grad_norm / total, max=1.0)


def _torch_step(
    optimizer: torch.optim.Optimizer,
    gathered: Gathered,
    group: dict[str, Any],
    *,
    foreach: bool,
    fused: bool,
) -> None:
    """Adan in torch ops (other devices and dtypes, ``differentiable=True``, clipping,
    tensor hyperparameters, the backend forced to ``"torch"``): the reference's
    per-parameter loop, op for op."""
    if not gathered.params:
        return
    clip = _clip_coefficient(optimizer, group)
    step = group.get("step", 0) + 1
    beta1, beta2, beta3 = group["betas"]
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    bias_correction1 = 1.0 - math.pow(beta1, step)
    bias_correction2 = 1.0 - math.pow(beta2, step)
    bias_correction3_sq = math.sqrt(1.0 - math.pow(beta3, step))
    maximize = flag(group["maximize"])
    previous = gathered.states[3]
    for i, (param, raw) in enumerate(zip(gathered.params, gathered.grads, strict=True)):
        state = optimizer.state[param]
        if previous[i] is None:  # the param's first step: -grad (before maximize)
            previous[i] = state["previous_grad"] = raw.clone().mul_(-clip)
        tensors = (param, raw, *(s[i] for s in gathered.states))
        # (complex params step as real views, as the reference steps them)
        p, grad, exp_avg, exp_avg_sq, exp_avg_diff, grad_diff = (
            torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors
        )
        grad = -grad if maximize else grad
        grad = grad * clip if isinstance(clip, Tensor) or clip != 1.0 else grad
        grad_diff = grad_diff.add(grad)
        exp_avg.lerp_(grad, weight=1.0 - beta1)
        exp_avg_diff.lerp_(grad_diff, weight=1.0 - beta2)
        grad_diff.mul_(beta2).add_(grad)
        exp_avg_sq.mul_(beta3).addcmul_(grad_diff, grad_diff, value=1.0 - beta3)
        de_nom = exp_avg_sq.sqrt().div_(bias_correction3_sq).add_(eps)
        if weight_decay != 0.0 and group["weight_decouple"]:
            p.mul_(1.0 - lr * weight_decay)
        p.addcdiv_(exp_avg, de_nom, value=-lr / bias_correction1)
        p.addcdiv_(exp_avg_diff, de_nom, value=-lr * beta2 / bias_correction2)
        if weight_decay != 0.0 and not group["weight_decouple"]:
            p.div_(1.0 + lr * weight_decay)
        previous_grad = state["previous_grad"]
        previous_grad.copy_(
            torch.view_as_complex(-grad) if torch.is_complex(previous_grad) else -grad
        )


def _check_torch_path(gathered: Gathered, group: dict[str, Any]) -> None:
    """The reference's error for a sparse gradient, raised before anything is written."""
    if any(grad.is_sparse for grad in gathered.grads):
        raise no_sparse_gradient("Adan")


ADAN_SPEC = OptimizerSpec(
    state_keys=_state_keys,
    kernel=adan_kernel,
    torch_step=_torch_step,
    init_state=_init_state,
    step_key=None,
    group_step_key="step",
    has_fused=False,
    sparse_to_torch=True,
    numbers=("lr", "weight_decay", "eps", "max_grad_norm"),
    more_numbers=_betas,
    rust_unsupported=_rust_unsupported,
    check_torch_path=_check_torch_path,
    rounds_like_torch=True,
)


class Adan(RustStepMixin, torch.optim.Optimizer):
    """Drop-in ``pytorch_optimizer.Adan`` whose CPU step runs in Rust.

    The reference's signature and defaults (``lr=1e-3``, ``betas=(0.98, 0.92, 0.99)``,
    ``weight_decay=0.0``, ``weight_decouple=False``, ``max_grad_norm=0.0``,
    ``foreach=None``, ``eps=1e-8``, ``maximize=False``), its ``state_dict`` format and its
    numbers: float32 results are bitwise the reference's except where torch's vectorised
    ``sqrt`` is one ulp off (ours is correctly rounded). CPU bfloat16/float16 params step
    in Rust too, rounding every op as the reference's per-parameter loop does on them.
    ``max_grad_norm`` is the reference's own global clipping (see the module docs), not
    ferroptim's.

    Extra keywords (torch's conventions): ``differentiable`` as in torch.optim;
    ``skip_nonfinite`` skips steps whose gradients hold an inf or nan;
    ``nonfinite_group``: the process group whose ranks agree on skipping. Like the
    reference, other keywords are kept in the param groups as they are.
    """

    _ferro_spec = ADAN_SPEC

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        max_grad_norm: float = 0.0,
        foreach: bool | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        differentiable: bool = False,
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
        non_negative = {"weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "eps": eps}
        check_constructor(lr, betas, non_negative)
        for option in ("use_gc", "adanorm"):
            if kwargs.get(option):
                raise ValueError(f"ferroptim.Adan does not implement the reference's {option!r}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "weight_decouple": weight_decouple,
            "max_grad_norm": max_grad_norm,
            "foreach": foreach,
            "eps": eps,
            "maximize": maximize,
            "differentiable": differentiable,
            **kwargs,
        }
        super().__init__(params, defaults)
        # (the reference's `max_grad_norm` is a group key; ferroptim's own clipping is off)
        self._ferro_init(
            None,
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
