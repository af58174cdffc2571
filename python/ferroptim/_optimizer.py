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
   dtypes, sparse grads, ``differentiable=True``, or the backend forced to
   ``torch``), odd layouts are staged, and a plan is cached for the next step.
2. **Clip** (``max_grad_norm``): one pass over every gathered gradient
   computes the global norm; the coefficient is applied inside the update.
3. **Run** every prepared group: one call into Rust per group (the GIL is
   released inside), then torch's implementation for whatever was routed there.

So an error in any group leaves every tensor as it was.
"""

from __future__ import annotations

import functools
import numbers
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer
from torch.optim.optimizer import _get_capturable_supported_devices, _get_scalar_dtype
from torch.utils._foreach_utils import (
    _get_foreach_kernels_supported_devices,
    _get_fused_kernels_supported_devices,
)

from ferroptim import _config, _core
from ferroptim._norms import (
    clip_coefficient,
    clip_coefficient_value,
    inverse_scale_value,
    is_finite,
    tensor_norm,
    total_norm,
)

_RUST_DTYPES = (torch.float32, torch.float64)
_COMPLEX_DTYPES = (torch.complex64, torch.complex128)
_NO_STATE: dict[str, Any] = {}

# Locate where torch keeps tensor metadata (the cached plans' re-check reads it
# directly, see rust/py/native.rs) now, on plain CPU probe tensors, rather than at a
# first step that may run under inference mode.
with torch.inference_mode(False):
    _core._native_recheck()


_PLAIN_NUMBERS = (float, int, bool)


def _is_number(value: Any) -> bool:
    # (the common types first: an ABC check costs a microsecond per call)
    return (
        type(value) in _PLAIN_NUMBERS
        or isinstance(value, Tensor)
        or (isinstance(value, numbers.Real) and not isinstance(value, (str, bytes)))
    )


def check_number(value: Any, name: str) -> None:
    """Raises the TypeError torch's arithmetic raises mid-step for a hyperparameter that
    is not a number (``lr=None``, ``lr="0.1"``): a real number or a tensor passes."""
    if not _is_number(value):
        raise TypeError(
            f"hyperparameter {name!r} must be a real number or a 1-element tensor, "
            f"got {type(value).__name__}: {value!r}"
        )


def scalar(value: Any, name: str = "hyperparameter") -> float:
    """A hyperparameter as a Python float (tensors are read once per step); raises
    TypeError for what torch's step cannot compute with (``None``, a string)."""
    if type(value) is float:
        return value
    if type(value) is not int:
        check_number(value, name)
    return float(value)


def flag(value: Any) -> bool:
    """A boolean hyperparameter (``maximize``, ``nesterov``, ...) as torch reads it:
    ``if maximize:`` (so ``maximize=1`` is True, as in torch)."""
    return value if type(value) is bool else bool(value)


def lr_is_f32(lr: float | Tensor) -> bool:
    """Whether ``lr`` is a float32 tensor: torch then derives per-step scalars from it
    (``lr / bias_correction1``, ...) in float32 tensor arithmetic."""
    return isinstance(lr, Tensor) and lr.dtype == torch.float32


@dataclass
class Gathered:
    """Tensors of a group's params that have a grad, as torch's ``_init_group`` lists them.

    ``states[k][i]`` is state buffer ``keys[k]`` of ``params[i]``; it is ``None``
    when torch creates that buffer during the step (SGD's momentum buffer).
    """

    keys: tuple[str, ...]
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    states: list[list[Any]] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    #: Per-tensor scalar state after the step counter (``_ferro_scalar_keys``), by key:
    #: ``scalars[key][i]`` is ``params[i]``'s 0-d tensor (NAdam's ``mu_product``).
    scalars: dict[str, list[Tensor]] = field(default_factory=dict)
    has_complex: bool = False
    has_sparse_grad: bool = False
    #: GradScaler's scale and inf flag, for torch's fused kernels.
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


