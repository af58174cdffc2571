"""The registry's entries for ``ferroptim.ScheduleFreeAdamW`` / ``ScheduleFreeSGD`` and
their oracles, ``schedulefree.AdamWScheduleFree`` / ``SGDScheduleFree`` (1.4.1).

Both sides are put in train mode when made (the references refuse to step otherwise, and
the registry's generic tests make an optimizer and step it): ``TrainedScheduleFreeAdamW`` is
``ferroptim.ScheduleFreeAdamW`` plus ``train()`` at the end of ``__init__``.

The oracles are the reference classes themselves (their constructor, their ``step``,
their arithmetic) with what ferroptim's classes add as torch conventions:

* ``maximize`` per param group: the reference steps on the negated gradients;
* gradients left as they were: the reference overwrites ``p.grad`` with the normalised,
  decayed gradient; here it steps on copies, so the caller's stay untouched;
* complex params stepped as real views (param, gradient and state), as torch.optim's
  algorithms step them; the reference computes in complex arithmetic.

What is specific to the real classes (their exact group keys, checkpoints written and read
by them, ``train()``/``eval()``, their in-place gradients) is in
``tests/test_schedulefree.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import ferroptim
import schedulefree
import torch

__all__ = [
    "SCHEDULEFREE_EXTRA_GROUP_KEYS",
    "ScheduleFreeAdamWReference",
    "ScheduleFreeSGDReference",
    "TrainedScheduleFreeAdamW",
    "TrainedScheduleFreeSGD",
]

#: Param-group keys ferroptim's Schedule-Free optimizers have beyond the reference's.
SCHEDULEFREE_EXTRA_GROUP_KEYS = ("maximize",)


def _train_mode(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.train()`` for an optimizer without state, which only sets the groups'
    ``train_mode`` (its lookup of each param's state would also leave an empty entry per
    param in ``optimizer.state``, which the registry's tests, written for torch's lazily
    created state, do not expect; test_schedulefree checks the real ``train()``)."""
    assert not any(optimizer.state.values())
    for group in optimizer.param_groups:
        group["train_mode"] = True
    # The reference's `foreach=True` default also makes torch's `zero_grad` use
    # `_foreach_zero_`, which refuses lazily negated gradients (the stateful safety test
    # makes them): both sides of the registry's twins zero gradients one by one instead,
    # as torch's own optimizers do by default (`zero_grad` reads only the defaults).
    if optimizer.defaults.get("foreach"):
        optimizer.defaults["foreach"] = None


class TrainedScheduleFreeAdamW(ferroptim.ScheduleFreeAdamW):
    """``ferroptim.ScheduleFreeAdamW`` in train mode from the start (see the module docs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _train_mode(self)


class TrainedScheduleFreeSGD(ferroptim.ScheduleFreeSGD):
    """``ferroptim.ScheduleFreeSGD`` in train mode from the start (see the module docs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _train_mode(self)


# (the registry's tests read the constructor's signature: ferroptim's own)
for _trained, _cls in (
    (TrainedScheduleFreeAdamW, ferroptim.ScheduleFreeAdamW),
    (TrainedScheduleFreeSGD, ferroptim.ScheduleFreeSGD),
):
    _trained.__signature__ = inspect.signature(_cls)  # type: ignore[attr-defined]
    _trained.__init__.__signature__ = inspect.signature(_cls.__init__)  # type: ignore[attr-defined,misc]


class _TorchConventions:
    """What both oracles add to their reference class (see the module docs)."""

    reference: Any
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]

    def _conventions(self, maximize: bool) -> None:
        self.defaults["maximize"] = maximize
        for group in self.param_groups:
            group.setdefault("maximize", maximize)
        _train_mode(self)  # type: ignore[arg-type]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        if "maximize" in self.defaults:  # (the constructor's groups: _conventions)
            self.param_groups[-1].setdefault("maximize", self.defaults["maximize"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not self.param_groups[0]["train_mode"]:  # (the reference's check, before closure)
            inspect.unwrap(self.reference.step)(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [group["params"] for group in self.param_groups]
        originals = {
            p: (p.grad, bool(group["maximize"]))
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        }
        views: dict[Any, torch.Tensor] = {}
        state = self.state  # type: ignore[attr-defined]
        try:
            for p, (grad, maximize) in originals.items():
                p.grad = torch.neg(grad) if maximize else grad.clone()
            for group in self.param_groups:
                group["params"] = [self._real_view(p, views) for p in group["params"]]
            # The reference's own step, without the hook wrapper torch puts on a class it
            # instantiates (hooks run once, around this step).
            inspect.unwrap(self.reference.step)(self)
        finally:
            for group, params in zip(self.param_groups, groups, strict=True):
                group["params"] = params
            for p, view in views.items():
                if view in state:
                    state[p] = {k: torch.view_as_complex(v) for k, v in state.pop(view).items()}
            for p, (grad, _) in originals.items():
                p.grad = grad
        return loss

    def _real_view(self, p: torch.Tensor, views: dict[Any, torch.Tensor]) -> torch.Tensor:
        """A complex param as its real view (gradient and state too), as ferroptim and
        torch.optim's algorithms step it."""
        if not torch.is_complex(p):
            return p
        state = self.state  # type: ignore[attr-defined]
        view = views[p] = torch.view_as_real(p.detach())
        view.grad = None if p.grad is None else torch.view_as_real(p.grad)
        if p in state:
            state[view] = {k: torch.view_as_real(v) for k, v in state.pop(p).items()}
        return view


class ScheduleFreeAdamW(_TorchConventions, schedulefree.AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFree`` with per-group ``maximize``, untouched gradients,
    in train mode from the start. Named as ferroptim's class, so that errors naming the
    class (an unknown keyword) read alike."""

    reference = schedulefree.AdamWScheduleFree

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = True,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
        )
        self._conventions(maximize)


class ScheduleFreeSGD(_TorchConventions, schedulefree.SGDScheduleFree):
    """``schedulefree.SGDScheduleFree`` with per-group ``maximize``, untouched gradients,
    in train mode from the start (named as ferroptim's class)."""

    reference = schedulefree.SGDScheduleFree

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = True,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
        )
        self._conventions(maximize)


ScheduleFreeAdamWReference = ScheduleFreeAdamW
ScheduleFreeSGDReference = ScheduleFreeSGD
