"""The step driver: what ``optimizer.step()`` does, for every ferroptim optimizer.

1. **Prepare** every param group before touching any tensor. A group with a
   cached plan re-checks it in Rust (``GroupPlan.gather``: same params, same
   pointers, same state tensors, well-formed grads); anything else takes the slow
   path (:mod:`ferroptim._prepare`). Each prepared group is a
   :class:`~ferroptim._jobs.Job`.
2. **Clip** (``max_grad_norm``) and check finiteness (``skip_nonfinite``): one pass
   over every gathered gradient computes the global norm; the coefficient is applied
   inside the update (:func:`grad_factors`).
3. **Run** every job: one call into Rust per group (the GIL is released inside), then
   torch's implementation for whatever was routed there.

So an error in any group leaves every tensor as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ferroptim import _core
from ferroptim._ema import EMA_KEY, ema_weight
from ferroptim._jobs import NO_FACTORS, CachedPlan, GradFactors, Job
from ferroptim._lowp import advance_rounding, rounding_key
from ferroptim._norms import (
    clip_coefficient,
    clip_coefficient_value,
    inverse_scale_value,
    is_finite,
    tensor_norm,
    total_norm,
)
from ferroptim._prepare import plan_key
from ferroptim._torch_compat import (
    full,
    sparse_values,
)

if TYPE_CHECKING:
    from ferroptim._optimizer import RustStepMixin

__all__ = ["step"]


def step(optimizer: RustStepMixin, closure: Callable[[], Any] | None) -> Any:
    """``optimizer.step(closure)`` (see module docs)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()

    found_inf = getattr(optimizer, "found_inf", None)  # set by torch.amp.GradScaler
    if found_inf is not None and found_inf.item():
        return loss  # the scaler saw inf/nan: skip the step, as torch does
    grad_scale = getattr(optimizer, "grad_scale", None)

    cache = optimizer.__dict__
    plans: dict[int, CachedPlan] | None = cache.get("_ferro_plans")
    snapshot = cache.get("_ferro_snapshot")
    if plans is None or snapshot is None or not snapshot.matches(optimizer.state):
        plans = cache["_ferro_plans"] = {}

    jobs: list[Job] = []
    slow = False
    try:
        for group in optimizer.param_groups:
            job = fast_job(optimizer, group, plans)
            if job is None:
                slow = True
                job = optimizer._prepare_slow(group, plans)
            jobs.append(job)
            ema_weight(group)  # a bad ema_decay raises before anything is written
        factors = grad_factors(optimizer, jobs, grad_scale, found_inf)
    except BaseException:
        _cancel(optimizer, jobs, undo_state=False)
        raise
    if factors is None:  # non-finite gradients with skip_nonfinite
        _cancel(optimizer, jobs, undo_state=True)
        _count_skip(optimizer)
    else:
        for job in jobs:
            job.run(factors)
        _after_run(optimizer, jobs)
    if slow or factors is None:
        live = {id(g) for g in optimizer.param_groups}
        for key in [k for k in plans if k not in live]:
            del plans[key]
        cache["_ferro_snapshot"] = _core.StateSnapshot(optimizer.state)
    return loss


def _after_run(optimizer: RustStepMixin, jobs: list[Job]) -> None:
    """What follows a step that ran: the moving averages the kernels did not update
    (``ema_decay``), then the per-group state a step moves on, in every group
    (``rounding_step``, ``group_step_key``, ``advance_group``)."""
    if any(group.get("ema_decay") is not None for group in optimizer.param_groups):
        optimizer._ema_after_step(
            {
                id(group): job.ema_fused_ids()
                for group, job in zip(optimizer.param_groups, jobs, strict=True)
            }
        )
    advance_rounding(optimizer.param_groups)
    spec = optimizer._ferro_spec
    if spec.group_step_key is not None:
        for group in optimizer.param_groups:
            group[spec.group_step_key] = group.get(spec.group_step_key, 0) + 1
    if spec.advance_group is not None:
        for group in optimizer.param_groups:
            spec.advance_group(group)


def fast_job(
    optimizer: RustStepMixin, group: dict[str, Any], plans: dict[int, CachedPlan]
) -> Job | None:
    """The group's job from its cached plan, or None when the plan is gone or stale."""
    cached = plans.get(id(group))
    if (
        cached is None
        or cached.group is not group
        or cached.params is not group["params"]
        or cached.key != plan_key(optimizer, group)
    ):
        return None
    # Hyperparameters are converted before the plan gathers (and holds) anything.
    spec = optimizer._ferro_spec
    kernel = spec.kernel(group)
    stochastic = rounding_key(optimizer.param_groups, group)
    if stochastic is not None:
        weight = ema_weight(group) if EMA_KEY in cached.key[0] else None
        if not cached.plan.gather():
            return None
        plan = cached.plan
        return Job(
            [plan],
            [],
            lambda factors: kernel(
                plan, factors.unscale, factors.clip, False, ema=weight, stochastic=stochastic
            ),
            ema_all=weight is not None,
        )
    if EMA_KEY in cached.key[0]:
        weight = ema_weight(group)
        if weight is None or not cached.plan.gather():
            return None
        plan = cached.plan
        return Job(
            [plan],
            [],
            lambda factors: kernel(plan, factors.unscale, factors.clip, False, ema=weight),
            ema_all=True,
        )
    if not cached.plan.gather():
        return None
    plan = cached.plan
    if spec.plan_extras is not None:
        try:
            extras = spec.plan_extras(
                cast("torch.optim.Optimizer", optimizer),
                [p for p in group["params"] if p.grad is not None],
            )
        except BaseException:
            plan.release()
            raise
        return Job(
            [plan], [], lambda factors: kernel(plan, factors.unscale, factors.clip, False, extras)
        )
    return Job([plan], [], lambda factors: kernel(plan, factors.unscale, factors.clip, False))


