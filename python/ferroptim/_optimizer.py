"""The machinery every ferroptim optimizer shares.

Each optimizer class subclasses its ``torch.optim`` counterpart (so the
constructor, defaults, validation, ``state_dict`` format and hooks are torch's
own) and mixes in :class:`RustStepMixin`, which replaces ``step``:

1. **Prepare** every param group before touching any tensor. A group with a
   cached plan re-checks it in Rust (``GroupPlan.gather``: same params, same
   pointers, same state tensors, well-formed grads). Anything else takes the
   slow path: torch's own ``_init_group`` gathers the tensors (creating state
   lazily and raising torch's errors), parameters are routed to Rust (CPU
   float32/float64, complex as real views) or to torch (other devices and
   dtypes, ``differentiable=True``, or the backend forced to ``torch``), odd
   layouts are staged, and a plan is cached for the next step.
2. **Run** every prepared group: one call into Rust per group (the GIL is
   released inside), then torch's implementation for whatever was routed there.

So an error in any group leaves every tensor as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer
from torch.optim.optimizer import _get_scalar_dtype
from torch.utils._foreach_utils import (
    _get_foreach_kernels_supported_devices,
    _get_fused_kernels_supported_devices,
)

from ferroptim import _config, _core

_RUST_DTYPES = (torch.float32, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_NO_STATE: dict[str, Any] = {}


def scalar(value: float | Tensor) -> float:
    """A hyperparameter as a Python float (tensors are read once per step)."""
    return value if type(value) is float else float(value)


@dataclass
class Gathered:
    """Tensors of one group's params that have a grad, as torch's ``_init_group`` lists them.

    ``states[k][i]`` is state buffer ``keys[k]`` of ``params[i]``.
    """

    keys: tuple[str, ...]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[list[Tensor]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    has_complex: bool = False


class _Job:
    """One prepared group: ``run`` steps it, ``cancel`` forgets it."""

    __slots__ = ("_cancel", "_run")

    def __init__(self, run: Callable[[], None], cancel: Callable[[], None] | None = None) -> None:
        self._run = run
        self._cancel = cancel

    def run(self) -> None:
        self._run()

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()


@dataclass
class _CachedPlan:
    group: dict[str, Any]
    params: list[Tensor]
    key: tuple[Any, ...]
    plan: _core.GroupPlan


def _same_layout(tensor: Tensor, like: Tensor) -> bool:
    return tensor.is_contiguous() if like.is_contiguous() else tensor.stride() == like.stride()


def _is_dense(tensor: Tensor) -> bool:
    """Whether the tensor's elements fill ``numel`` consecutive slots (any dim order)."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(tensor.shape, tensor.stride(), strict=True) if s != 1),
        key=lambda d: d[1],
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _laid_out_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor``'s values in ``like``'s memory layout (a copy unless already so)."""
    if _same_layout(tensor, like):
        return tensor
    return torch.empty_like(like).copy_(tensor)


def _hooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``step`` the way ``torch.optim.Optimizer`` does (step pre/post hooks,
    a profiler range) but skips the machinery when there is nothing to run it for:
    torch's wrapper opens a ``record_function`` range every step, which alone costs
    more than stepping a small model."""
    full = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_pre_hooks
            or torch_optimizer._global_optimizer_post_hooks
            or torch._C._autograd._profiler_enabled()
        ):
            return full(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True  # type: ignore[attr-defined]  # tells torch not to wrap it again
    return wrapper


class RustStepMixin:
    """Steps CPU float tensors in Rust, everything else through torch (see module docs).

    Subclasses describe their optimizer family with the hooks below.
    """

    #: Name of the per-parameter step counter in the state, or None.
    _ferro_step_key: ClassVar[str | None] = "step"
    #: Whether torch has a fused implementation of this optimizer.
    _ferro_has_fused: ClassVar[bool] = True

    # torch.optim.Optimizer provides these.
    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]

    # -- hooks for each optimizer family ----------------------------------------------

    def _ferro_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """State buffers the kernel reads and writes, in kernel order."""
        raise NotImplementedError

    def _ferro_gather(self, group: dict[str, Any]) -> Gathered:
        """torch's ``_init_group`` for ``group["params"]``: create missing state, list tensors."""
        raise NotImplementedError

    def _ferro_rust_step(self, plan: _core.GroupPlan, group: dict[str, Any]) -> None:
        """Run the Rust kernel on a gathered plan with the group's hyperparameters."""
        raise NotImplementedError

    def _ferro_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, foreach: bool, fused: bool
    ) -> None:
        """Run torch's functional implementation on ``gathered``."""
        raise NotImplementedError

    # -- step ---------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs a single optimization step.

        Args:
            closure: A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plans: dict[int, _CachedPlan] | None = self.__dict__.get("_ferro_plans")
        snapshot = self.__dict__.get("_ferro_snapshot")
        if plans is None or snapshot is None or not snapshot.matches(self.state):
            plans = self.__dict__["_ferro_plans"] = {}

        jobs: list[_Job] = []
        slow = False
        try:
            for group in self.param_groups:
                cached = plans.get(id(group))
                if (
                    cached is not None
                    and cached.group is group
                    and cached.params is group["params"]
                    and cached.key == self._ferro_plan_key(group)
                    and cached.plan.gather()
                ):
                    jobs.append(self._fast_job(cached.plan, group))
                else:
                    slow = True
                    jobs.append(self._prepare_slow(group, plans))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        if slow:
            live = {id(g) for g in self.param_groups}
            for key in [k for k in plans if k not in live]:
                del plans[key]
            self.__dict__["_ferro_snapshot"] = _core.StateSnapshot(self.state)
        for job in jobs:
            job.run()
        return loss

    step = _hooked(step)  # type: ignore[assignment]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here too: every cached pointer may be stale.
        self.__dict__.pop("_ferro_plans", None)
        self.__dict__.pop("_ferro_snapshot", None)
        super().__setstate__(state)  # type: ignore[misc]

    # -- internals ----------------------------------------------------------------------

    def _ferro_plan_key(self, group: dict[str, Any]) -> tuple[Any, ...]:
        return (
            self._ferro_state_keys(group),
            group.get("differentiable", False),
            _config.get_backend(),
        )

    def _fast_job(self, plan: _core.GroupPlan, group: dict[str, Any]) -> _Job:
        return _Job(lambda: self._ferro_rust_step(plan, group), plan.release)

    def _route(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Splits the group's params into (Rust, torch) by device, dtype and settings."""
        if group.get("differentiable", False) or _config.get_backend() == "torch":
            return [], list(group["params"])
        rust: list[Tensor] = []
        other: list[Tensor] = []
        for p in group["params"]:
            if p.device.type == "cpu" and (p.dtype in _RUST_DTYPES or p.dtype in _COMPLEX_DTYPES):
                rust.append(p)
            else:
                if p.grad is not None and not (p.is_floating_point() or p.is_complex()):
                    raise RuntimeError(
                        f"{type(self).__name__}: a parameter of dtype {p.dtype} has a gradient; "
                        "only floating-point and complex parameters can be optimized"
                    )
                other.append(p)
        return rust, other

    def _torch_implementation(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[bool, bool]:
        """(foreach, fused) for torch's implementation: the user's choice if made, else
        torch's fused kernels where they exist, else foreach, else the for-loop."""
        if group.get("differentiable", False):
            return False, False
        fused, foreach = group.get("fused"), group.get("foreach")
        if fused:
            return False, True
        if fused is not None or foreach is not None:
            return bool(foreach), False
        fused_devices = _get_fused_kernels_supported_devices()
        if self._ferro_has_fused and all(
            p.device.type in fused_devices and p.is_floating_point() for p in params
        ):
            return False, True
        return _foreach_supported(params), False

    def _prepare_slow(self, group: dict[str, Any], plans: dict[int, _CachedPlan]) -> _Job:
        differentiable = group.get("differentiable", False)
        with torch.set_grad_enabled(differentiable):
            rust_params, torch_params = self._route(group)
            rust = self._ferro_gather({**group, "params": rust_params}) if rust_params else None
            torch_job = self._prepare_torch(group, torch_params) if torch_params else None
            rust_job = self._prepare_rust(rust) if rust is not None and rust.params else None
        self._cache_plan(group, plans)

        def run() -> None:
            if rust_job is not None:
                plan, staged = rust_job
                self._ferro_rust_step(plan, group)
                with torch.no_grad():
                    for original, work in staged:
                        original.copy_(work)
            if torch_job is not None:
                with torch.set_grad_enabled(differentiable):
                    torch_job()

        cancel = rust_job[0].release if rust_job is not None else None
        return _Job(run, cancel)

    def _prepare_torch(self, group: dict[str, Any], params: list[Tensor]) -> Callable[[], None]:
        foreach, fused = self._torch_implementation(group, params)
        implied_fused = fused and not group.get("fused")
        # torch creates state for fused kernels on the param's device; ask for
        # that when we choose fused for the user.
        init_group = {**group, "params": params}
        if implied_fused:
            init_group["fused"] = True
        gathered = self._ferro_gather(init_group)
        if implied_fused and not all(
            s.dtype == torch.float32 and s.device == p.device
            for s, p in zip(gathered.steps, gathered.params, strict=True)
        ):
            # State made earlier for another implementation: foreach takes any step tensor.
            foreach, fused = _foreach_supported(gathered.params), False
        return lambda: self._ferro_torch_step(gathered, group, foreach=foreach, fused=fused)

    def _prepare_rust(
        self, gathered: Gathered
    ) -> tuple[_core.GroupPlan, list[tuple[Tensor, Tensor]]]:
        """Lays the gathered tensors out for the kernel: one run of memory per tensor,
        the same layout for a param, its grad and its states."""
        keys = gathered.keys
        written_storages = set()
        work_params: list[Tensor] = []
        staged: list[tuple[Tensor, Tensor]] = []
        for i, p in enumerate(gathered.params):
            work = p if _is_dense(p) else p.contiguous()
            if work is not p:
                staged.append((p, work))
            state = self.state[p]
            for k, key in enumerate(keys):
                buffer = gathered.states[k][i]
                if buffer.dtype != p.dtype or buffer.shape != p.shape:
                    raise RuntimeError(
                        f"{type(self).__name__}: state {key!r} of a parameter of shape "
                        f"{tuple(p.shape)} and dtype {p.dtype} has shape {tuple(buffer.shape)} "
                        f"and dtype {buffer.dtype}"
                    )
                if buffer.device != p.device or not _same_layout(buffer, work):
                    # Our own state: re-lay it out once, for good.
                    buffer = torch.empty_like(work).copy_(buffer)
                    state[key] = gathered.states[k][i] = buffer
            step_key = self._ferro_step_key
            if step_key is not None:
                step = gathered.steps[i]
                if step.device.type != "cpu" or step.dtype not in _RUST_DTYPES or step.numel() != 1:
                    step = torch.tensor(float(step), dtype=_get_scalar_dtype())
                    state[step_key] = gathered.steps[i] = step
            work_params.append(work)
            written_storages.add(work.untyped_storage().data_ptr())
            for k in range(len(keys)):
                written_storages.add(gathered.states[k][i].untyped_storage().data_ptr())

        grads: list[Tensor] = []
        for work, grad in zip(work_params, gathered.grads, strict=True):
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if grad.untyped_storage().data_ptr() in written_storages:
                grad = grad.clone()  # a grad sharing memory with what we write
            grads.append(_laid_out_like(grad, work))

        def real(tensors: list[Tensor]) -> list[Tensor]:
            return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]

        plan = _core.GroupPlan.from_tensors(
            real(work_params),
            real(grads),
            [real(s) for s in gathered.states],
            list(gathered.steps) if self._ferro_step_key is not None else [None] * len(grads),
        )
        return plan, staged

    def _cache_plan(self, group: dict[str, Any], plans: dict[int, _CachedPlan]) -> None:
        """Builds the plan the next step re-checks instead of taking the slow path."""
        plans.pop(id(group), None)
        if group.get("differentiable", False) or _config.get_backend() == "torch":
            return
        params = group["params"]
        if not all(p.device.type == "cpu" and p.dtype in _RUST_DTYPES for p in params):
            return
        key = self._ferro_plan_key(group)
        try:
            plan = _core.GroupPlan(
                params,
                [self.state.get(p, _NO_STATE) for p in params],
                list(key[0]),
                self._ferro_step_key,
            )
        except ValueError:
            return  # not plannable (odd layout, foreign state): the slow path stays correct
        plans[id(group)] = _CachedPlan(group, params, key, plan)


def _foreach_supported(params: list[Tensor]) -> bool:
    devices = _get_foreach_kernels_supported_devices()
    return all(p.device.type in devices for p in params)
