"""NAdam: torch.optim's class, with ferroptim's step machinery.

Until NAdam's Rust kernel lands on the new engine (issue 9), every group steps
through torch's own implementation (its for-loop on CPU): the numbers are torch's,
and everything else ferroptim adds (``max_grad_norm``, ``skip_nonfinite``, GradScaler,
the plans' checks) already works.

Besides ``step``, each parameter's state keeps a per-tensor scalar ``mu_product`` (a
0-d tensor, the running product of the momentum schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import nadam as torch_nadam
from torch.optim.optimizer import ParamsT

from ferroptim._optimizer import Gathered, RustStepMixin, check_number, scalar
from ferroptim.adamax import usual_betas

__all__ = ["NAdam"]


@dataclass
class _NAdamGathered(Gathered):
    #: Each param's ``mu_product`` (a 0-d tensor, like its step counter).
    mu_products: list[Tensor] = field(default_factory=list)


class NAdam(RustStepMixin, torch.optim.NAdam):
    """Drop-in :class:`torch.optim.NAdam`.

    Same signature, defaults, param_group keys and ``state_dict`` format (``step``,
    ``mu_product``, ``exp_avg``, ``exp_avg_sq``); results are torch's for-loop
    implementation's. ``decoupled_weight_decay=True`` is NAdamW.

    Extra keywords: ``max_grad_norm`` clips the global L2 norm of all gradients inside
    the step (see :mod:`ferroptim.clip`); ``skip_nonfinite`` skips steps whose gradients
    hold an inf or nan.
    """

    _ferro_has_fused = False

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
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group)

    def _ferro_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _ferro_gather(self, group: dict[str, Any]) -> Gathered:
        g = _NAdamGathered(keys=("exp_avg", "exp_avg_sq"))
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        g.has_complex = self._init_group(
            group, g.params, g.grads, exp_avgs, exp_avg_sqs, g.mu_products, g.steps
        )
        g.states = [exp_avgs, exp_avg_sqs]
        return g

    _ferro_numbers = ("lr", "eps", "weight_decay", "momentum_decay")

    def _ferro_check_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._ferro_check_hyperparameters(group)
        beta1, beta2 = group["betas"]
        check_number(beta1, "beta1")
        check_number(beta2, "beta2")

    def _ferro_rust_unsupported(self, group: dict[str, Any]) -> bool:
        # No Rust kernel yet (it lands with the new engine): torch's implementation steps.
        return True

    def _ferro_usual(self, group: dict[str, Any]) -> bool:
        momentum_decay = group["momentum_decay"]
        return (
            usual_betas(group["betas"])
            and type(momentum_decay) in (int, float)
            and momentum_decay >= 0
        )

    def _ferro_check_step_scalars(self, group: dict[str, Any], gathered: Gathered) -> None:
        # torch's for-loop computes its per-step scalars in Python floats, from
        # `mu_product` as its float32 tensor product leaves it: hyperparameters set
        # outside the constructor's ranges can overflow (`1.5 ** 2000`) or divide by zero
        # (`1 - mu_product == 0`).
        if not isinstance(gathered, _NAdamGathered):
            return
        beta1, beta2 = group["betas"]
        lr, momentum_decay = group["lr"], group["momentum_decay"]
        for step_t, mu_product in zip(gathered.steps, gathered.mu_products, strict=True):
            step = float(step_t) + 1
            _ = 1 - beta2**step
            mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
            mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
            product = scalar(mu_product * mu)
            if not isinstance(lr, Tensor):
                _ = -lr * (1.0 - mu) / (1.0 - product)
                _ = (-lr * mu_next) / (1.0 - product * mu_next)

    def _ferro_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, foreach: bool, fused: bool
    ) -> None:
        assert isinstance(gathered, _NAdamGathered)
        beta1, beta2 = group["betas"]
        torch_nadam.nadam(
            gathered.params,
            gathered.grads,
            gathered.states[0],
            gathered.states[1],
            gathered.mu_products,
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