# -- clipping, unscaling and skipping -------------------------------------------------------


def _inverse_scale(grad_scale: Tensor | None, tensor_needed: bool) -> tuple[float, Tensor | None]:
    """GradScaler's unscale factor; also as a tensor where torch's path multiplies by one."""
    if grad_scale is None:
        return 1.0, None
    # torch's GradScaler.unscale_: inv_scale = scale.double().reciprocal().float()
    if tensor_needed:
        unscale_tensor = grad_scale.double().reciprocal().float()
        return float(unscale_tensor), unscale_tensor
    return inverse_scale_value(grad_scale), None


def _global_norm(
    rust_plans: list[_core.GroupPlan],
    torch_grads: list[Tensor],
    dtensor_grads: list[Tensor],
    unscale: float,
    unscale_tensor: Tensor | None,
) -> Tensor:
    """The L2 norm of every (unscaled) gradient of this step, as torch computes it."""
    values, float64 = _core.grad_norms(rust_plans, 2.0, unscale) if rust_plans else ([], False)
    others = [tensor_norm(g, 2.0) for g in torch_grads]
    if dtensor_grads:  # sharded: torch reduces the norm across ranks
        others.append(full(torch.nn.utils.get_total_norm(dtensor_grads, 2.0)))
    if unscale_tensor is not None:
        others = [n * unscale_tensor.to(n.device) for n in others]
    return total_norm(values, float64, others, 2.0)


def _all_finite(
    optimizer: RustStepMixin,
    rust_plans: list[_core.GroupPlan],
    torch_grads: list[Tensor],
    dtensor_grads_finite: bool,
) -> bool:
    """Whether every gradient (on every rank of ``nonfinite_group``) is finite."""
    finite = (
        (not rust_plans or _core.grads_finite(rust_plans))
        and all(
            bool(torch.isfinite(sparse_values(g) if g.is_sparse else g).all()) for g in torch_grads
        )
        and dtensor_grads_finite
    )
    if optimizer.nonfinite_group is not None:
        finite = _agree_finite(finite, optimizer.nonfinite_group)
    return finite


def grad_factors(
    optimizer: RustStepMixin,
    jobs: list[Job],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> GradFactors | None:
    """GradScaler's unscale and the clip coefficient for this step (one parallel
    pass over every gradient computes the global norm); None when
    ``skip_nonfinite`` finds an inf or nan gradient."""
    max_grad_norm = optimizer.max_grad_norm
    if grad_scale is None and max_grad_norm is None and not optimizer.skip_nonfinite:
        return NO_FACTORS
    rust_plans = [plan for job in jobs for plan in job.norm_plans]
    torch_grads = [g for job in jobs for g in job.torch_grads]
    dtensor_grads = [g for job in jobs for g in job.dtensor_grads]
    # torch's path multiplies by tensors
    tensors_needed = bool(torch_grads or dtensor_grads)
    unscale, unscale_tensor = _inverse_scale(grad_scale, tensors_needed)
    clip = 1.0
    clip_tensor = None
    finite = True
    if max_grad_norm is not None or (optimizer.skip_nonfinite and dtensor_grads):
        norm = _global_norm(rust_plans, torch_grads, dtensor_grads, unscale, unscale_tensor)
        finite = is_finite(norm)
    if max_grad_norm is not None:
        optimizer.last_grad_norm = norm
        if tensors_needed:
            clip_tensor = clip_coefficient(max_grad_norm, norm)
            clip = float(clip_tensor)
        else:
            clip = clip_coefficient_value(max_grad_norm, norm)
    # (a norm can overflow with finite float64 grads: ask again)
    if (
        optimizer.skip_nonfinite
        and (max_grad_norm is None or not finite)
        and not _all_finite(optimizer, rust_plans, torch_grads, not dtensor_grads or finite)
    ):
        return None
    return GradFactors(unscale, clip, unscale_tensor, clip_tensor, grad_scale, found_inf)


def _agree_finite(finite: bool, group: Any) -> bool:
    """Whether every rank of ``group`` saw finite gradients (one tiny all-reduce)."""
    flag = torch.tensor([0.0 if finite else 1.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    return not flag.item()


def _cancel(optimizer: RustStepMixin, jobs: list[Job], *, undo_state: bool) -> None:
    for job in jobs:
        job.cancel()
        if undo_state:
            for p in job.new_state:  # a skipped step leaves no trace
                optimizer.state.pop(p, None)


def _count_skip(optimizer: RustStepMixin) -> None:
    optimizer.skipped_steps += 1
    if optimizer.skip_nonfinite == "warn":
        warnings.warn(
            f"{type(optimizer).__name__}: skipped a step with non-finite gradients (inf or "
            f"nan); {optimizer.skipped_steps} step(s) skipped so far",
            RuntimeWarning,
            stacklevel=5,
        )
