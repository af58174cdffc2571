"""What the prepare phase hands the run phase: one :class:`Job` per param group, and
the gradient factors (GradScaler's unscale, the clip coefficient) the run applies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ferroptim import _core

__all__ = ["NO_FACTORS", "CachedPlan", "GradFactors", "Job"]


@dataclass(frozen=True)
class GradFactors:
    """What each gradient is multiplied by as the step reads it: GradScaler's inverse
    scale (``unscale_tensor`` for torch's path), then the clip coefficient."""

    unscale: float = 1.0
    clip: float = 1.0
    unscale_tensor: Tensor | None = None
    clip_tensor: Tensor | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


NO_FACTORS = GradFactors()


class Job:
    """One prepared group: its Rust plans and torch-routed grads (for the global
    norm and the finiteness check), ``run`` to step it, ``cancel`` to forget it."""

    __slots__ = (
        "_run",
        "dtensor_grads",
        "ema_all",
        "ema_fused",
        "new_state",
        "norm_plans",
        "plans",
        "torch_grads",
    )

    def __init__(
        self,
        plans: list[_core.GroupPlan],
        torch_grads: list[Tensor],
        run: Callable[[GradFactors], None],
        new_state: list[Tensor] | None = None,
        norm_plans: list[_core.GroupPlan] | None = None,
        dtensor_grads: list[Tensor] | None = None,
        ema_fused: list[Tensor] | None = None,
        *,
        ema_all: bool = False,
    ) -> None:
        self.plans = plans
        self.torch_grads = torch_grads
        self._run = run
        #: Params whose (lazily created) state this preparation made.
        self.new_state = new_state or []
        #: Plans whose gradients count in this rank's share of the norm.
        self.norm_plans = plans if norm_plans is None else norm_plans
        #: Gradients that are DTensors: their norm is taken across ranks.
        self.dtensor_grads = dtensor_grads or []
        #: Params whose moving average (``ema_decay``) the Rust step updates.
        self.ema_fused = ema_fused or []
        #: The Rust step updates the average of every param of the group that has a
        #: gradient (a cached plan's step).
        self.ema_all = ema_all

    def ema_fused_ids(self) -> set[int] | None:
        """Ids of :attr:`ema_fused` (None: every param with a gradient)."""
        return None if self.ema_all else {id(p) for p in self.ema_fused}

    def run(self, factors: GradFactors) -> None:
        self._run(factors)

    def cancel(self) -> None:
        for plan in self.plans:
            plan.release()


@dataclass
class CachedPlan:
    """A group's plan kept for the next step, and what it was made for."""

    group: dict[str, Any]
    params: list[Tensor]
    key: tuple[Any, ...]
    plan: _core.GroupPlan
