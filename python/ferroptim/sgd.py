"""SGD: torch.optim's class with the CPU step in Rust."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import sgd as torch_sgd
from torch.optim.optimizer import ParamsT

from ferroptim import _core
from ferroptim._optimizer import Gathered, RustStepMixin, scalar

__all__ = ["SGD"]


class SGD(RustStepMixin, torch.optim.SGD):
    """Drop-in :class:`torch.optim.SGD` whose CPU step runs in Rust.

    Same signature, defaults, param_group keys and ``state_dict`` format
    (``momentum_buffer``, created on a parameter's first step as torch does);
    results match torch's for-loop implementation, momentum, dampening,
    Nesterov, weight decay and maximize included. Sparse gradients (from
    ``nn.Embedding(sparse=True)``) step through torch's own implementation, as
    do parameters on other devices or dtypes.

    Extra keyword: ``max_grad_norm`` clips the global L2 norm of all gradients
    inside the step (see :mod:`ferroptim.clip`).
    """

    _ferro_step_key = None
    _ferro_sparse_to_torch = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self._ferro_init(max_grad_norm, skip_nonfinite, nonfinite_group)

    def _ferro_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _ferro_gather(self, group: dict[str, Any]) -> Gathered:
        g = Gathered(keys=self._ferro_state_keys(group))
        buffers: list[Tensor | None] = []
        g.has_sparse_grad = self._init_group(group, g.params, g.grads, buffers)
        g.states = [buffers] if g.keys else []
        return g

    def _ferro_rust_step(
        self,
        plan: _core.GroupPlan,
        group: dict[str, Any],
        unscale: float,
        clip: float,
        fresh: bool,
    ) -> None:
        _core.sgd_step(
            plan,
            scalar(group["lr"]),
            scalar(group["momentum"]),
            scalar(group["dampening"]),
            scalar(group["weight_decay"]),
            group["nesterov"],
            group["maximize"],
            fresh,
            unscale,
            clip,
        )

    def _ferro_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, foreach: bool, fused: bool
    ) -> None:
        buffers = gathered.states[0] if gathered.states else [None] * len(gathered.params)
        torch_sgd.sgd(
            gathered.params,
            gathered.grads,
            buffers,
            has_sparse_grad=gathered.has_sparse_grad,
            foreach=foreach,
            fused=fused,
            grad_scale=gathered.grad_scale,
            found_inf=gathered.found_inf,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if group["momentum"] != 0:
            # torch's functional creates first-step buffers in the list; keep them.
            for p, buffer in zip(gathered.params, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buffer