class _Job:
    """One prepared group: its Rust plans and torch-routed grads (for the global
    norm and the finiteness check), ``run`` to step it, ``cancel`` to forget it."""

    __slots__ = ("_run", "dtensor_grads", "new_state", "norm_plans", "plans", "torch_grads")

    def __init__(
        self,
        plans: list[_core.GroupPlan],
        torch_grads: list[Tensor],
        run: Callable[[_GradFactors], None],
        new_state: list[Tensor] | None = None,
        norm_plans: list[_core.GroupPlan] | None = None,
        dtensor_grads: list[Tensor] | None = None,
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

    def run(self, factors: _GradFactors) -> None:
        self._run(factors)

    def cancel(self) -> None:
        for plan in self.plans:
            plan.release()


#: A prepared kernel call: ``kernel(plan, unscale, clip, fresh)``.
KernelCall = Callable[[_core.GroupPlan, float, float, bool], None]


@dataclass(frozen=True)
class _GradFactors:
    """What each gradient is multiplied by as the step reads it: GradScaler's inverse
    scale (``unscale_tensor`` for torch's path), then the clip coefficient."""

    unscale: float = 1.0
    clip: float = 1.0
    unscale_tensor: Tensor | None = None
    clip_tensor: Tensor | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


_NO_FACTORS = _GradFactors()


@dataclass
class _RustWork:
    """A group's Rust-routed tensors, ready to run: one-shot plans (``fresh``: their
    lazily created buffers are new), staged copies of params that are not one run
    of memory (written back after the step), and buffers to add to the state."""

    plans: list[tuple[_core.GroupPlan, bool]] = field(default_factory=list)
    staged: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    created: list[tuple[dict[str, Any], str, Tensor]] = field(default_factory=list)
    #: Plans whose gradients count in a norm computed on this rank alone.
    norm_plans: list[_core.GroupPlan] = field(default_factory=list)
    #: DTensor params (stepped through their local shards) and their grads.
    dtensors: list[Tensor] = field(default_factory=list)
    dtensor_grads: list[Tensor] = field(default_factory=list)


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
    dims = ((s, st) for s, st in zip(tensor.shape, tensor.stride(), strict=True) if s != 1)
    for size, stride in sorted(dims, key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _is_lazy(tensor: Tensor) -> bool:
    """Whether torch reads ``tensor`` negated or conjugated (``torch._neg_view``,
    ``z.conj()``, ``z.conj().imag``): its memory holds other values than it has."""
    return tensor.is_neg() or tensor.is_conj()


def _resolved(tensor: Tensor) -> Tensor:
    """``tensor``'s values in memory of their own when it is a lazy view."""
    return tensor.resolve_conj().resolve_neg() if _is_lazy(tensor) else tensor


def _storage_key(tensor: Tensor) -> int | None:
    """The address of the storage behind ``tensor``, or None when it has no elements
    (a zero-size tensor's storage address is 0 and shares nothing)."""
    return tensor.untyped_storage().data_ptr() if tensor.numel() else None


def _laid_out_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor``'s values in ``like``'s memory layout (a copy unless already so)."""
    if _same_layout(tensor, like):
        return tensor
    return torch.empty_like(like).copy_(tensor)


def _staged(tensor: Tensor) -> Tensor:
    """A contiguous copy of ``tensor``'s values (negation and conjugation resolved)."""
    return torch.empty_like(tensor, memory_format=torch.contiguous_format).copy_(tensor)


def _is_dtensor(tensor: Tensor) -> bool:
    # Only possible once the user has imported torch.distributed.tensor.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (a view: writing it writes the DTensor), else the tensor."""
    return tensor._local_tensor if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _full(tensor: Tensor) -> Tensor:
    """A replicated DTensor as a plain tensor."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _agree_finite(finite: bool, group: Any) -> bool:
    """Whether every rank of ``group`` saw finite gradients (one tiny all-reduce)."""
    flag = torch.tensor([0.0 if finite else 1.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    return not flag.item()


def _is_plain(tensor: Tensor) -> bool:
    """Whether the tensor is a plain ``Tensor`` or ``Parameter`` (or a ``Parameter``
    subclass that overrides neither ``__torch_function__`` nor ``__torch_dispatch__``):
    its memory is what it holds. Anything else (wrapper subclasses, subclasses that
    redefine ops) steps through torch, as torch steps it."""
    cls = type(tensor)
    if cls is Tensor or cls is torch.nn.Parameter:
        return True
    return (
        issubclass(cls, torch.nn.Parameter)
        and cls.__torch_function__ is torch.nn.Parameter.__torch_function__
        and cls.__torch_dispatch__ is Tensor.__torch_dispatch__
    )


def _check_capturable(gathered: Gathered, group: dict[str, Any]) -> None:
    """torch's check (an AssertionError) that a capturable step runs on a device CUDA
    graphs can capture, with the step counter on the param's device."""
    if not flag(group.get("capturable", False)):
        return
    devices = _get_capturable_supported_devices()
    for param, step in zip(gathered.params, gathered.steps, strict=False):
        if not (
            isinstance(step, Tensor)
            and param.device.type == step.device.type
            and param.device.type in devices
        ):
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported devices: "
                f"{devices}."
            )


def _cpu_scalar(state: dict[str, Any], key: str, value: Tensor) -> Tensor:
    """Per-tensor scalar state the kernel can keep: a CPU float32/float64 tensor (one on
    another device, from a capturable or fused step, is replaced in the state by a CPU
    tensor of torch's scalar dtype holding its value)."""
    if value.device.type != "cpu" or value.dtype not in _RUST_DTYPES:
        value = state[key] = torch.tensor(float(value), dtype=_get_scalar_dtype())
    return value


def _real(tensors: list[Tensor]) -> list[Tensor]:
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]


