"""Adam and AdamW: torch.optim's classes with the CPU step in Rust."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import adam as torch_adam
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._optimizer import Gathered, RustStepMixin, lr_is_f32, scalar

__all__ = ["Adam", "AdamW"]


class _AdamFamily(RustStepMixin):
    """Adam's state, gathering and kernels; shared by :class:`Adam` and :class:`AdamW`."""

    def _ferro_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _ferro_gather(self, group: dict[str, Any]) -> Gathered:
        g = Gathered(keys=self._ferro_state_keys(group))
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        g.has_complex = self._init_group(  # type: ignore[attr-defined]
            group, g.params, g.grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, g.steps
        )
        g.states = [exp_avgs, exp_avg_sqs]
        if group["amsgrad"]:
            g.states.append(max_exp_avg_sqs)
        return g

    def _ferro_aliased_grad(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        # torch's AdamW decays the param before reading the (un-negated) grad.
        decays_first = group["decoupled_weight_decay"] and group["weight_decay"] != 0
        if decays_first and not group["maximize"] and grad.data_ptr() == param.data_ptr():
            return grad.mul(1 - scalar(group["lr"]) * scalar(group["weight_decay"]))
        return grad.clone()

    def _ferro_rust_step(
        self,
        plan: _core.GroupPlan,
        group: dict[str, Any],
        unscale: float,
        clip: float,
        fresh: bool,
    ) -> None:
        beta1, beta2 = group["betas"]
        _core.adam_step(
            plan,
            scalar(group["lr"]),
            scalar(beta1),
            scalar(beta2),
            scalar(group["eps"]),
            scalar(group["weight_decay"]),
            group["decoupled_weight_decay"],
            group["amsgrad"],
            group["maximize"],
            unscale,
            clip,
            lr_is_f32(group["lr"]),
        )

    def _ferro_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, foreach: bool, fused: bool
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


class Adam(_AdamFamily, torch.optim.Adam):
    """Drop-in :class:`torch.optim.Adam` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format as
    ``torch.optim.Adam``; results match its for-loop implementation. CPU
    float32/float64 (and complex) parameters step in Rust; parameters on other
    devices, in other dtypes, or with ``differentiable=True`` step through
    torch's own implementation (fused where torch has it). ``foreach``,
    ``fused`` and ``capturable`` are accepted and honoured on that path.

    Extra keyword: ``max_grad_norm`` clips the global L2 norm of all gradients
    inside the step (see :mod:`ferroptim.clip`).
    """

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
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group)


class AdamW(_AdamFamily, torch.optim.AdamW):
    """Drop-in :class:`torch.optim.AdamW` whose CPU step runs in Rust.

    See :class:`Adam`; the only difference is decoupled weight decay
    (``param *= 1 - lr * weight_decay``), default ``weight_decay=1e-2``.
    """

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
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group)
