"""The oracle of ``ferroptim.Lion``: ``lion_pytorch.Lion`` (lion-pytorch's default,
non-Triton flavour) plus torch's conventions ferroptim.Lion adds as keywords.

``LionReference`` is the reference's constructor and its own update function
(``lion_pytorch.lion_pytorch.update_fn``, the arithmetic), with its step loop transcribed
and three additions that leave the arithmetic alone: ``maximize`` (the update sees the
negated gradient), ``foreach``/``differentiable`` accepted and recorded (its for-loop is
the reference either way), and the decoupling and initial lr read from the param group
(``decoupled_weight_decay``, ``init_lr``: where ferroptim.Lion keeps the reference's
``decoupled_wd`` and ``_init_lr`` attributes), so that a change to a live group means the
same on both sides. Its param groups carry the same keys as ferroptim.Lion's, so the
registry's generic tests compare groups key by key. What is specific to the real class
(its exact group keys, checkpoints written and read by ``lion_pytorch.Lion`` itself) is in
``tests/test_lion.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lion_pytorch
import torch
from torch.optim.optimizer import ParamsT

__all__ = ["LION_EXTRA_GROUP_KEYS", "Lion", "LionReference"]

#: Param-group keys ferroptim.Lion has beyond ``lion_pytorch.Lion``'s.
LION_EXTRA_GROUP_KEYS = (
    "decoupled_weight_decay",
    "init_lr",
    "maximize",
    "foreach",
    "differentiable",
)


class Lion(lion_pytorch.Lion):
    """``lion_pytorch.Lion`` with ``maximize`` (see the module docs). Named ``Lion``, so
    that errors naming the class (an unknown keyword) read as the reference's own."""

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
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            use_triton=use_triton,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        extra = {
            "decoupled_weight_decay": decoupled_weight_decay,
            "init_lr": lr,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
        }
        self.defaults.update(extra)
        for group in self.param_groups:
            for key, value in extra.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in filter(lambda p: p.grad is not None, group["params"]):
                # lion_pytorch.Lion.step's loop as it is (its unpacking included, so that
                # bad betas raise its errors), except that the decoupling and the initial
                # lr are read from the group (where ferroptim.Lion keeps them: the same
                # values unless a test changes them on a live group), and `maximize`.
                grad, lr, wd, beta1, beta2, state, decoupled_wd, init_lr = (
                    p.grad,
                    group["lr"],
                    group["weight_decay"],
                    *group["betas"],
                    self.state[p],
                    group["decoupled_weight_decay"],
                    group["init_lr"],
                )
                if group["maximize"]:
                    grad = -grad
                if decoupled_wd:
                    wd /= init_lr
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                # The reference's own update function (its arithmetic, op for op).
                self.update_fn(p, grad, state["exp_avg"], lr, wd, beta1, beta2)
        return loss


LionReference = Lion