def _foreach_supported(params: list[Tensor]) -> bool:
    devices = _get_foreach_kernels_supported_devices()
    return all(p.device.type in devices for p in params)


def _hooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``step`` the way ``torch.optim.Optimizer`` does (step pre/post hooks,
    a profiler range) but skips the machinery when there is nothing to run it for:
    torch's wrapper opens a ``record_function`` range every step, which alone costs
    more than stepping a small model."""
    full = torch.optim.Optimizer.profile_hook_step(step)
    # Under torch.compile the step runs eagerly, as one graph break at the call:
    # its Rust calls are opaque to dynamo, and tracing into them would only add
    # breaks (and warnings) inside.
    eager = torch.compiler.disable(full, recursive=True)

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eager(self, *args, **kwargs)
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

    Subclasses describe their optimizer family with the ``_ferro_*`` hooks.
    """

    #: Name of the per-parameter step counter in the state, or None.
    _ferro_step_key: ClassVar[str | None] = "step"
    #: More per-tensor scalar state the kernel keeps after the step counter, in its
    #: slot order (NAdam's ``mu_product``); ``_ferro_gather`` lists it in
    #: ``Gathered.scalars``.
    _ferro_scalar_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether torch has a fused implementation of this optimizer.
    _ferro_has_fused: ClassVar[bool] = True
    #: Whether torch supports sparse gradients for this optimizer (they take its path).
    _ferro_sparse_to_torch: ClassVar[bool] = False
    #: Whether torch's for-loop reads the step counter's value (``step_t.item()``);
    #: RMSprop's only increments it, so any shape of counter steps.
    _ferro_reads_step: ClassVar[bool] = True

    # torch.optim.Optimizer provides these.
    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]

    #: Clip the global L2 norm of all gradients to this inside ``step`` (None: off).
    max_grad_norm: float | None
    #: Global gradient norm seen by the last ``step`` when ``max_grad_norm`` is set.
    last_grad_norm: Tensor | None
    #: Skip steps whose gradients hold an inf or nan (``"warn"``: and warn).
    skip_nonfinite: bool | str
    #: Steps skipped because of non-finite gradients (with ``skip_nonfinite``).
    skipped_steps: int
    #: Process group whose ranks agree on skipping (an optimizer that sees only this
    #: rank's shard of the parameters, as under ZeroRedundancyOptimizer); None: local.
    nonfinite_group: Any

    def _ferro_init(
        self,
        max_grad_norm: float | None,
        skip_nonfinite: bool | str = False,
        nonfinite_group: Any = None,
    ) -> None:
        """Call at the end of ``__init__``."""
        if max_grad_norm is not None:
            max_grad_norm = float(max_grad_norm)
            if not max_grad_norm > 0.0:
                raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        if skip_nonfinite not in (False, True, "warn"):
            raise ValueError(
                f"skip_nonfinite must be False, True or 'warn', got {skip_nonfinite!r}"
            )
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite
        self.nonfinite_group = nonfinite_group
        self.skipped_steps = 0
        self.last_grad_norm = None
        # `_step_supports_amp_scaling` is torch's to set: its __init__ (run above) sets it
        # only with `fused=True`, and Lightning and accelerate read it as "fused" (no
        # gradient clipping, no skip reporting). With it, GradScaler hands `step` its
        # `grad_scale` and `found_inf` and the kernel unscales as it reads (the in-kernel
        # path `fused=True` asks for, or a user who sets the attribute). Without it,
        # GradScaler unscales the gradients itself and skips non-finite steps, as for
        # torch's default optimizers. `__setstate__` (so `load_state_dict`) leaves it alone,
        # as torch's does.

    # -- hooks for each optimizer family ----------------------------------------------

    def _ferro_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """State buffers the kernel reads and writes, in kernel order."""
        raise NotImplementedError

    def _ferro_gather(self, group: dict[str, Any]) -> Gathered:
        """torch's ``_init_group`` for ``group["params"]``: create missing state, list tensors."""
        raise NotImplementedError

    #: The Rust kernel's name in its registry (rust/kernels/registry.rs).
    _ferro_kernel_name: ClassVar[str]

    def _ferro_kernel(self, group: dict[str, Any]) -> KernelCall:
        """The group's Rust kernel with its hyperparameters read by name from the group
        now, in the prepare phase, so that running it cannot fail on them (a missing or
        non-numeric hyperparameter raises torch's KeyError/TypeError here): called as
        ``kernel(plan, unscale, clip, fresh)``, it steps the plan; every gradient is
        multiplied by ``unscale`` then ``clip`` as it is read. ``fresh``: the plan's
        lazily created buffers are new and must be written first."""
        return _core.Kernel(self._ferro_kernel_name, group).step

    def _ferro_check_hyperparameters(self, group: dict[str, Any]) -> None:
        """Raises now what torch's step raises mid-step for the group's hyperparameters
        (for params torch's path steps: the Rust path converts them in
        :meth:`_ferro_kernel`)."""
        for name in self._ferro_numbers:
            check_number(group[name], name)

    #: The group's numeric hyperparameters (checked before anything is written).
    _ferro_numbers: ClassVar[tuple[str, ...]] = ("lr",)

    def _ferro_rust_unsupported(self, group: dict[str, Any]) -> bool:
        """Whether the Rust kernels cannot reproduce torch's arithmetic for this group's
        hyperparameters (Adam's tensor betas): its params take torch's for-loop."""
        return False

    def _ferro_check_step_scalars(self, group: dict[str, Any], gathered: Gathered) -> None:
        """Raises what torch's for-loop raises computing the per-step scalars of
        ``gathered``'s params when the group's hyperparameters are outside what its
        constructor accepts (``beta1 = 1`` set mid-training: ``lr / (1 - beta1 ** step)``
        raises ZeroDivisionError)."""

    def _ferro_usual(self, group: dict[str, Any]) -> bool:
        """Whether the group's hyperparameters are in the range torch's constructor
        accepts: then the per-step scalars cannot raise, and a cached plan may run."""
        return True

    def _ferro_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, foreach: bool, fused: bool
    ) -> None:
        """Run torch's functional implementation on ``gathered``."""
        raise NotImplementedError

    def _ferro_check_torch_path(self, gathered: Gathered, group: dict[str, Any]) -> None:
        """Raise now the errors torch's functional would raise mid-step (so that
        nothing is written first)."""

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

        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler
        if found_inf is not None and found_inf.item():
            return loss  # the scaler saw inf/nan: skip the step, as torch does
        grad_scale = getattr(self, "grad_scale", None)

        plans: dict[int, _CachedPlan] | None = self.__dict__.get("_ferro_plans")
        snapshot = self.__dict__.get("_ferro_snapshot")
        if plans is None or snapshot is None or not snapshot.matches(self.state):
            plans = self.__dict__["_ferro_plans"] = {}

        jobs: list[_Job] = []
        slow = False
        try:
            for group in self.param_groups:
                job = self._fast_job(group, plans)
                if job is None:
                    slow = True
                    job = self._prepare_slow(group, plans)
                jobs.append(job)
            factors = self._grad_factors(jobs, grad_scale, found_inf)
        except BaseException:
            self._cancel(jobs, undo_state=False)
            raise
        if factors is None:  # non-finite gradients with skip_nonfinite
            self._cancel(jobs, undo_state=True)
            self._count_skip()
        else:
            for job in jobs:
                job.run(factors)
        if slow or factors is None:
            live = {id(g) for g in self.param_groups}
            for key in [k for k in plans if k not in live]:
                del plans[key]
            self.__dict__["_ferro_snapshot"] = _core.StateSnapshot(self.state)
        return loss

    step = _hooked(step)

    _FERRO_SETTINGS = ("max_grad_norm", "skip_nonfinite", "skipped_steps", "nonfinite_group")

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[assignment]
        for name in self._FERRO_SETTINGS:
            state[name] = self.__dict__.get(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here too: every cached pointer may be stale.
        self.__dict__.pop("_ferro_plans", None)
        self.__dict__.pop("_ferro_snapshot", None)
        settings = {name: state.pop(name, self.__dict__.get(name)) for name in self._FERRO_SETTINGS}
        super().__setstate__(state)  # type: ignore[misc]
        self.max_grad_norm = settings["max_grad_norm"]
        self.skip_nonfinite = settings["skip_nonfinite"] or False
        self.skipped_steps = settings["skipped_steps"] or 0
        self.nonfinite_group = settings["nonfinite_group"]
        self.__dict__.setdefault("last_grad_norm", None)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``; with ``skip_nonfinite`` it also records ``skipped_steps``
        (torch's ``load_state_dict`` ignores the extra key)."""
        state_dict = super().state_dict()  # type: ignore[misc]
        if self.skip_nonfinite:
            state_dict["skipped_steps"] = self.skipped_steps
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        skipped = state_dict.get("skipped_steps")
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if skipped is not None:
            self.skipped_steps = int(skipped)

    # -- internals ----------------------------------------------------------------------

    def _ferro_plan_key(self, group: dict[str, Any]) -> tuple[Any, ...] | None:
        """What a cached plan was made for; None: this group always takes the slow path
        (where torch's errors are raised and torch's path is chosen)."""
        if (
            flag(group.get("capturable", False))
            or self._ferro_rust_unsupported(group)
            or not self._ferro_usual(group)
        ):
            return None
        return (
            self._ferro_state_keys(group),
            group.get("differentiable", False),
            _config.get_backend(),
        )

    def _fast_job(self, group: dict[str, Any], plans: dict[int, _CachedPlan]) -> _Job | None:
        cached = plans.get(id(group))
        if (
            cached is None
            or cached.group is not group
            or cached.params is not group["params"]
            or cached.key != self._ferro_plan_key(group)
        ):
            return None
        # Hyperparameters are converted before the plan gathers (and holds) anything.
        kernel = self._ferro_kernel(group)
        if not cached.plan.gather():
            return None
        plan = cached.plan
        return _Job([plan], [], lambda factors: kernel(plan, factors.unscale, factors.clip, False))

    def _grad_factors(
        self, jobs: list[_Job], grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> _GradFactors | None:
        """GradScaler's unscale and the clip coefficient for this step (one parallel
        pass over every gradient computes the global norm); None when
        ``skip_nonfinite`` finds an inf or nan gradient."""
        if grad_scale is None and self.max_grad_norm is None and not self.skip_nonfinite:
            return _NO_FACTORS
        rust_plans = [plan for job in jobs for plan in job.norm_plans]
        torch_grads = [g for job in jobs for g in job.torch_grads]
        dtensor_grads = [g for job in jobs for g in job.dtensor_grads]
        unscale_tensor = None
        unscale = 1.0
        if grad_scale is not None:
            # torch's GradScaler.unscale_: inv_scale = scale.double().reciprocal().float()
            if torch_grads or dtensor_grads:  # torch's path multiplies by a tensor
                unscale_tensor = grad_scale.double().reciprocal().float()
                unscale = float(unscale_tensor)
            else:
                unscale = inverse_scale_value(grad_scale)
        clip = 1.0
        clip_tensor = None
        finite = True
        if self.max_grad_norm is not None or (self.skip_nonfinite and dtensor_grads):
            values, float64 = (
                _core.grad_norms(rust_plans, 2.0, unscale) if rust_plans else ([], False)
            )
            others = [tensor_norm(g, 2.0) for g in torch_grads]
            if dtensor_grads:  # sharded: torch reduces the norm across ranks
                others.append(_full(torch.nn.utils.get_total_norm(dtensor_grads, 2.0)))
            if unscale_tensor is not None:
                others = [n * unscale_tensor.to(n.device) for n in others]
            norm = total_norm(values, float64, others, 2.0)
            finite = is_finite(norm)
        if self.max_grad_norm is not None:
            self.last_grad_norm = norm
            if torch_grads or dtensor_grads:  # torch's path multiplies by a tensor
                clip_tensor = clip_coefficient(self.max_grad_norm, norm)
                clip = float(clip_tensor)
            else:
                clip = clip_coefficient_value(self.max_grad_norm, norm)
        if self.skip_nonfinite and (self.max_grad_norm is None or not finite):
            # (a norm can overflow with finite float64 grads: ask again)
            finite = (
                (not rust_plans or _core.grads_finite(rust_plans))
                and all(
                    bool(torch.isfinite(g.coalesce()._values() if g.is_sparse else g).all())
                    for g in torch_grads
                )
                and (not dtensor_grads or finite)
            )
            if self.nonfinite_group is not None:
                finite = _agree_finite(finite, self.nonfinite_group)
            if not finite:
                return None
        return _GradFactors(unscale, clip, unscale_tensor, clip_tensor, grad_scale, found_inf)

    def _cancel(self, jobs: list[_Job], *, undo_state: bool) -> None:
        for job in jobs:
            job.cancel()
            if undo_state:
                for p in job.new_state:  # a skipped step leaves no trace
                    self.state.pop(p, None)

    def _count_skip(self) -> None:
        self.skipped_steps += 1
        if self.skip_nonfinite == "warn":
            warnings.warn(
                f"{type(self).__name__}: skipped a step with non-finite gradients (inf or "
                f"nan); {self.skipped_steps} step(s) skipped so far",
                RuntimeWarning,
                stacklevel=4,
            )

    def _route(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Splits the group's params into (Rust, torch) by device, dtype, type, grad, state
        and settings."""
        if (
            group.get("differentiable", False)
            or _config.get_backend() == "torch"
            or self._ferro_rust_unsupported(group)
        ):
            return [], list(group["params"])
        rust: list[Tensor] = []
        other: list[Tensor] = []
        for p in group["params"]:
            grad = p.grad
            if (
                p.device.type == "cpu"
                and (p.dtype in _RUST_DTYPES or p.dtype in _COMPLEX_DTYPES)
                and not (self._ferro_sparse_to_torch and grad is not None and grad.is_sparse)
                and (_is_plain(p) or _is_dtensor(p))
                and (grad is None or _is_plain(grad) or _is_dtensor(grad))
                and self._step_plannable(p)
                and not any(
                    isinstance(v, Tensor) and v.is_sparse
                    for v in self.state.get(p, _NO_STATE).values()
                )
            ):
                rust.append(p)
            else:
                if grad is not None and not (p.is_floating_point() or p.is_complex()):
                    raise RuntimeError(
                        f"{type(self).__name__}: a parameter of dtype {p.dtype} has a gradient; "
                        "only floating-point and complex parameters can be optimized"
                    )
                other.append(p)
        return rust, other

    def _step_plannable(self, param: Tensor) -> bool:
        """Whether the param's step counter is one the Rust step can keep: a family whose
        torch step only increments it (RMSprop) steps any other shape of counter torch's
        way; the others raise torch's error in the prepare phase."""
        if self._ferro_step_key is None or self._ferro_reads_step:
            return True
        step = self.state.get(param, _NO_STATE).get(self._ferro_step_key)
        return not isinstance(step, Tensor) or step.numel() == 1

    def _torch_implementation(
        self, group: dict[str, Any], params: list[Tensor], has_sparse_grad: bool
    ) -> tuple[bool, bool]:
        """(foreach, fused) for torch's implementation: the user's choice if made, else
        torch's fused kernels where they exist, else foreach, else the for-loop. Tensor
        subclasses and CPU groups the Rust kernels cannot reproduce take the for-loop, as
        in torch's own default."""
        if group.get("differentiable", False) or has_sparse_grad:
            return False, False
        fused, foreach = group.get("fused"), group.get("foreach")
        if fused:
            return False, True
        if fused is not None or foreach is not None:
            return bool(foreach), False
        if not all(_is_plain(p) for p in params) or (
            self._ferro_rust_unsupported(group) and all(p.device.type == "cpu" for p in params)
        ):
            return False, False
        fused_devices = _get_fused_kernels_supported_devices()
        if self._ferro_has_fused and all(
            p.device.type in fused_devices and p.is_floating_point() for p in params
        ):
            return False, True
        return _foreach_supported(params), False

    def _prepare_slow(self, group: dict[str, Any], plans: dict[int, _CachedPlan]) -> _Job:
        differentiable = group.get("differentiable", False)
        new_state = [p for p in group["params"] if p.grad is not None and not self.state.get(p)]
        with torch.set_grad_enabled(differentiable):
            rust_params, torch_params = self._route(group)
            has_grads = any(p.grad is not None for p in rust_params)
            # Hyperparameters first: converted (or refused) before any state is made.
            kernel = self._ferro_kernel(group) if has_grads else None
            if torch_params:
                self._ferro_check_hyperparameters(group)
            gathered = self._ferro_gather({**group, "params": rust_params}) if has_grads else None
            torch_run, torch_grads = (
                self._prepare_torch(group, torch_params) if torch_params else (None, [])
            )
            rust = None
            if gathered is not None and gathered.params:
                self._check_torch_step(gathered, group)
                rust = self._prepare_rust(gathered, group)

        def run(factors: _GradFactors) -> None:
            if rust is not None and kernel is not None:
                for plan, fresh in rust.plans:
                    kernel(plan, factors.unscale, factors.clip, fresh)
                for state, key, buffer in rust.created:
                    # Lazily created buffers join the state only now that the kernel has
                    # written them: a failed call leaves no uninitialised buffer behind
                    # (torch stores nothing on a failed step).
                    state[key] = buffer
                with torch.no_grad():
                    for original, work in rust.staged:
                        original.copy_(work)
                if rust.dtensors:  # their local shards were bumped; the wrappers too
                    torch.autograd.graph.increment_version(rust.dtensors)
            if torch_run is not None:
                with torch.set_grad_enabled(differentiable):
                    torch_run(factors)
            self._cache_plan(group, plans)

        if rust is None:
            return _Job([], torch_grads, run, new_state)
        return _Job(
            [plan for plan, _ in rust.plans],
            torch_grads,
            run,
            new_state,
            rust.norm_plans,
            rust.dtensor_grads,
        )

    def _check_torch_step(
        self, gathered: Gathered, group: dict[str, Any], *, for_loop: bool = True
    ) -> None:
        """Raises now what torch's functional (``for_loop``: its for-loop) would raise
        while stepping ``gathered``: a step counter that is not a tensor, a capturable step
        on CPU, a counter that is not a 1-element tensor (where the step reads it),
        per-step scalars its Python cannot compute."""
        if self._ferro_step_key is not None and not all(
            isinstance(s, Tensor) for s in gathered.steps
        ):
            raise RuntimeError(
                "API has changed, `state_steps` argument must contain a list of singleton tensors"
            )
        _check_capturable(gathered, group)
        if self._ferro_step_key is not None and for_loop and self._ferro_reads_step:
            for s in gathered.steps:
                if s.numel() != 1:  # torch's `step_t.item()`
                    raise RuntimeError(
                        f"a Tensor with {s.numel()} elements cannot be converted to Scalar"
                    )
            if not self._ferro_usual(group):
                self._ferro_check_step_scalars(group, gathered)

    def _prepare_torch(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[Callable[[_GradFactors], None], list[Tensor]]:
        has_sparse = any(p.grad is not None and p.grad.is_sparse for p in params)
        foreach, fused = self._torch_implementation(group, params, has_sparse)
        implied_fused = fused and not group.get("fused")
        # torch creates state for fused kernels on the param's device; ask for
        # that when we choose fused for the user.
        init_group = {**group, "params": params}
        if implied_fused:
            init_group["fused"] = True
        gathered = self._ferro_gather(init_group)
        self._check_torch_step(gathered, group, for_loop=not foreach and not fused)
        self._ferro_check_torch_path(gathered, group)
        if (
            implied_fused
            and self._ferro_step_key is not None
            and not all(
                s.dtype == torch.float32 and s.device == p.device
                for s, p in zip(gathered.steps, gathered.params, strict=True)
            )
        ):
            # State made earlier for another implementation: foreach takes any step tensor.
            foreach, fused = _foreach_supported(gathered.params), False
        if implied_fused and any(
            any(b is None for b in buffers) and not all(b is None for b in buffers)
            for buffers in gathered.states
        ):
            # torch's fused SGD creates momentum buffers only when all are new.
            foreach, fused = _foreach_supported(gathered.params), False
        if fused and not all(_is_dense(p) for p in gathered.params):
            # torch's fused kernels walk a param as one run of memory: a strided view
            # (a slice with gaps) would be mis-stepped. foreach steps it correctly.
            foreach, fused = _foreach_supported(gathered.params), False
        if fused:
            # torch's fused kernels walk a grad in its param's memory order: a grad laid
            # out differently would be mis-stepped, so hand them one laid out alike.
            gathered.grads = [
                g if g.is_sparse else _laid_out_like(g, p)
                for g, p in zip(gathered.grads, gathered.params, strict=True)
            ]
            # Likewise our state buffers (SGD's, cloned from a grad, keep its layout):
            # re-laid out once, for good, values unchanged.
            for key, buffers in zip(gathered.keys, gathered.states, strict=True):
                for i, (param, buffer) in enumerate(zip(gathered.params, buffers, strict=True)):
                    if buffer is not None and not _same_layout(buffer, param):
                        buffers[i] = self.state[param][key] = _laid_out_like(buffer, param)

        def run(factors: _GradFactors) -> None:
            dense = [g for g in gathered.grads if not g.is_sparse]
            if factors.unscale_tensor is not None and not fused and dense:
                # What GradScaler.unscale_ would have done (torch's fused kernels take
                # grad_scale themselves).
                torch._foreach_mul_(dense, factors.unscale_tensor.to(dense[0].device))
            if factors.clip_tensor is not None:
                for g in gathered.grads:  # as clip_grad_norm_ does
                    g.mul_(factors.clip_tensor.to(g.device))
            if fused:
                gathered.grad_scale, gathered.found_inf = factors.grad_scale, factors.found_inf
            self._ferro_torch_step(gathered, group, foreach=foreach, fused=fused)

        return run, list(gathered.grads)

    def _ferro_aliased_grad(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """The gradient values torch's for-loop reads when ``grad`` shares memory with a
        buffer the step writes (``p.grad = p.detach()``, say). torch's in-place updates
        of the param come after it has read the gradient, except where a family says
        otherwise (AdamW decays the param first)."""
        return grad.clone()

    def _prepare_rust(self, gathered: Gathered, group: dict[str, Any]) -> _RustWork:
        """Lays the gathered tensors out for the kernel — one run of memory per tensor,
        the same layout for a param, its grad and its states (DTensors: their local
        shards) — and builds one-shot plans, split by whether their lazily created
        buffers are new (``fresh``) and by whether they hold DTensor shards (whose
        norms only make sense across ranks)."""
        keys = gathered.keys
        step_key = self._ferro_step_key
        name = type(self).__name__
        if len({id(p) for p in gathered.params}) != len(gathered.params):
            raise ValueError(
                f"{name}: a parameter appears more than once in a param group; "
                "list each parameter once"
            )
        out = _RustWork()
        written_storages: set[int | None] = set()
        state_storages: set[int | None] = set()
        works: list[Tensor] = []
        states: list[list[Tensor]] = [[] for _ in keys]
        kinds: list[tuple[bool, bool]] = []  # (fresh, dtensor) per param
        for i, p in enumerate(gathered.params):
            dtensor = _is_dtensor(p)
            local = _local(p)
            # A param that is not one run of memory, or a lazily negated/conjugated
            # view, steps in a staged copy written back through the original.
            work = local if _is_dense(local) and not _is_lazy(local) else _staged(local)
            if work is not local:
                out.staged.append((local, work))
            if dtensor:
                out.dtensors.append(p)
            # (touching self.state[p] would create an entry: torch's SGD without
            # momentum keeps none)
            state = self.state[p] if keys or step_key is not None else _NO_STATE
            fresh = False
            for k, key in enumerate(keys):
                buffer = gathered.states[k][i]
                if buffer is None:  # created by the step itself (SGD's momentum buffer)
                    buffer = torch.empty_like(p)
                    out.created.append((state, key, buffer))
                    fresh = True
                elif buffer.dtype != p.dtype or buffer.shape != p.shape:
                    raise RuntimeError(
                        f"{name}: state {key!r} of a parameter of shape {tuple(p.shape)} and "
                        f"dtype {p.dtype} has shape {tuple(buffer.shape)} and dtype {buffer.dtype}"
                    )
                elif not dtensor and (
                    buffer.device != p.device or not _same_layout(buffer, work) or _is_lazy(buffer)
                ):
                    # Our own state: re-lay it out once, for good.
                    buffer = torch.empty_like(work).copy_(buffer)
                    state[key] = buffer
                states[k].append(_local(buffer))
            if step_key is not None:
                gathered.steps[i] = _cpu_scalar(state, step_key, gathered.steps[i])
            for key in self._ferro_scalar_keys:
                scalars = gathered.scalars[key]
                scalars[i] = _cpu_scalar(state, key, scalars[i])
            works.append(work)
            kinds.append((fresh, dtensor))
            written_storages.add(_storage_key(work))
            # A staged param's own memory is written too (the copy back): a grad in it
            # (``p.grad = p.detach()``) must be read as torch would, not as it was.
            written_storages.add(_storage_key(local))
            state_storages.update(_storage_key(s[i]) for s in states)
        written_storages |= state_storages
        written_storages.discard(None)
        state_storages.discard(None)

        grads: list[Tensor] = []
        for p, work, grad in zip(gathered.params, works, gathered.grads, strict=True):
            if grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients")
            if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
                # torch's setter rules this out; `p.grad.data = ...` does not.
                raise RuntimeError(
                    f"{name}: a gradient of shape {tuple(grad.shape)}, dtype {grad.dtype} on "
                    f"{grad.device} does not match its parameter (shape {tuple(p.shape)}, "
                    f"dtype {p.dtype} on {p.device})"
                )
            if _is_dtensor(grad):
                out.dtensor_grads.append(grad)
            grad = _local(grad)
            # Aliasing is decided on the grad's own memory, before a lazy (negated,
            # conjugated) grad is resolved into a copy that would hide it.
            storage = _storage_key(grad)
            if storage in state_storages:
                raise RuntimeError(
                    f"{name}: a gradient shares memory with the optimizer's own state "
                    "(e.g. p.grad = opt.state[p][...]); give it a gradient of its own"
                )
            if storage in written_storages:
                # The gradient shares memory with a buffer the step writes: read
                # what torch's in-place sequence would have read.
                grad = self._ferro_aliased_grad(_local(p), grad, group)
            grad = _resolved(grad)
            grads.append(_laid_out_like(grad, work))

        # Per scalar slot (step first), each param's 0-d tensor.
        scalar_values = [
            gathered.steps if key == step_key else gathered.scalars[key]
            for key in self._ferro_scalar_slots()
        ]
        for kind in sorted(set(kinds)):
            index = [i for i, k in enumerate(kinds) if k == kind]
            try:
                plan = _core.GroupPlan.from_tensors(
                    _real([works[i] for i in index]),
                    _real([grads[i] for i in index]),
                    [_real([s[i] for i in index]) for s in states],
                    [[values[i] for i in index] for values in scalar_values],
                )
            except ValueError as error:
                raise RuntimeError(f"{name}: {error}") from error
            fresh, dtensor = kind
            out.plans.append((plan, fresh))
            if not dtensor:
                out.norm_plans.append(plan)
        return out

    def _ferro_scalar_slots(self) -> list[str]:
        """The state keys of the kernel's scalar slots: the step counter, then the rest."""
        step = [] if self._ferro_step_key is None else [self._ferro_step_key]
        return [*step, *self._ferro_scalar_keys]

    def _cache_plan(self, group: dict[str, Any], plans: dict[int, _CachedPlan]) -> None:
        """Builds the plan the next step re-checks instead of taking the slow path."""
        plans.pop(id(group), None)
        if group.get("differentiable", False) or _config.get_backend() == "torch":
            return
        params = group["params"]
        if not all(
            p.device.type == "cpu"
            and p.dtype in _RUST_DTYPES
            and _is_plain(p)
            and self._step_plannable(p)
            for p in params
        ):
            return
        key = self._ferro_plan_key(group)
        if key is None:
            return
        try:
            plan = _core.GroupPlan(
                params,
                [self.state.get(p, _NO_STATE) for p in params],
                list(key[0]),
                self._ferro_scalar_slots(),
            )
        except (ValueError, RuntimeError):
            return  # not plannable (odd layout, foreign state): the slow path stays correct
        plans[id(group)] = _CachedPlan(group, params, key, plan)
