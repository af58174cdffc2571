"""Oracles from ``pytorch-optimizer`` for the optimizers ferroptim takes from it.

``AdEMAMixReference`` (``AdanReference``) is ``pytorch_optimizer.AdEMAMix`` (``.Adan``)
itself (its constructor, its ``step``, its arithmetic), with what ferroptim.AdEMAMix
(ferroptim.Adan) adds as torch conventions:

* ``maximize`` per param group (the reference keeps one ``maximize`` attribute for the
  whole optimizer): each group is stepped with the attribute set from the group;
* ``differentiable`` accepted and recorded as a group key;
* gradients left as they were: the reference negates (``maximize``) and decays (L2)
  ``p.grad`` in place; here it steps on copies of the gradients, so the caller's stay
  untouched, as torch.optim leaves them;
* complex params stepped as real views (``torch.view_as_real``: param, gradient and state),
  as torch.optim's algorithms step them; the reference refuses them.

The arithmetic is the reference's own.

What is specific to the real class (its own group keys, checkpoints written and read by
it, its in-place gradients) is checked in ``tests/test_ademamix.py``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytorch_optimizer
import torch

__all__ = [
    "ADEMAMIX_EXTRA_GROUP_KEYS",
    "AdEMAMixReference",
    "AdanReference",
    "exact_norms_and_sqrt",
]

#: Param-group keys ferroptim.AdEMAMix has beyond ``pytorch_optimizer.AdEMAMix``'s.
ADEMAMIX_EXTRA_GROUP_KEYS = ("maximize", "differentiable")


def step_each_group_on_grad_copies(optimizer: Any, step: Callable[[], Any]) -> None:
    """Runs the reference's ``step`` once per param group, with its ``maximize``
    attribute read from the group, on copies of the gradients, complex params replaced by
    real views (their state kept under the complex param, viewed back as complex)."""
    groups = optimizer.param_groups
    state = optimizer.state
    originals = {p: p.grad for g in groups for p in g["params"] if p.grad is not None}
    views: dict[Any, torch.Tensor] = {}
    try:
        for p, grad in originals.items():
            p.grad = grad.clone()
        for group in groups:
            params = []
            for p in group["params"]:
                if torch.is_complex(p):
                    view = views[p] = torch.view_as_real(p.detach())
                    view.grad = None if p.grad is None else torch.view_as_real(p.grad)
                    if p in state:
                        state[view] = {k: torch.view_as_real(v) for k, v in state.pop(p).items()}
                    params.append(view)
                else:
                    params.append(p)
            optimizer.param_groups = [{**group, "params": params}]
            optimizer.maximize = bool(group["maximize"])
            step()
            if "step" in optimizer.param_groups[0]:
                group["step"] = optimizer.param_groups[0]["step"]
    finally:
        optimizer.param_groups = groups
        for p, view in views.items():
            if view in state:
                state[p] = {k: torch.view_as_complex(v) for k, v in state.pop(view).items()}
        for p, grad in originals.items():
            p.grad = grad


class _TorchConventions:
    """What both oracles add to their reference class (see the module docs)."""

    #: The pytorch-optimizer class whose own ``step`` runs.
    reference: Any
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]

    def _add_group_keys(self, maximize: bool, differentiable: bool) -> None:
        extra = {"maximize": maximize, "differentiable": differentiable}
        self.defaults.update(extra)
        for group in self.param_groups:
            for key, value in extra.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        if "differentiable" in self.defaults:  # (the constructor's groups: _add_group_keys)
            for key in ADEMAMIX_EXTRA_GROUP_KEYS:
                self.param_groups[-1].setdefault(key, self.defaults[key])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The reference's own step, without the hook wrapper torch puts on a class it
        # instantiates (hooks run once, around this step).
        references_step = inspect.unwrap(self.reference.step)
        step_each_group_on_grad_copies(self, lambda: references_step(self))
        return loss


class AdEMAMix(_TorchConventions, pytorch_optimizer.AdEMAMix):
    """``pytorch_optimizer.AdEMAMix`` with per-group ``maximize``, untouched gradients and
    complex params (see the module docs). Named ``AdEMAMix``, so that errors naming the
    class read as the reference's own."""

    reference = pytorch_optimizer.AdEMAMix

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
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
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            alpha=alpha,
            t_alpha_beta3=t_alpha_beta3,
            eps=eps,
            maximize=maximize,
            foreach=foreach,
            **kwargs,
        )
        self._add_group_keys(maximize, differentiable)


AdEMAMixReference = AdEMAMix


class Adan(_TorchConventions, pytorch_optimizer.Adan):
    """``pytorch_optimizer.Adan`` with per-group ``maximize`` and untouched gradients (see
    the module docs; its own ``max_grad_norm`` clips over the groups stepped together, so
    the registry's cases leave it at 0: test_adan checks it against the real class)."""

    reference = pytorch_optimizer.Adan

    def __init__(
        self,
        params: Any,
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
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            max_grad_norm=max_grad_norm,
            foreach=foreach,
            eps=eps,
            maximize=maximize,
            **kwargs,
        )
        self._add_group_keys(maximize, differentiable)


AdanReference = Adan


@contextlib.contextmanager
def exact_norms_and_sqrt() -> Iterator[None]:
    """``torch._foreach_norm`` returning float64 norms rounded to each tensor's dtype, and
    ``torch._foreach_sqrt`` correctly rounded (NumPy's, on the same dtype): the two ops
    of ``pytorch_optimizer.Lamb``'s default flavour torch does not round correctly on
    every CPU (ferroptim's are)."""
    norm, sqrt = torch._foreach_norm, torch._foreach_sqrt

    def exact_norm(tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        return [torch.linalg.vector_norm(t.double()).to(t.dtype) for t in tensors]

    def exact_sqrt(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(
            t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) for t in tensors
        ):
            return sqrt(tensors)
        return [torch.from_numpy(np.sqrt(t.detach().numpy())) for t in tensors]

    torch._foreach_norm, torch._foreach_sqrt = exact_norm, exact_sqrt  # type: ignore[assignment]
    try:
        yield
    finally:
        torch._foreach_norm, torch._foreach_sqrt = norm, sqrt  # type: ignore[assignment]
