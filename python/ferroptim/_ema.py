"""The parameters' exponential moving average: ``ema_decay=`` on every ferroptim optimizer.

Each param of a group with ``ema_decay`` set keeps ``state["ema"]``, exactly the values
``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
keeps when its ``update_parameters(model)`` is called after every step:

* a param's average starts as a copy of the param after its first step (AveragedModel's
  first update copies);
* after every later step it is ``torch.lerp(ema, param, 1 - decay)`` (torch's
  ``_foreach_lerp_``), for every param that has an average, stepped this time or not
  (AveragedModel moves the average of a param without a gradient towards it too).

Where the Rust kernel steps a param (CPU float32/float64, the element-wise optimizers),
the average is updated inside the same pass (block by block, right after the step
wrote the param, ``rust/engine/elementwise.rs``): 8 bytes per float32 element on top of
the step, instead of AveragedModel's separate 12-byte pass. Everything else (other
devices, torch's path, the optimizers whose step is not one element-wise pass) gets
torch's own ``_foreach_lerp_`` after the step, here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ferroptim._spec import OptimizerSpec

__all__ = ["EMA_KEY", "EmaMixin", "check_ema_decay", "ema_weight", "fused_ema_keys"]

#: The state key of a param's moving average.
EMA_KEY = "ema"
_DECAY_KEY = "ema_decay"


def check_ema_decay(value: Any) -> float | None:
    """``ema_decay`` as a float in [0, 1], or None (no average)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or (isinstance(value, Tensor) and value.numel() != 1):
        raise TypeError(f"ema_decay must be a number or None, got {value!r}")
    try:
        decay = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"ema_decay must be a number or None, got {value!r}") from None
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"Invalid ema_decay value: {value}")
    return decay


def ema_weight(group: dict[str, Any]) -> float | None:
    """The group's lerp weight ``1 - ema_decay`` (as get_ema_multi_avg_fn computes it),
    or None when the group keeps no average."""
    decay = check_ema_decay(group.get(_DECAY_KEY))
    return None if decay is None else 1 - decay


def fused_ema_keys(spec: OptimizerSpec, group: dict[str, Any]) -> tuple[str, ...]:
    """``("ema",)`` where the group's Rust step updates the average in its own pass (an
    element-wise kernel, nothing beside the plan), else ``()``."""
    if (
        group.get(_DECAY_KEY) is None
        or spec.plan_extras is not None
        or not spec.ema_in_kernel
        or group.get("master_weights")  # (the kernel's master loop writes no average)
    ):
        return ()
    return (EMA_KEY,)


def _lerp_all(averages: list[Tensor], params: list[Tensor], weight: float) -> None:
    """``torch._foreach_lerp_`` per (device, dtype), as get_ema_multi_avg_fn calls it."""
    by_kind: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
    for average, param in zip(averages, params, strict=True):
        lists = by_kind.setdefault((param.device, param.dtype, type(param)), ([], []))
        lists[0].append(average)
        lists[1].append(param.detach())
    for kind_averages, kind_params in by_kind.values():
        if kind_params[0].is_floating_point() or kind_params[0].is_complex():
            torch._foreach_lerp_(kind_averages, kind_params, weight)


class EmaMixin:
    """``ema_decay`` and :meth:`ema_weights` for an optimizer class (see module docs)."""

    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]

    def _ema_init(self, ema_decay: float | None) -> None:
        """Call at the end of ``__init__``: ``ema_decay`` becomes a param-group default
        (left out when None, so that the groups' keys stay torch's; a group added with
        its own ``ema_decay`` keeps an average all the same)."""
        decay = check_ema_decay(ema_decay)
        if decay is None:
            return
        self.defaults[_DECAY_KEY] = decay
        for group in self.param_groups:
            group.setdefault(_DECAY_KEY, decay)

    def _ema_defaults(self) -> None:
        """Groups loaded from a checkpoint without the key (torch's) keep the
        constructor's ``ema_decay``."""
        decay = self.defaults.get(_DECAY_KEY)
        if decay is not None:
            for group in self.param_groups:
                group.setdefault(_DECAY_KEY, decay)

    @torch.no_grad()
    def _ema_after_step(self, fused: dict[int, set[int] | None]) -> None:
        """Every average the step did not update in Rust: created (a copy of a param
        stepped for the first time) or moved towards its param. ``fused[id(group)]``:
        ids of the group's params whose average the Rust step updated (None: every
        param with a gradient)."""
        for group in self.param_groups:
            weight = ema_weight(group)
            if weight is None:
                continue
            done = fused.get(id(group), set())
            averages: list[Tensor] = []
            params: list[Tensor] = []
            for p in group["params"]:
                if (id(p) in done) if done is not None else p.grad is not None:
                    continue
                state = self.state.get(p)
                if not state and p.grad is None:
                    continue  # never stepped: no average yet
                average = self.state[p].get(EMA_KEY)
                if average is None:
                    if p.grad is not None:
                        self.state[p][EMA_KEY] = p.detach().clone()
                    continue
                averages.append(average)
                params.append(p)
            if averages:
                _lerp_all(averages, params, weight)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within the ``with`` block every param that has an average holds it (and the
        average holds the param); on leaving, even by an exception, both are swapped
        back, bit for bit. Meant for evaluation: do not step inside the block.

        Example::

            opt = ferroptim.AdamW(model.parameters(), lr=1e-3, ema_decay=0.999)
            ...
            with opt.ema_weights():
                evaluate(model)
        """
        pairs = [
            (p, self.state[p][EMA_KEY])
            for group in self.param_groups
            for p in group["params"]
            if EMA_KEY in self.state.get(p, {})
        ]
        _swap(pairs)
        try:
            yield
        finally:
            _swap(pairs)


@torch.no_grad()
def _swap(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Swaps the values of each (param, average) in place (one tensor's copy at a time:
    the memory of the params and of their averages stays where it is)."""
    for param, average in pairs:
        held = param.detach().clone()
        param.copy_(average)
        average.copy_(held)
